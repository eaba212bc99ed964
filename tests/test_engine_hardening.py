"""Hostile and careless input to `Engine` directly (issue 17): every case is refused for that
request only, or bounded, and leaves no request, channel or KV slot behind."""

from __future__ import annotations

import asyncio
import logging

import pytest
from sgl_engine.errors import InvalidRequestError

GREEDY = {"temperature": 0, "ignore_eos": True}


def _refused(eng, field: str, **kwargs) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as err:
        eng.generate(**kwargs)
    assert err.value.field == field, err.value
    return err.value


@pytest.fixture(scope="module")
def eng(tiny_llama):
    from sgl_engine import Engine

    engine = Engine(tiny_llama, device="cpu", max_total_tokens=4096, context_length=64)
    yield engine
    engine.check_invariants()
    assert engine._channels == {}, "a channel leaked"
    engine.shutdown()


def test_duplicate_rid_in_one_call_is_refused_not_hung(eng):
    small = {**GREEDY, "max_new_tokens": 2}
    _refused(eng, "rid", prompt=["a b", "c d"], sampling_params=small, rid=["x", "x"])
    _refused(eng, "rid", input_ids=[[5, 6], [7, 8]], sampling_params=small, rid=["y", "y"])
    # n > 1 expands "z" into z-0, z-1: a second prompt named z-1 collides
    two = [{**small, "n": 2}, small]
    _refused(eng, "rid", input_ids=[[5, 6], [7, 8]], sampling_params=two, rid=["z", "z-1"])
    _refused(eng, "rid", prompt="hi", sampling_params=small, rid=5)
    outs = eng.generate(["a b", "c d"], small, rid=["x", "y"])
    assert [o["meta_info"]["id"] for o in outs] == ["x", "y"]
    assert eng.generate("a b", small, rid="x")["meta_info"]["id"] == "x", "a rid is reusable"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"top_logprobs_num": 10**6}, "top_logprobs_num"),
        ({"top_logprobs_num": 21}, "top_logprobs_num"),
        ({"top_logprobs_num": -1}, "top_logprobs_num"),
        ({"top_logprobs_num": 2.5}, "top_logprobs_num"),
        ({"logprob_start_len": -2}, "logprob_start_len"),
        ({"logprob_start_len": 10**9}, "logprob_start_len"),
        ({"logprob_start_len": "0"}, "logprob_start_len"),
    ],
)
def test_logprob_arguments_are_bounded(eng, kwargs, field):
    _refused(
        eng,
        field,
        prompt="hello",
        sampling_params={"max_new_tokens": 1},
        return_logprob=True,
        **kwargs,
    )


def test_top_logprobs_cap_is_an_engine_option(tiny_llama, make_engine):
    wide = make_engine(tiny_llama, context_length=64, max_top_logprobs=50)
    out = wide.generate(
        "hello",
        {"max_new_tokens": 1},
        return_logprob=True,
        top_logprobs_num=50,
        logprob_start_len=0,
    )
    assert len(out["meta_info"]["output_top_logprobs"][0]) == 50


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"prompt": "a\ud800b"}, "prompt"),
        ({"prompt": ["ok", "\udfff"]}, "prompt"),
        ({"prompt": "hi", "sampling_params": {"stop": ["\ud800"]}}, "sampling_params.stop"),
        ({"prompt": "hi", "sampling_params": {"regex": "a\ud800"}}, "sampling_params.regex"),
        ({"prompt": "hi", "sampling_params": {"choices": ["\ud83d"]}}, "sampling_params.choices"),
        (
            {"prompt": "hi", "sampling_params": {"json_schema": {"const": "\ud800"}}},
            "sampling_params.json_schema",
        ),
        ({"prompt": "hi", "rid": "\ud800"}, "rid"),
    ],
)
def test_lone_surrogates_are_refused(eng, kwargs, field):
    _refused(eng, field, **kwargs)


def test_a_huge_prompt_is_refused_before_tokenising(eng, monkeypatch):
    def never(*_a, **_k):
        raise AssertionError("tokenised a prompt that cannot fit")

    monkeypatch.setattr(eng.builder.tokenizer, "encode", never)
    err = _refused(eng, "prompt", prompt="x" * (eng.builder.max_prompt_chars + 1))
    assert "characters" in err.message


def test_n_is_capped_like_the_openai_routes(eng):
    _refused(eng, "sampling_params.n", prompt="hi", sampling_params={"n": 20000})
    _refused(eng, "sampling_params.n", prompt="hi", sampling_params={"n": 129})


