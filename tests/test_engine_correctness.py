"""Greedy tokens of our engine equal transformers' `generate` on the same weights."""

from __future__ import annotations

import pytest
import torch

PROMPTS = [
    "The quick brown fox",
    "Question: What is the capital of France? Answer:",
    "hi",
    '{"name": "Alice", "age": 31, "email": "alice@example.com", "tags": ["a"',
    "A radix tree shares prefixes between keys. Large language models generate text",
]
NEW = 10


@pytest.fixture(scope="module")
def hf_refs(tiny_model_dirs):
    """Greedy continuations by transformers, one prompt at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    refs = {}
    for arch, path in tiny_model_dirs.items():
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for p in PROMPTS:
            ids = tok.encode(p)
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=NEW,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            refs[arch, p] = out[0, len(ids) :].tolist()
    return refs


GREEDY = {"max_new_tokens": NEW, "temperature": 0, "ignore_eos": True}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_single_requests_match_transformers(arch, tiny_model_dirs, hf_refs, make_engine):
    eng = make_engine(tiny_model_dirs[arch])
    for p in PROMPTS:
        assert eng.generate(p, GREEDY)["output_ids"] == hf_refs[arch, p]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"disable_radix_cache": True},
        {"chunked_prefill_size": 7},
        {"chunked_prefill_size": 5, "disable_radix_cache": True},
        {"page_size": 4},
        {"schedule_policy": "fcfs"},
    ],
    ids=["radix", "no-radix", "chunked", "chunked-no-radix", "page4", "fcfs"],
)
def test_batched_mixed_lengths_match_transformers(
    arch, options, tiny_model_dirs, hf_refs, make_engine
):
    eng = make_engine(tiny_model_dirs[arch], **options)
    outs = eng.generate(PROMPTS, GREEDY)
    assert [o["output_ids"] for o in outs] == [hf_refs[arch, p] for p in PROMPTS]
    again = eng.generate(PROMPTS[::-1], GREEDY)
    assert [o["output_ids"] for o in again] == [hf_refs[arch, p] for p in PROMPTS[::-1]]
    cached = sum(o["meta_info"]["cached_tokens"] for o in again)
    if options.get("disable_radix_cache"):
        assert cached == 0
    else:
        assert cached > 0


def test_output_and_prompt_logprobs_match_transformers(tiny_llama, make_engine):
    from transformers import AutoModelForCausalLM

    eng = make_engine(tiny_llama)
    prompt = PROMPTS[1]
    ids = eng.tokenizer.encode(prompt)
    eng.generate(prompt, GREEDY)  # warm the cache: prompt logprobs must still be computed
    out = eng.generate(prompt, GREEDY, return_logprob=True, logprob_start_len=2, top_logprobs_num=3)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    full = torch.tensor([ids + out["output_ids"]])
    with torch.no_grad():
        ref = torch.log_softmax(model(full).logits[0].float(), dim=-1)
    meta = out["meta_info"]
    inp = meta["input_token_logprobs"]
    assert [t for _, t, _ in inp] == ids[2:]
    for k, (lp, t, _) in enumerate(inp):
        assert lp == pytest.approx(ref[2 + k - 1, t].item(), abs=1e-4)
    for k, (lp, t, _) in enumerate(meta["output_token_logprobs"]):
        pos = len(ids) + k - 1
        assert lp == pytest.approx(ref[pos, t].item(), abs=1e-4)
        top = meta["output_top_logprobs"][k]
        assert top[0][1] == t  # greedy picks the top token
        assert [x[1] for x in top] == ref[pos].topk(3).indices.tolist()


def test_max_new_tokens_zero_scores_the_prompt(tiny_llama, make_engine):
    eng = make_engine(tiny_llama)
    out = eng.generate(
        input_ids=[5, 6, 7, 8],
        sampling_params={"max_new_tokens": 0},
        return_logprob=True,
        logprob_start_len=0,
    )
    assert out["output_ids"] == []
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    lps = out["meta_info"]["input_token_logprobs"]
    assert lps[0][0] is None and all(lp < 0 for lp, _, _ in lps[1:]) and len(lps) == 4
