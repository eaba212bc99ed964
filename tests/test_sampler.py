from __future__ import annotations

from collections import Counter

import pytest
import torch
from sgl_engine.sampler import (
    SampleOutput,
    Sampler,
    apply_penalties,
    filter_probs,
    make_generator,
    top_logprobs,
)
from sgl_engine.sampling_params import SamplingParams
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

GREEDY = SamplingParams(temperature=0.0)


def run(logits, params, output_ids=None, prompt_ids=None, generators=None, **kw) -> SampleOutput:
    batch = logits.shape[0]
    return Sampler()(
        logits,
        params,
        output_ids if output_ids is not None else [[] for _ in range(batch)],
        prompt_ids if prompt_ids is not None else [[] for _ in range(batch)],
        generators if generators is not None else [None] * batch,
        **kw,
    )


def reference_penalties(logits, params, output_ids, prompt_ids):
    """Row by row: transformers' repetition processor, then OpenAI's formula as a plain loop."""
    out = logits.clone()
    for i, p in enumerate(params):
        row = out[i : i + 1]
        seen = list(prompt_ids[i]) + list(output_ids[i])
        if p.repetition_penalty != 1.0 and seen:
            row = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.tensor([seen]), row)
        for token, count in Counter(output_ids[i]).items():
            row[0, token] -= p.frequency_penalty * count + p.presence_penalty
        out[i] = row[0]
    return out


def reference_filtered_logits(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """transformers' warpers in HF order; -inf marks excluded tokens."""
    scores = TemperatureLogitsWarper(p.temperature)(None, row[None].clone())
    if p.top_k > 0:
        scores = TopKLogitsWarper(p.top_k)(None, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(None, scores)
    if p.min_p > 0.0:
        scores = MinPLogitsWarper(p.min_p)(None, scores)
    return scores[0]


def test_logprobs_are_raw_and_inputs_untouched():
    torch.manual_seed(0)
    logits = torch.randn(4, 40)
    before = logits.clone()
    params = [
        GREEDY,
        SamplingParams(temperature=0.3, repetition_penalty=1.7),
        SamplingParams(frequency_penalty=1.5, top_k=5),
        SamplingParams(presence_penalty=-1.0, top_p=0.4),
    ]
    mask = torch.rand(4, 40) > 0.5
    mask[:, 0] = True
    out = run(logits, params, [[1, 2], [3], [4, 4], [5]], [[6], [7], [8], [9]], allowed_mask=mask)
    assert torch.equal(logits, before)
    torch.testing.assert_close(out.logprobs, torch.log_softmax(before, dim=-1))
    expected = [out.logprobs[i, t].item() for i, t in enumerate(out.next_token_ids)]
    assert out.chosen_logprobs == pytest.approx(expected)
    assert out.mask_empty == [False] * 4


def test_penalties_match_reference():
    gen = torch.Generator().manual_seed(1)
    batch, vocab = 7, 50
    logits = torch.randn(batch, vocab, generator=gen) * 3
    params = [
        SamplingParams(),
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(repetition_penalty=0.6),
        SamplingParams(frequency_penalty=0.7),
        SamplingParams(presence_penalty=-1.2),
        SamplingParams(repetition_penalty=1.9, frequency_penalty=-0.5, presence_penalty=2.0),
        SamplingParams(frequency_penalty=2.0, presence_penalty=0.5),
    ]
    output_ids = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in range(3, 10)]
    prompt_ids = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in range(5, 12)]
    expected = reference_penalties(logits, params, output_ids, prompt_ids)
    got = logits.clone()
    apply_penalties(got, params, output_ids, prompt_ids)
    torch.testing.assert_close(got, expected)
    assert not torch.equal(got, logits)

    greedy = [SamplingParams(**{**p.to_dict(), "temperature": 0.0}) for p in params]
    out = run(logits, greedy, output_ids, prompt_ids)
    assert out.next_token_ids == expected.argmax(dim=-1).tolist()


def test_greedy_is_argmax_with_lowest_index_on_ties():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randint(0, 3, (64, 30), generator=gen).float()
    params = [GREEDY if i % 2 else SamplingParams(top_k=1, temperature=1.3) for i in range(64)]
    out = run(logits, params)
    assert out.next_token_ids == torch.argmax(logits, dim=-1).tolist()
    first_max = [row.index(max(row)) for row in logits.tolist()]
    assert out.next_token_ids == first_max


FILTER_CASES = [
    SamplingParams(),
    SamplingParams(temperature=0.5),
    SamplingParams(temperature=2.0, top_k=4),
    SamplingParams(top_p=0.6),
    SamplingParams(top_p=0.05),
    SamplingParams(min_p=0.2),
    SamplingParams(temperature=0.7, top_k=8, top_p=0.8, min_p=0.05),
    SamplingParams(temperature=1.5, top_k=20, min_p=0.5),
    SamplingParams(top_k=3, top_p=0.99),
]


