"""The engine on the embedded SmolLM2-135M-Instruct: greedy equals transformers, prefix reuse."""

from __future__ import annotations

import pytest
import torch

QUESTIONS = [
    "What is the capital of France?",
    "Name a primary colour.",
    "What is 2 + 2?",
    "Write one word that rhymes with cat.",
]


@pytest.fixture(scope="module")
def engine(smollm2_path):
    from sgl_engine import Engine

    eng = Engine(smollm2_path, device="cpu", max_total_tokens=8192)
    yield eng
    eng.check_invariants()
    eng.shutdown()


def test_greedy_equals_transformers_on_smollm2(engine, smollm2_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    prompts = [engine.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    params = {"max_new_tokens": 16, "temperature": 0}
    outs = engine.generate(prompts, params)
    for p, o in zip(prompts, outs, strict=True):
        ids = engine.tokenizer.encode(p)
        ref = model.generate(
            torch.tensor([ids]), max_new_tokens=16, do_sample=False, pad_token_id=0
        )[0, len(ids) :].tolist()
        n = len(o["output_ids"])
        assert o["output_ids"] == ref[:n]
        if o["meta_info"]["finish_reason"]["type"] == "length":
            assert n == 16
    assert "Paris" in outs[0]["text"]
    chunked = engine.generate(prompts[0], params)
    assert chunked["output_ids"] == outs[0]["output_ids"]
    assert chunked["meta_info"]["cached_tokens"] > 0


def test_chunked_prefill_on_smollm2_matches(smollm2_path):
    from sgl_engine import Engine

    with Engine(smollm2_path, device="cpu", max_total_tokens=4096, chunked_prefill_size=16) as eng:
        with Engine(
            smollm2_path, device="cpu", max_total_tokens=4096, disable_radix_cache=True
        ) as ref:
            p = eng.apply_chat_template([{"role": "user", "content": QUESTIONS[0] * 3}])
            a = eng.generate(p, {"max_new_tokens": 8, "temperature": 0})
            b = ref.generate(p, {"max_new_tokens": 8, "temperature": 0})
            assert a["output_ids"] == b["output_ids"]
            eng.check_invariants()
