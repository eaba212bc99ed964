"""Prefix reuse, continuous batching under load, retraction, streaming, threads and aborts."""

from __future__ import annotations

import asyncio
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

GREEDY = {"temperature": 0, "ignore_eos": True}


def _prompts(n: int, prefix_len: int, seed: int = 0, lo: int = 3, hi: int = 12):
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 500) for _ in range(prefix_len)]
    return prefix, [
        prefix + [rng.randrange(3, 500) for _ in range(rng.randint(lo, hi))] for _ in range(n)
    ]


def test_shared_prefix_is_prefilled_once_on_a_cold_cache(tiny_llama, make_engine):
    eng = make_engine(tiny_llama)
    prefix, prompts = _prompts(8, 200)
    outs = eng.generate(input_ids=prompts, sampling_params={**GREEDY, "max_new_tokens": 4})
    suffixes = sum(len(p) - len(prefix) for p in prompts)
    m = eng.metrics()
    assert m["prefill_tokens"] == len(prefix) + suffixes
    assert m["cached_tokens"] == 7 * len(prefix)
    assert sum(o["meta_info"]["cached_tokens"] for o in outs) == 7 * len(prefix)
    alone = make_engine(tiny_llama, disable_radix_cache=True)
    for p, o in zip(prompts, outs, strict=True):
        assert (
            alone.generate(input_ids=p, sampling_params={**GREEDY, "max_new_tokens": 4})[
                "output_ids"
            ]
            == o["output_ids"]
        )
    assert alone.metrics()["prefill_tokens"] == sum(len(p) for p in prompts)


def test_without_radix_cache_every_prompt_is_prefilled_in_full(tiny_llama, make_engine):
    eng = make_engine(tiny_llama, disable_radix_cache=True)
    _, prompts = _prompts(6, 100)
    eng.generate(input_ids=prompts, sampling_params={**GREEDY, "max_new_tokens": 2})
    m = eng.metrics()
    assert m["prefill_tokens"] == sum(len(p) for p in prompts)
    assert m["prefill_passes"] == 1, "nothing to wait for without a cache: one prefill round"


def test_overload_200_requests_on_a_pool_for_20(tiny_llama, make_engine):
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(10, 30))] for _ in range(200)]
    params = {**GREEDY, "max_new_tokens": 40}
    pool = 20 * (30 + 40)
    eng = make_engine(tiny_llama, max_total_tokens=pool, chunked_prefill_size=256)
    with ThreadPoolExecutor(max_workers=64) as ex:
        outs = list(ex.map(lambda p: eng.generate(input_ids=p, sampling_params=params), prompts))
    m = eng.metrics()
    assert m["retractions"] > 0, "the test must exercise retraction"
    assert all(o["meta_info"]["finish_reason"]["type"] == "length" for o in outs)
    alone = make_engine(tiny_llama, max_total_tokens=8192, disable_radix_cache=True)
    for p, o in zip(prompts, outs, strict=True):
        assert alone.generate(input_ids=p, sampling_params=params)["output_ids"] == o["output_ids"]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x " * 2000}, "prompt"),
        (
            {"prompt": "hi", "sampling_params": {"max_new_tokens": -1}},
            "sampling_params.max_new_tokens",
        ),
        ({"prompt": "hi", "sampling_params": {"top_p": 0}}, "sampling_params.top_p"),
        ({"prompt": "hi", "sampling_params": {"top_p": 1.5}}, "sampling_params.top_p"),
        ({"prompt": "hi", "sampling_params": {"temprature": 0.5}}, "sampling_params.temprature"),
        ({"input_ids": [1, 2, 10**6]}, "input_ids"),
        ({"input_ids": [1, -2]}, "input_ids"),
        ({"input_ids": []}, "input_ids"),
    ],
)
def test_bad_input_is_refused_for_that_request_only(kwargs, field, tiny_llama, make_engine):
    from sgl_engine.errors import InvalidRequestError

    eng = make_engine(tiny_llama, context_length=512)
    results = {}

    def good():
        results["good"] = eng.generate("The quick brown fox", {**GREEDY, "max_new_tokens": 30})

    t = threading.Thread(target=good)
    t.start()
    with pytest.raises(InvalidRequestError) as err:
        eng.generate(**kwargs)
    assert err.value.field == field
    assert field.split(".")[-1] in str(err.value) or field == "prompt" or field == "input_ids"
    t.join(timeout=60)
    assert results["good"]["meta_info"]["completion_tokens"] == 30
    assert (
        eng.generate("hi", {**GREEDY, "max_new_tokens": 3})["meta_info"]["completion_tokens"] == 3
    )