def _short(params: SamplingParams) -> str:
    defaults = SamplingParams().to_dict()
    return ",".join(f"{k}={v}" for k, v in params.to_dict().items() if v != defaults[k])


TOP_K_CASES = [  # every row has a top_k: the top-k selection path instead of a full sort
    SamplingParams(top_k=1),
    SamplingParams(top_k=7, top_p=0.5),
    SamplingParams(temperature=0.6, top_k=40, min_p=0.1),
    SamplingParams(top_k=5000, top_p=0.9),
]


@pytest.mark.parametrize("cases", [FILTER_CASES, TOP_K_CASES], ids=["sort", "select"])
def test_filter_support_matches_transformers_warpers(cases):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(len(cases), 200, generator=gen) * 2
    temperature = torch.tensor([[p.temperature] for p in cases])
    probs = filter_probs(torch.softmax(logits / temperature, dim=-1), cases)
    for i, params in enumerate(cases):
        reference = reference_filtered_logits(logits[i], params)
        assert torch.equal(probs[i] > 0, torch.isfinite(reference)), params
        torch.testing.assert_close(probs[i] / probs[i].sum(), torch.softmax(reference, dim=-1))


@pytest.mark.parametrize(
    "top_p, top_k, support",
    [(0.5, -1, [1]), (0.7, -1, [1, 3]), (0.75, -1, [1, 3]), (0.8, -1, [0, 1, 3]), (0.6, 2, [1])]
    + [(0.7, 2, [1, 3])],
)
def test_top_p_keeps_the_smallest_set_reaching_top_p(top_p, top_k, support):
    probs = torch.tensor([[0.125, 0.5, 0.125, 0.25]])
    kept = filter_probs(probs, [SamplingParams(top_p=top_p, top_k=top_k)])
    assert torch.nonzero(kept[0]).flatten().tolist() == support


@pytest.mark.parametrize("params", FILTER_CASES[:4] + FILTER_CASES[5:8], ids=lambda p: _short(p))
def test_sampled_frequencies_follow_filtered_distribution(params):
    torch.manual_seed(4)
    vocab, draws = 12, 20000
    logits = torch.linspace(2.0, -1.0, vocab)[torch.randperm(vocab)]
    reference = torch.softmax(reference_filtered_logits(logits, params), dim=-1)
    out = run(logits.expand(draws, vocab).contiguous(), [params] * draws)
    counts = torch.bincount(torch.tensor(out.next_token_ids), minlength=vocab).float()
    support = set(torch.nonzero(reference).flatten().tolist())
    assert set(out.next_token_ids) == support
    assert (counts / draws - reference).abs().max().item() < 0.015


def test_mask_never_lets_a_disallowed_token_through():
    gen = torch.Generator().manual_seed(5)
    batch, vocab, mask_vocab = 4000, 70, 64
    mask = torch.rand(batch, mask_vocab, generator=gen) < 0.1
    mask[torch.arange(batch), torch.randint(0, mask_vocab, (batch,), generator=gen)] = True
    logits = torch.randn(batch, vocab, generator=gen)
    logits[:, :mask_vocab] += 6.0 * ~mask
    logits[:, mask_vocab:] += 6.0
    kinds = [
        SamplingParams(),
        SamplingParams(temperature=1.0, top_p=0.9),
        SamplingParams(top_k=5),
        SamplingParams(min_p=0.1, repetition_penalty=1.5),
        GREEDY,
    ]
    params = [kinds[i % len(kinds)] for i in range(batch)]
    torch.manual_seed(5)
    out = run(logits, params, allowed_mask=mask, prompt_ids=[[1, 2, 3]] * batch)
    chosen = torch.tensor(out.next_token_ids)
    assert (chosen < mask_vocab).all()
    assert mask[torch.arange(batch), chosen.clamp_max(mask_vocab - 1)].all()
    assert not any(out.mask_empty)
    assert len(set(out.next_token_ids)) > 20


def test_banned_ids_never_chosen_and_yield_to_the_grammar():
    torch.manual_seed(6)
    batch, vocab, eos = 2000, 16, 3
    logits = torch.zeros(batch, vocab)
    logits[:, eos] = 5.0
    logits[:, 7] = 4.0
    banned = [[eos, 7]] * batch
    out = run(logits, [SamplingParams()] * batch, banned_ids=banned)
    assert not {eos, 7} & set(out.next_token_ids)
    assert len(set(out.next_token_ids)) == vocab - 2

    only_eos = torch.zeros(2, vocab, dtype=torch.bool)
    only_eos[:, eos] = True
    out = run(
        logits[:2], [GREEDY, SamplingParams()], banned_ids=[[eos], [eos]], allowed_mask=only_eos
    )
    assert out.next_token_ids == [eos, eos]
    assert out.mask_empty == [False, False]

    out = run(logits[:1], [GREEDY], banned_ids=[list(range(vocab))])
    assert out.next_token_ids == [eos]


