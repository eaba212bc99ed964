"""The overlapped decode loop (step N+1 launched from step N's sampled ids before they are read
back) gives exactly the outputs of the plain loop, and loses no KV slot, request or lock."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

GREEDY = {"temperature": 0}


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 500) for _ in range(40)]
    return [prefix + [rng.randrange(3, 500) for _ in range(rng.randint(2, 20))] for _ in range(n)]


def _pair(make_engine, path, **kwargs):
    return (
        make_engine(path, overlap_schedule=True, **kwargs),
        make_engine(path, overlap_schedule=False, **kwargs),
    )


def _strip(out: dict) -> tuple:
    meta = out["meta_info"]
    return out["text"], out["output_ids"], meta["finish_reason"], meta["completion_tokens"]


@pytest.mark.parametrize(
    "params",
    [
        {**GREEDY, "ignore_eos": True},
        {**GREEDY, "stop": ["a", "e"]},
        {"temperature": 0.9, "top_p": 0.9, "seed": 7, "ignore_eos": True},
        {**GREEDY, "min_new_tokens": 5, "stop_token_ids": [17, 99, 250]},
    ],
    ids=["greedy", "stop-strings", "seeded", "min-new-tokens"],
)
def test_overlap_gives_the_plain_loops_outputs(tiny_llama, make_engine, params):
    on, off = _pair(make_engine, tiny_llama)
    prompts = _prompts(12)
    lens = [5 + (7 * i) % 23 for i in range(len(prompts))]
    sps = [{**params, "max_new_tokens": n} for n in lens]
    a = on.generate(input_ids=prompts, sampling_params=sps)
    b = off.generate(input_ids=prompts, sampling_params=sps)
    assert [_strip(o) for o in a] == [_strip(o) for o in b]
    assert on.metrics()["overlapped_passes"] > 0
    assert off.metrics()["overlapped_passes"] == 0
    assert on.metrics()["decode_tokens"] == off.metrics()["decode_tokens"]


def test_logprobs_are_the_same_with_overlap(tiny_llama, make_engine):
    on, off = _pair(make_engine, tiny_llama)
    kw = dict(
        input_ids=_prompts(4, seed=3),
        sampling_params={**GREEDY, "max_new_tokens": 9, "ignore_eos": True},
        return_logprob=True,
        top_logprobs_num=3,
    )
    a, b = on.generate(**kw), off.generate(**kw)
    for x, y in zip(a, b, strict=True):
        lx, ly = x["meta_info"]["output_token_logprobs"], y["meta_info"]["output_token_logprobs"]
        assert [t for _, t, _ in lx] == [t for _, t, _ in ly]
        assert [p for p, _, _ in lx] == pytest.approx([p for p, _, _ in ly], abs=1e-5)
        assert len(x["meta_info"]["output_top_logprobs"]) == 9


def test_grammar_requests_turn_overlap_off_and_still_match(tiny_llama, make_engine):
    pytest.importorskip("xgrammar")
    on, off = _pair(make_engine, tiny_llama)
    prompts = _prompts(6, seed=5)
    sps = [{**GREEDY, "max_new_tokens": 12, "ignore_eos": True} for _ in prompts]
    sps[2] = {**GREEDY, "max_new_tokens": 12, "regex": "[ab]{3,6}"}
    a = on.generate(input_ids=prompts, sampling_params=sps)
    b = off.generate(input_ids=prompts, sampling_params=sps)
    assert [_strip(o) for o in a] == [_strip(o) for o in b]


def test_under_kv_pressure_overlap_retracts_and_matches(tiny_llama, make_engine):
    rng = random.Random(4)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(10, 30))] for _ in range(40)]
    sp = {**GREEDY, "max_new_tokens": 30, "ignore_eos": True}
    on, off = _pair(make_engine, tiny_llama, max_total_tokens=6 * 60, chunked_prefill_size=128)
    a = on.generate(input_ids=prompts, sampling_params=sp)
    b = off.generate(input_ids=prompts, sampling_params=sp)
    assert [o["output_ids"] for o in a] == [o["output_ids"] for o in b]
    assert on.metrics()["overlapped_passes"] > 0


def test_abort_while_a_step_is_in_flight_frees_everything(tiny_llama, make_engine):
    eng = make_engine(tiny_llama, overlap_schedule=True)
    sp = {**GREEDY, "max_new_tokens": 400, "ignore_eos": True}
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(
            eng.generate, input_ids=_prompts(2, seed=9)[1], sampling_params=sp, rid="other"
        )
        chunks = eng.generate(
            input_ids=_prompts(1)[0], sampling_params=sp, stream=True, rid="victim"
        )
        for seen, _ in enumerate(chunks, 1):
            if seen == 5:
                eng.abort("victim")
                eng.abort("other")
        assert other.result(timeout=30)["meta_info"]["finish_reason"]["type"] == "abort"
    deadline = time.monotonic() + 10
    while eng.metrics()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    m = eng.metrics()
    assert m["aborted_requests"] == 2 and m["overlapped_passes"] > 0


def test_text_detokenised_at_the_end_equals_the_streamed_text(tiny_llama, make_engine):
    """A request nobody reads the text of until it finishes is detokenised once, at the end;
    its text is the same as when it is detokenised token by token (streamed)."""
    eng = make_engine(tiny_llama)
    prompts = _prompts(6, seed=11)
    for i, p in enumerate(prompts):
        sp = {"temperature": 1.0, "seed": i, "max_new_tokens": 30, "ignore_eos": True}
        whole = eng.generate(input_ids=p, sampling_params=sp)
        *_, last = eng.generate(input_ids=p, sampling_params=sp, stream=True)
        assert whole["output_ids"] == last["output_ids"]
        assert whole["text"] == last["text"] and whole["text"]
