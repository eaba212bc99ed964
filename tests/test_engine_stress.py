"""Engine stress (issue 17): many threads, mixed constraints, aborts, cancellations, duplicate
and reused rids, on a KV pool small enough to force eviction and retraction. Afterwards the
invariants hold, no channel or slot leaked, and every greedy output that was not aborted
equals the same request run alone on a fresh engine."""

from __future__ import annotations

import asyncio
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sgl_engine.errors import InvalidRequestError

GREEDY = {"temperature": 0, "ignore_eos": True}
CONSTRAINTS = [
    {},
    {},
    {"regex": r"[a-z]{2,8}@[a-z]{2,6}\.(com|org)"},
    {"json_schema": {"type": "object", "properties": {"n": {"type": "integer"}}}},
    {"choices": ["The quick brown fox", "The lazy dog", "A radix tree"]},
]


def _jobs(seed: int = 7, count: int = 96) -> list[dict]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 390) for _ in range(40)]
    kinds = ["greedy"] * 5 + ["stream_abort", "cancel", "dup_rid", "sampled", "bad"]
    jobs = []
    for i in range(count):
        shared = prefix[: rng.choice((0, 20, 40))]
        ids = shared + [rng.randrange(3, 390) for _ in range(rng.randint(4, 40))]
        params = {**GREEDY, "max_new_tokens": rng.randint(40, 90), **rng.choice(CONSTRAINTS)}
        if "json_schema" in params or "choices" in params:
            params.pop("ignore_eos")  # a finished constraint stops the request
        jobs.append({"i": i, "kind": rng.choice(kinds), "ids": ids, "params": params})
    return jobs


def _run(eng, job: dict, results: dict) -> None:
    kind, ids, params, i = job["kind"], job["ids"], job["params"], job["i"]
    rid = f"reused-{i % 20}"  # rids come back once their request is done
    if kind == "greedy":
        for _ in range(50):
            try:
                results[i] = eng.generate(input_ids=ids, sampling_params=params, rid=rid)
                return
            except InvalidRequestError as exc:  # another thread holds the rid right now
                assert exc.field == "rid"
                threading.Event().wait(0.01)
        results[i] = eng.generate(input_ids=ids, sampling_params=params)
    elif kind == "sampled":
        eng.generate(input_ids=ids, sampling_params={**params, "temperature": 1.0, "seed": i})
    elif kind == "stream_abort":
        stream = eng.generate(
            input_ids=ids,
            sampling_params={**params, "max_new_tokens": 200},
            stream=True,
            rid=f"stream-{i}",
        )
        next(stream)
        eng.abort(f"stream-{i}")
        assert list(stream)[-1]["meta_info"]["finish_reason"]["type"] in ("abort", "length", "stop")
    elif kind == "cancel":

        async def cancel() -> None:
            task = asyncio.ensure_future(
                eng.async_generate(input_ids=ids, sampling_params={**params, "max_new_tokens": 200})
            )
            await asyncio.sleep(0.005 * (i % 4))
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

        asyncio.run(cancel())
    elif kind == "dup_rid":
        with pytest.raises(InvalidRequestError):
            eng.generate(input_ids=[ids, ids], sampling_params=params, rid=["dup", "dup"])
        eng.abort("no-such-request")
    else:
        with pytest.raises(InvalidRequestError):
            eng.generate(input_ids=ids, sampling_params={**params, "top_p": 0.0})


@pytest.mark.slow
def test_stress_threads_constraints_aborts_and_a_tiny_pool(tiny_llama, make_engine):
    jobs = _jobs()
    eng = make_engine(
        tiny_llama, max_total_tokens=256, chunked_prefill_size=96, max_running_requests=24
    )
    results: dict[int, dict] = {}
    with ThreadPoolExecutor(max_workers=24) as ex:
        for fut in [ex.submit(_run, eng, job, results) for job in jobs]:
            fut.result(timeout=300)
    eng.check_invariants()
    assert eng._channels == {}, "a channel leaked"
    m = eng.metrics()
    assert m["retractions"] > 0, "the pool must be small enough to retract"
    assert m["aborted_requests"] > 0 and m["running"] == m["waiting"] == 0
    assert m["kv_used"] == m["cache_tokens"]
    greedy = [job for job in jobs if job["kind"] == "greedy"]
    assert len(results) == len(greedy) >= 20
    solo = make_engine(tiny_llama, max_total_tokens=8192, disable_radix_cache=True)
    for job in greedy:
        out = results[job["i"]]
        assert out["meta_info"]["finish_reason"]["type"] != "abort", out["meta_info"]
        alone = solo.generate(input_ids=job["ids"], sampling_params=job["params"])
        assert alone["output_ids"] == out["output_ids"], job