def test_empty_mask_row_is_flagged_and_isolated():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [0.0, 3.0, 1.0, 2.0]])
    mask = torch.tensor([[False] * 4, [True, False, True, False]])
    out = run(logits, [GREEDY, GREEDY], allowed_mask=mask)
    assert out.mask_empty == [True, False]
    assert out.next_token_ids == [1, 2]


def _seeded_run(steps_logits, rows, seeded_row, seed):
    """Decode len(steps_logits) steps; `seeded_row` carries `seed`, the other rows vary."""
    generators = [make_generator(99 if i % 2 else None, "cpu") for i in range(rows)]
    generators[seeded_row] = make_generator(seed, "cpu")
    tokens = []
    for step_logits in steps_logits:
        noise = torch.randn(rows, step_logits.shape[-1])
        noise[seeded_row] = step_logits
        params = [SamplingParams(temperature=0.9, top_p=0.95)] * rows
        tokens.append(run(noise, params, generators=generators).next_token_ids[seeded_row])
    return tokens


def test_seed_gives_same_tokens_whatever_the_batch():
    gen = torch.Generator().manual_seed(7)
    steps = [torch.randn(1000, generator=gen) * 0.1 for _ in range(12)]
    alone = _seeded_run(steps, rows=1, seeded_row=0, seed=1234)
    torch.manual_seed(123)
    in_batch = _seeded_run(steps, rows=5, seeded_row=3, seed=1234)
    torch.manual_seed(321)
    first_of_three = _seeded_run(steps, rows=3, seeded_row=0, seed=1234)
    assert alone == in_batch == first_of_three
    assert _seeded_run(steps, rows=1, seeded_row=0, seed=1235) != alone


def test_unseeded_rows_follow_the_default_rng():
    logits = torch.zeros(8, 1000)
    torch.manual_seed(8)
    first = run(logits, [SamplingParams()] * 8).next_token_ids
    second = run(logits, [SamplingParams()] * 8).next_token_ids
    torch.manual_seed(8)
    assert run(logits, [SamplingParams()] * 8).next_token_ids == first
    assert first != second


def test_top_logprobs():
    gen = torch.Generator().manual_seed(9)
    logprobs = torch.log_softmax(torch.randn(3, 20, generator=gen), dim=-1)
    got = top_logprobs(logprobs, 4)
    for row, pairs in zip(logprobs.tolist(), got, strict=True):
        expected = sorted(((v, i) for i, v in enumerate(row)), key=lambda x: -x[0])[:4]
        assert pairs == expected
    assert top_logprobs(logprobs, 0) == [[], [], []]
    assert len(top_logprobs(logprobs, 50)[0]) == 20


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError):
        run(torch.zeros(2, 5), [GREEDY])
    with pytest.raises(ValueError):
        run(torch.zeros(2, 5), [GREEDY] * 2, banned_ids=[[1]])
    with pytest.raises(ValueError):
        run(torch.zeros(2, 5), [GREEDY] * 2, allowed_mask=torch.ones(2, 6, dtype=torch.bool))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_mask_greedy_and_seed():
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(10)
    batch, vocab = 512, 32000
    logits = torch.randn(batch, vocab, device=device, generator=gen)
    mask = torch.rand(batch, vocab, device=device, generator=gen) < 0.01
    mask[:, 0] = True
    logits += 8.0 * ~mask
    params = [SamplingParams(top_p=0.9, top_k=50) if i % 2 else GREEDY for i in range(batch)]
    out = run(logits, params, allowed_mask=mask)
    chosen = torch.tensor(out.next_token_ids, device=device)
    assert mask[torch.arange(batch, device=device), chosen].all()
    greedy_rows = torch.arange(0, batch, 2, device=device)
    expected = logits.masked_fill(~mask, float("-inf"))[greedy_rows].argmax(dim=-1)
    assert chosen[greedy_rows].tolist() == expected.tolist()
    row = logits[1:2]
    tokens = []
    for rows in (1, 7):
        generators = [make_generator(42, device)] + [None] * (rows - 1)
        batch_logits = torch.cat([row, torch.randn(rows - 1, vocab, device=device)])
        tokens.append(
            run(batch_logits, [params[1]] * rows, generators=generators).next_token_ids[0]
        )
    assert tokens[0] == tokens[1]