def test_max_new_tokens_beyond_the_context_is_a_reported_clamp(eng):
    out = eng.generate("hi", {**GREEDY, "max_new_tokens": 10**12})
    reason = out["meta_info"]["finish_reason"]
    assert reason["type"] == "length"
    assert "clamped" in reason["message"] and "64" in reason["message"]
    assert out["meta_info"]["prompt_tokens"] + out["meta_info"]["completion_tokens"] == 64
    plain = eng.generate("hi", {**GREEDY, "max_new_tokens": 3})["meta_info"]["finish_reason"]
    assert "message" not in plain


def test_a_tiny_top_p_samples_the_most_likely_token(eng):
    greedy = eng.generate("The quick", {**GREEDY, "max_new_tokens": 6})["output_ids"]
    for top_p in (1e-46, 5e-324, 1e-30):
        params = {"temperature": 1.0, "top_p": top_p, "ignore_eos": True, "max_new_tokens": 6}
        assert eng.generate("The quick", {**params, "seed": 1})["output_ids"] == greedy


def test_cancelling_async_generate_aborts_and_frees_kv(eng):
    before = eng.metrics()

    async def main():
        task = asyncio.ensure_future(
            eng.async_generate(
                input_ids=[5, 6, 7], sampling_params={**GREEDY, "max_new_tokens": 60}
            )
        )
        while (await asyncio.to_thread(eng.metrics))["running"] == 0:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    eng.check_invariants()
    after = eng.metrics()
    assert after["aborted_requests"] == before["aborted_requests"] + 1
    assert after["kv_used"] == after["cache_tokens"], "only the radix cache holds KV"
    assert eng._channels == {}


def test_internal_error_in_a_forward_pass_is_logged_counted_and_reported(eng, caplog):
    real = eng.runner.launch
    calls = {"n": 0}

    def broken(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device fell over")
        return real(*args, **kwargs)

    before = eng.metrics()["internal_errors"]
    eng.runner.launch = broken
    try:
        with caplog.at_level(logging.ERROR, logger="sgl_engine.scheduler"):
            out = eng.generate("hi", {**GREEDY, "max_new_tokens": 3}, rid="doomed-1")
    finally:
        del eng.runner.launch
    reason = out["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and "internal error" in reason["message"]
    assert eng.metrics()["internal_errors"] == before + 1
    record = next(r for r in caplog.records if "doomed-1" in r.getMessage())
    assert record.exc_info is not None, "the traceback is logged"
    assert (
        eng.generate("hi", {**GREEDY, "max_new_tokens": 3})["meta_info"]["completion_tokens"] == 3
    )


def test_a_short_request_is_not_starved_behind_a_chunked_long_prompt(tiny_llama, make_engine):
    eng = make_engine(tiny_llama, chunked_prefill_size=64)
    long_ids = [(7 * i) % 400 + 3 for i in range(640)]  # ten chunks of 64
    short_ids = [11, 12, 13]
    finished: list[tuple[str, int]] = []
    real_finish = eng.scheduler.finish

    def finish(req):
        finished.append((req.rid, eng.scheduler.counters.prefill_passes))
        real_finish(req)

    eng.scheduler.finish = finish
    params = [{**GREEDY, "max_new_tokens": 2}, {**GREEDY, "max_new_tokens": 4}]
    outs = eng.generate(input_ids=[long_ids, short_ids], sampling_params=params, rid=["L", "S"])
    order = dict(finished)
    assert order["S"] <= 4, f"the short request waited for the long prefill: {finished}"
    assert order["L"] >= 10
    solo = make_engine(tiny_llama)
    for ids, p, out in zip([long_ids, short_ids], params, outs, strict=True):
        assert solo.generate(input_ids=ids, sampling_params=p)["output_ids"] == out["output_ids"]


@pytest.mark.parametrize(
    "kwargs, prompts, single",
    [
        ({"prompt": "a"}, ["a"], True),
        ({"prompt": ["a", "b"]}, ["a", "b"], False),
        ({"input_ids": [1, 2]}, [[1, 2]], True),
        ({"input_ids": [[1], [2, 3]]}, [[1], [2, 3]], False),
        ({}, [], False),
    ],
)
def test_generate_request_reads_prompts_as_the_engine_does(kwargs, prompts, single):
    """`GenerateRequest` is `generate`'s argument list, shared with forwarding fronts (the
    Ray replicas' engine): prompt normalisation, what is forwarded, unknown names refused."""
    from sgl_engine.inputs import GenerateRequest

    request = GenerateRequest(**kwargs, stream=True)
    assert request.prompts() == (prompts, single)
    assert "stream" not in request.forwarded()
    assert GenerateRequest(**request.forwarded(), stream=True) == request
    with pytest.raises(TypeError):
        GenerateRequest(promt="typo")