def test_stream_chunks_add_up_to_the_final_text(tiny_llama, make_engine):
    eng = make_engine(tiny_llama)
    full = eng.generate("The quick", {**GREEDY, "max_new_tokens": 20})
    chunks = list(eng.generate("The quick", {**GREEDY, "max_new_tokens": 20}, stream=True))
    streamed = "".join(c["delta"] for c in chunks[:-1])
    assert full["text"].startswith(streamed) and streamed
    assert streamed + chunks[-1]["delta"] == full["text"]
    for c in chunks[:-1]:
        assert c["meta_info"]["finish_reason"] is None
        assert full["text"].startswith(c["text"])
    assert chunks[-1]["text"] == full["text"]
    assert chunks[-1]["output_ids"] == full["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert len(chunks) > 3


def test_async_generate_and_async_stream(tiny_llama, make_engine):
    eng = make_engine(tiny_llama)
    ref = eng.generate(["hi", "The quick"], {**GREEDY, "max_new_tokens": 8})

    async def main():
        outs = await asyncio.gather(
            eng.async_generate("hi", {**GREEDY, "max_new_tokens": 8}),
            eng.async_generate("The quick", {**GREEDY, "max_new_tokens": 8}),
        )
        chunks = [
            c
            async for c in await eng.async_generate(
                "hi", {**GREEDY, "max_new_tokens": 8}, stream=True
            )
        ]
        return outs, chunks

    outs, chunks = asyncio.run(main())
    assert [o["output_ids"] for o in outs] == [r["output_ids"] for r in ref]
    assert chunks[-1]["output_ids"] == ref[0]["output_ids"]


def test_many_threads_get_their_own_results(tiny_llama, make_engine):
    eng = make_engine(tiny_llama)
    _, prompts = _prompts(24, 20, seed=5)
    seq = [
        eng.generate(input_ids=p, sampling_params={**GREEDY, "max_new_tokens": 6})["output_ids"]
        for p in prompts
    ]
    with ThreadPoolExecutor(max_workers=12) as ex:
        par = list(
            ex.map(
                lambda p: eng.generate(
                    input_ids=p, sampling_params={**GREEDY, "max_new_tokens": 6}
                )["output_ids"],
                prompts,
            )
        )
    assert par == seq
    assert eng.metrics()["forward_passes"] < 24 * 7 * 2


def test_stop_strings_stop_ids_min_tokens_and_eos(tiny_llama, make_engine):
    eng = make_engine(tiny_llama)
    base = eng.generate("The quick", {**GREEDY, "max_new_tokens": 20})
    text, ids = base["text"], base["output_ids"]
    stop = text[5:8]
    out = eng.generate("The quick", {**GREEDY, "max_new_tokens": 20, "stop": [stop]})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == text[: text.index(stop)]
    kept = eng.generate(
        "The quick", {**GREEDY, "max_new_tokens": 20, "stop": stop, "no_stop_trim": True}
    )
    assert kept["text"] == text[: text.index(stop) + len(stop)]
    out = eng.generate("The quick", {**GREEDY, "max_new_tokens": 20, "stop_token_ids": [ids[3]]})
    assert out["output_ids"] == ids[: ids.index(ids[3]) + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": ids[3]}
    out = eng.generate(
        "The quick",
        {**GREEDY, "max_new_tokens": 20, "stop_token_ids": [ids[0]], "min_new_tokens": 5},
    )
    assert len(out["output_ids"]) >= 5 and ids[0] not in out["output_ids"][:4]


def test_seeded_sampling_is_reproducible_across_batches(tiny_llama, make_engine):
    eng = make_engine(tiny_llama)
    sp = {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 12, "seed": 42, "ignore_eos": True}
    a = eng.generate("hi", sp)["output_ids"]
    batch = eng.generate(
        ["The quick", "hi", "a b c"], [{**sp, "seed": 1}, sp, {**sp, "seed": None}]
    )
    assert batch[1]["output_ids"] == a


def test_n_and_abort(tiny_llama, make_engine):
    eng = make_engine(tiny_llama)
    outs = eng.generate(
        "hi", {"temperature": 1.0, "max_new_tokens": 5, "n": 3, "seed": 3, "ignore_eos": True}
    )
    assert len(outs) == 3 and all(len(o["output_ids"]) == 5 for o in outs)
    it = eng.generate("hi", {**GREEDY, "max_new_tokens": 2000}, stream=True, rid="long-one")
    first = next(it)
    assert first["meta_info"]["finish_reason"] is None
    eng.abort("long-one")
    last = list(it)[-1]
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert last["meta_info"]["completion_tokens"] < 2000


def test_flush_cache_and_metrics(tiny_llama, make_engine):
    eng = make_engine(tiny_llama)
    eng.generate("The quick brown fox", {**GREEDY, "max_new_tokens": 3})
    m = eng.metrics()
    assert m["cache_tokens"] > 0 and m["running"] == 0 and m["waiting"] == 0
    assert eng.flush_cache() is True
    assert eng.metrics()["cache_tokens"] == 0
    again = eng.generate("The quick brown fox", {**GREEDY, "max_new_tokens": 3})
    assert again["meta_info"]["cached_tokens"] == 0


def test_one_prefill_round_never_overcommits_the_pool(tiny_llama, make_engine):
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 500) for _ in range(100)] for _ in range(8)]
    eng = make_engine(tiny_llama, max_total_tokens=600, chunked_prefill_size=4096)
    outs = eng.generate(input_ids=prompts, sampling_params={**GREEDY, "max_new_tokens": 4})
    assert all(o["meta_info"]["finish_reason"]["type"] == "length" for o in outs)
    assert eng.metrics()["prefill_passes"] >= 2


def test_an_unexpected_scheduler_error_fails_requests_not_the_engine(tiny_llama, make_engine):
    eng = make_engine(tiny_llama)
    real = eng.scheduler._schedule_prefill
    calls = {"n": 0}

    def broken(*args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(*args)

    eng.scheduler._schedule_prefill = broken
    out = eng.generate("hi", {**GREEDY, "max_new_tokens": 3})
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert "boom" in out["meta_info"]["finish_reason"]["message"]
    assert (
        eng.generate("hi", {**GREEDY, "max_new_tokens": 3})["meta_info"]["completion_tokens"] == 3
    )
