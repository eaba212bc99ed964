"""`Engine.stream`/`astream` (aborting early frees KV) and `Engine.score` (against transformers,
the prefix prefilled once, input checks)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch
from sgl_engine.errors import InvalidRequestError

GREEDY = {"temperature": 0, "ignore_eos": True}
LONG = {**GREEDY, "max_new_tokens": 2000}
HEAD = (
    "Question: What is the capital of France? Answer: Paris. Question: What is two plus two? "
    "Answer: 4. The quick brown fox jumps over the lazy dog. "
)


@pytest.fixture
def eng(tiny_llama, make_engine):
    return make_engine(tiny_llama)


def assert_only_cache_holds_kv(eng, aborted: int) -> None:
    eng.check_invariants()
    m = eng.metrics()
    assert m["kv_used"] == m["cache_tokens"] and m["running"] == m["waiting"] == 0
    assert m["aborted_requests"] == aborted


# -- stream ------------------------------------------------------------------------------------


def test_stream_is_generate_stream_and_adds_up_to_generate(eng):
    params = {**GREEDY, "max_new_tokens": 16}
    chunks = list(eng.stream("The quick", params, return_logprob=True))
    old = list(eng.generate("The quick", params, stream=True, return_logprob=True))
    full = eng.generate("The quick", params, return_logprob=True)
    assert [c["delta"] for c in chunks] == [c["delta"] for c in old]
    assert "".join(c["delta"] for c in chunks) == chunks[-1]["text"] == full["text"]
    assert chunks[-1]["output_ids"] == full["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    ids = eng.tokenizer.encode("The quick")
    assert list(eng.stream(input_ids=ids, sampling_params=params))[-1]["text"] == full["text"]


def test_stream_checks_arguments_at_the_call(eng):
    with pytest.raises(InvalidRequestError) as err:
        eng.stream(["a", "b"], GREEDY)
    assert err.value.field == "stream"
    with pytest.raises(InvalidRequestError):
        eng.stream("hi", {"n": 2})
    with pytest.raises(InvalidRequestError):
        eng.stream("hi", {"max_new_tokens": -1})
    assert_only_cache_holds_kv(eng, aborted=0)


def test_breaking_or_closing_a_stream_aborts_it_and_frees_its_kv(eng):
    for chunk in eng.stream("The quick brown fox", LONG):
        assert chunk["delta"] is not None
        break
    assert_only_cache_holds_kv(eng, aborted=1)
    it = eng.stream("A radix tree", LONG, rid="closed")
    next(it)
    it.close()
    assert_only_cache_holds_kv(eng, aborted=2)
    unstarted = eng.stream("never sent", LONG)
    del unstarted
    assert_only_cache_holds_kv(eng, aborted=2)
    assert eng.generate("hi", {**GREEDY, "max_new_tokens": 3})["output_ids"]


def test_astream_matches_stream_and_cancelling_or_closing_frees_kv(eng):
    params = {**GREEDY, "max_new_tokens": 12}
    want = [c["delta"] for c in eng.stream("The quick", params)]

    async def main() -> None:
        got = [c["delta"] async for c in eng.astream("The quick", params)]
        assert got == want
        old = await eng.async_generate("The quick", params, stream=True)
        assert [c["delta"] async for c in old] == want

        started = asyncio.Event()

        async def consume() -> None:
            async for _ in eng.astream("The quick brown fox", LONG):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        async with contextlib.aclosing(eng.astream("A radix tree", LONG)) as chunks:
            async for _ in chunks:
                break

        with pytest.raises(InvalidRequestError):
            async for _ in eng.astream(["a", "b"], params):
                pass

    asyncio.run(main())
    assert_only_cache_holds_kv(eng, aborted=2)


# -- score -------------------------------------------------------------------------------------


def reference_scores(path: str, tok, prefix: str, continuations: list[str]) -> list[tuple]:
    """transformers' logprobs of each continuation's tokens inside tokenize(prefix + c)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prefix_ids = tok.encode(prefix)
    refs = []
    for c in continuations:
        full = tok.encode(prefix + c)
        k = next(i for i in range(len(full)) if i >= len(prefix_ids) or full[i] != prefix_ids[i])
        with torch.no_grad():
            logits = model(torch.tensor([full])).logits[0].float().log_softmax(-1)
        refs.append((full[k:], [logits[p - 1, full[p]].item() for p in range(k, len(full))]))
    return refs


