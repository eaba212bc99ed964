"""`ProcessEngine` (a TP engine's front; its scheduler and rank 0 run in a child process):
Engine's API and its unhappy paths across the pipe, and the child's life cycle: it stops with
the engine, at interpreter exit, and when the caller's process is killed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
from sgl_engine.testing import process_gone, wait_until

GREEDY = {"temperature": 0.0, "ignore_eos": True}

pytestmark = pytest.mark.timeout(240)


def _all_gone(pids: list[int], seconds: float) -> None:
    wait_until(lambda: all(process_gone(p) for p in pids), seconds)


@pytest.fixture(scope="module")
def eng(tiny_model_dirs):
    from sgl_engine import Engine
    from sgl_engine.engine_process import ProcessEngine

    engine = Engine(tiny_model_dirs["llama"], device="cpu", max_total_tokens=4096, tp_size=2)
    assert isinstance(engine, ProcessEngine)
    yield engine
    pids = engine.pids
    engine.shutdown()
    _all_gone(pids, 10)


def _slots_used(engine) -> int:
    return engine.runner.num_slots - engine.scheduler.allocator.available()


def test_closing_a_stream_early_aborts_it_in_the_child(eng):
    stream = eng.generate("abc", {**GREEDY, "max_new_tokens": 100000}, stream=True)
    chunks = [next(stream) for _ in range(3)]
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks)
    stream.close()
    eng.check_invariants()  # the child freed its KV: nothing leaked, no lock held
    assert eng.metrics()["aborted_requests"] >= 1


def test_threads_share_batches_and_each_gets_its_own_result(eng, tiny_llama, make_engine):
    prompts = [f"thread {i} says" for i in range(8)]
    ref = make_engine(tiny_llama).generate(prompts, {**GREEDY, "max_new_tokens": 6})
    got: dict[int, dict] = {}

    def ask(i: int) -> None:
        got[i] = eng.generate(prompts[i], {**GREEDY, "max_new_tokens": 6})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [got[i]["output_ids"] for i in range(len(prompts))] == [r["output_ids"] for r in ref]
    eng.check_invariants()


def test_cancelling_an_async_request_aborts_it(eng):
    async def main() -> dict:
        task = asyncio.create_task(eng.async_generate("xyz", {**GREEDY, "max_new_tokens": 100000}))
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        chunks = [c async for c in eng.astream("xyz", {**GREEDY, "max_new_tokens": 4})]
        return chunks[-1]

    last = asyncio.run(main())
    assert last["meta_info"]["finish_reason"]["type"] == "length"
    eng.check_invariants()


def test_bad_requests_fail_alone(eng):
    from sgl_engine.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="input_ids"):
        eng.generate(input_ids=[10**9], sampling_params=GREEDY)
    held = eng.generate("hold", {**GREEDY, "max_new_tokens": 100000}, stream=True, rid="dup")
    next(held)
    with pytest.raises(InvalidRequestError, match="already in use"):
        eng.generate("again", GREEDY, rid="dup")
    held.close()
    bad = eng.generate("x", {**GREEDY, "max_new_tokens": 5, "regex": "(unclosed"})
    assert bad["meta_info"]["finish_reason"]["type"] == "abort"
    assert "invalid constraint" in bad["meta_info"]["finish_reason"]["message"]
    ok = eng.generate("x", {**GREEDY, "max_new_tokens": 8, "regex": "(yes|no)"})
    assert ok["text"] in ("yes", "no")
    eng.check_invariants()


def test_inspect_runs_in_the_child_and_reports_what_it_cannot_send(eng):
    from sgl_engine.testing import runner_facts

    facts = eng.inspect(runner_facts)
    assert facts["all_reduce"] == "device_group" and facts["num_slots"] == 4096
    eng.generate("keep this prefix", {**GREEDY, "max_new_tokens": 2})
    assert eng.inspect(_slots_used) > 0  # the radix cache keeps the prefix
    assert eng.flush_cache() is True
    assert eng.inspect(_slots_used) == 0
    with pytest.raises(RuntimeError, match="cannot be sent"):
        eng.inspect(_unpicklable)
    with pytest.raises(ZeroDivisionError):
        eng.inspect(_raises)


def test_a_submit_the_child_cannot_handle_fails_alone(eng):
    """A failure while the child hands requests to its scheduler finishes those requests with
    an abort saying why; the engine process serves on (it used to end its message loop)."""
    eng.inspect(_break_enqueue)
    try:
        outs = eng.generate(["a", "b"], {**GREEDY, "max_new_tokens": 3})
    finally:
        eng.inspect(_mend_enqueue)
    for out in outs:
        assert out["meta_info"]["finish_reason"]["type"] == "abort"
        assert "internal error" in out["meta_info"]["finish_reason"]["message"]
    assert eng.health() is None
    ok = eng.generate("c", {**GREEDY, "max_new_tokens": 3})
    assert ok["meta_info"]["finish_reason"]["type"] == "length"
    eng.check_invariants()


def _break_enqueue(engine):
    def broken(reqs):
        raise RuntimeError("enqueue broke")

    engine._enqueue = broken


def _mend_enqueue(engine):
    del engine._enqueue


def _unpicklable(engine):
    return threading.Lock()


def _raises(engine):
    return 1 / 0


SCRIPT = """
import os, sys, time
from sgl_engine import Engine

if __name__ == "__main__":
    eng = Engine(sys.argv[1], device="cpu", max_total_tokens=4096, tp_size=2)
    out = eng.generate("hi", {"temperature": 0, "max_new_tokens": 3, "ignore_eos": True})
    print(" ".join(map(str, eng.pids)), out["meta_info"]["finish_reason"]["type"], flush=True)
    if sys.argv[2] == "wait":
        time.sleep(600)
"""


def _start(tmp_path, tiny_llama: str, mode: str) -> tuple[subprocess.Popen, list[int]]:
    script = tmp_path / "front.py"
    script.write_text(textwrap.dedent(SCRIPT))
    proc = subprocess.Popen(
        [sys.executable, str(script), tiny_llama, mode], stdout=subprocess.PIPE, text=True
    )
    *pids, reason = proc.stdout.readline().split()
    assert reason == "length"
    return proc, [int(p) for p in pids]


def test_a_script_that_never_shuts_down_still_exits(tmp_path, tiny_llama):
    """The child is not a daemon (it starts the followers), so without the exit hook the
    interpreter would wait for it forever."""
    proc, pids = _start(tmp_path, tiny_llama, "exit")
    try:
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
    _all_gone(pids, 10)


def test_killing_the_callers_process_takes_the_child_and_followers_down(tmp_path, tiny_llama):
    proc, pids = _start(tmp_path, tiny_llama, "wait")
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        _all_gone(pids, 20)
    finally:
        proc.kill()