@pytest.mark.parametrize(
    ("arch", "prefix", "continuations"),
    [
        ("llama", HEAD, [" Paris.", " London, maybe", " 4"]),
        ("qwen2", HEAD, [" yes", " no", " maybe so"]),
        # the prefix's last token merges with the continuation: that token is scored too
        ("llama", "The quick bro", ["wn fox", "ke", "x"]),
        ("llama", "x", ["y", " quick"]),
    ],
)
def test_score_matches_transformers(arch, prefix, continuations, tiny_model_dirs, make_engine):
    path = tiny_model_dirs[arch]
    eng = make_engine(path)
    scores = eng.score(prefix, continuations)
    refs = reference_scores(path, eng.tokenizer, prefix, continuations)
    for text, score, (ids, lps) in zip(continuations, scores, refs, strict=True):
        assert score.text == text
        assert list(score.token_ids) == ids and score.num_tokens == len(ids)
        assert list(score.token_logprobs) == pytest.approx(lps, abs=1e-4)
        assert score.logprob_sum == pytest.approx(sum(lps), abs=1e-3)
        assert score.logprob_mean == pytest.approx(sum(lps) / len(lps), abs=1e-3)


def test_score_of_a_merged_boundary_includes_the_merged_token(eng):
    tok = eng.tokenizer
    prefix_ids, full = tok.encode("The quick bro"), tok.encode("The quick brown fox")
    [score] = eng.score("The quick bro", ["wn fox"])
    assert (
        full[: len(prefix_ids) - 1] == prefix_ids[:-1]
        and full[len(prefix_ids) - 1] != (prefix_ids[-1])
    )
    assert list(score.token_ids) == full[len(prefix_ids) - 1 :]


def test_score_prefills_the_shared_prefix_once(eng):
    tok = eng.tokenizer
    conts = [" Paris.", " London, maybe", " 4", " The quick brown fox"]
    prefix_ids = tok.encode(HEAD)
    fulls = [tok.encode(HEAD + c) for c in conts]
    assert all(f[: len(prefix_ids)] == prefix_ids for f in fulls)
    c = [len(f) - len(prefix_ids) for f in fulls]
    scores = eng.score(HEAD, conts)
    cold = eng.metrics()
    # the prefix once; each continuation its tokens plus the one before them (its logprob's
    # position), instead of len(conts) * len(prefix) for separate requests
    assert cold["prefill_tokens"] == len(prefix_ids) + sum(c) + len(conts) - 1
    assert cold["prefill_tokens"] < len(conts) * len(prefix_ids)
    again = eng.score(HEAD, conts)
    warm = eng.metrics()
    assert warm["prefill_tokens"] - cold["prefill_tokens"] == sum(c) + len(conts)
    assert [s.logprob_sum for s in again] == pytest.approx([s.logprob_sum for s in scores])
    assert_only_cache_holds_kv(eng, aborted=0)


def test_async_score_equals_score(eng):
    conts = [" Paris.", " 4"]
    want = eng.score(HEAD, conts)
    got = asyncio.run(eng.async_score(HEAD, conts))
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [g.logprob_sum for g in got] == pytest.approx([w.logprob_sum for w in want])


@pytest.mark.parametrize(
    ("prefix", "continuations", "field", "words"),
    [
        ("Answer:", [], "continuations", "must not be empty"),
        ("Answer:", " yes", "continuations", "list of strings"),
        ("Answer:", [" yes", ""], "continuations[1]", "nothing to score"),
        ("Answer:", [" yes", 4], "continuations[1]", "must be a string"),
        ("", [" yes"], "prefix", "must not be empty"),
        ("T", [" x", "he"], "continuations[1]", "merges with the whole prefix"),
        ("Answer:", ["\ud800"], "continuations[0]", "Unicode"),
        ("Answer:", [" yes", " no" * 40], "continuations[1]", "tokens; at most 63 fit"),
        ("Answer:", [" yes", " no" * 10_000], "continuations[1]", "characters"),
    ],
)
def test_score_refuses_bad_input_clearly(
    prefix, continuations, field, words, tiny_llama, make_engine
):
    eng = make_engine(tiny_llama, context_length=64)
    with pytest.raises(InvalidRequestError, match=words) as err:
        eng.score(prefix, continuations)
    assert err.value.field == field
    assert eng.metrics()["prompt_tokens"] == 0
