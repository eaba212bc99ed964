"""Tensor parallelism on the CPU (gloo): TP=2 equals TP=1, a dead rank (a follower or the engine
process holding rank 0) fails its requests with a clear error, and shutdown leaves no process or
process group behind. The test process itself never joins a group: a TP engine runs in a child."""

from __future__ import annotations

import os
import re
import signal
import time

import httpx
import pytest
import torch.distributed as dist
from sgl_engine.server import ServerThread, create_app
from sgl_engine.testing import process_gone, wait_until

GREEDY = {"temperature": 0.0, "ignore_eos": True}
PROMPTS = [
    "The quick brown fox",
    "The quick brown fox jumps over the lazy dog. A radix tree",
    "Question: What is the capital of France? Answer:",
    "0123456789 abcdef",
]

pytestmark = pytest.mark.timeout(240)


def _run(eng) -> list[dict]:
    params = [{**GREEDY, "max_new_tokens": 12 + i} for i in range(len(PROMPTS))]
    outs = eng.generate(PROMPTS, params, return_logprob=True, logprob_start_len=0)
    # a second round reuses the radix cache (prefix hits) and decodes a bigger batch
    outs += eng.generate([p + " again" for p in PROMPTS], {**GREEDY, "max_new_tokens": 8})
    return outs


@pytest.mark.parametrize(
    ("arch", "extra"),
    [("llama", {"overlap_schedule": True}), ("qwen2", {"random_weights": True})],
    ids=["llama-checkpoint-overlap", "qwen2-random-weights"],
)
def test_tp2_greedy_equals_tp1(tiny_model_dirs, make_engine, arch, extra):
    """Sharded loading (llama, with the overlapped decode handing ids over on the device) and
    sharded random init (qwen2, with q/k/v biases) both give TP=1's tokens and logprobs."""
    from sgl_engine import Engine

    path = tiny_model_dirs[arch]
    ref = _run(make_engine(path, random_weights=extra.get("random_weights", False)))
    eng = Engine(path, device="cpu", max_total_tokens=4096, tp_size=2, **extra)
    try:
        pids = eng.pids
        assert len(pids) == 2 and not dist.is_initialized()
        got = _run(eng)
        assert eng.metrics()["cached_tokens"] > 0
        if arch == "llama":  # what `serve --tp 2` serves: the HTTP app over this engine
            body = {"text": PROMPTS[0], "sampling_params": {**GREEDY, "max_new_tokens": 12}}
            with ServerThread(create_app(eng)) as srv:
                http = httpx.post(f"{srv.base_url}/generate", json=body, timeout=60).json()
            assert http["output_ids"] == ref[0]["output_ids"]
        eng.check_invariants()
    finally:
        eng.shutdown()
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in ref]
    for a, b in zip(got[: len(PROMPTS)], ref[: len(PROMPTS)], strict=True):
        lp_a = [lp for lp, *_ in a["meta_info"]["input_token_logprobs"][1:]]
        lp_b = [lp for lp, *_ in b["meta_info"]["input_token_logprobs"][1:]]
        assert lp_a == pytest.approx(lp_b, abs=1e-4)
    assert all(process_gone(pid) for pid in pids)
    assert not dist.is_initialized()


def test_tp2_mixed_chunks_equal_tp1(tiny_llama, make_engine):
    """Mixed passes (prefill rows plus running rows, some of several jump-forward tokens, one
    constrained) replay on the follower from the plan as any extend: TP=1's tokens."""
    long_ids = [(7 * i) % 400 + 3 for i in range(200)]
    prompts = [long_ids, [11, 12, 13], [21, 22], [31, 32, 33, 34]]
    params = [{**GREEDY, "max_new_tokens": n} for n in (4, 12, 10)] + [
        {**GREEDY, "max_new_tokens": 16, "regex": r"(yes|no), [0-9]{2}"}
    ]
    ref = make_engine(tiny_llama, chunked_prefill_size=32).generate(
        input_ids=prompts, sampling_params=params
    )
    from sgl_engine import Engine

    eng = Engine(
        tiny_llama,
        device="cpu",
        max_total_tokens=4096,
        tp_size=2,
        chunked_prefill_size=32,
        enable_mixed_chunk=True,
    )
    try:
        got = eng.generate(input_ids=prompts, sampling_params=params)
        assert eng.metrics()["mixed_passes"] > 0
        eng.check_invariants()
    finally:
        eng.shutdown()
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in ref]


def _later_requests_abort_alike(eng, reason: dict) -> None:
    """After the group broke with `reason`, a new request aborts at once with its message, and
    no KV slot or lock is left behind."""
    later = eng.generate("again", {**GREEDY, "max_new_tokens": 3})
    assert later["meta_info"]["finish_reason"]["message"] == reason["message"]
    eng.check_invariants()


def test_a_killed_rank_fails_its_requests_and_the_engine_shuts_down(tiny_llama):
    from sgl_engine import Engine

    # tp_timeout_s=10: heartbeats every 1 s, so the idle follower gets some before the step
    eng = Engine(tiny_llama, device="cpu", max_total_tokens=4096, tp_size=2, tp_timeout_s=10)
    try:
        core, pid = eng.pids
        time.sleep(2.5)  # idle: the follower gets heartbeats on the control group, then a step
        assert (
            eng.generate("hi", {**GREEDY, "max_new_tokens": 4})["meta_info"]["finish_reason"][
                "type"
            ]
            == "length"
        )
        stream = eng.generate("hi", {**GREEDY, "max_new_tokens": 100000}, stream=True)
        first = next(stream)
        assert first["meta_info"]["finish_reason"] is None
        os.kill(pid, signal.SIGKILL)
        last = list(stream)[-1]
        reason = last["meta_info"]["finish_reason"]
        assert reason["type"] == "abort"
        assert "tensor-parallel rank 1" in reason["message"]
        assert "SIGKILL" in reason["message"]
        later = eng.generate("hello", {**GREEDY, "max_new_tokens": 3})
        assert later["meta_info"]["finish_reason"]["type"] == "abort"
        assert "tensor-parallel rank 1" in later["meta_info"]["finish_reason"]["message"]
        eng.check_invariants()
    finally:
        eng.shutdown()
    assert process_gone(pid) and process_gone(core)
    assert not dist.is_initialized()


def test_a_rank_that_hangs_fails_its_requests_within_tp_timeout(tiny_llama):
    """A follower that stops answering but keeps its sockets open (SIGSTOP) is found by the
    bound on the control group: the request aborts within about tp_timeout_s saying the ranks
    are out of step, later ones at once, health says so, and the stopped rank is killed."""
    from sgl_engine import Engine

    eng = Engine(tiny_llama, device="cpu", max_total_tokens=4096, tp_size=2, tp_timeout_s=3)
    try:
        core, pid = eng.pids
        first = eng.generate("hi", {**GREEDY, "max_new_tokens": 3})
        assert first["meta_info"]["finish_reason"]["type"] == "length"
        os.kill(pid, signal.SIGSTOP)
        start = time.monotonic()
        reason = eng.generate("hello", {**GREEDY, "max_new_tokens": 3})["meta_info"][
            "finish_reason"
        ]
        assert time.monotonic() - start < 30
        assert reason["type"] == "abort"
        # gloo words its timeout "Timed out waiting ..." or "Application timeout caused pair
        # closure", depending on which side of the pair notices first
        assert re.search("timed? ?out", reason["message"], re.IGNORECASE), reason["message"]
        assert "out of step" in reason["message"]
        assert "out of step" in eng.health()
        wait_until(lambda: process_gone(pid), timeout_s=30)  # killed while stopped
        _later_requests_abort_alike(eng, reason)
    finally:
        eng.shutdown()
    assert process_gone(pid) and process_gone(core)


def test_rank_0_failing_inside_a_step_stops_the_group_instead_of_leaving_it_out_of_step(
    tiny_llama,
):
    """Rank 0 raises after the followers were told to run the step: they wait in its
    collectives, so the engine must not go on pairing later steps' collectives with them."""
    from sgl_engine import Engine
    from sgl_engine.testing import fail_once

    eng = Engine(tiny_llama, device="cpu", max_total_tokens=4096, tp_size=2, tp_timeout_s=10)
    try:
        core, pid = eng.pids
        ok = eng.generate("hi", {**GREEDY, "max_new_tokens": 3})
        assert ok["meta_info"]["finish_reason"]["type"] == "length"
        eng.inspect(fail_once, "forward")
        reason = eng.generate("hello", {**GREEDY, "max_new_tokens": 3})["meta_info"][
            "finish_reason"
        ]
        assert reason["type"] == "abort"
        assert "rank 0 failed part-way through a step" in reason["message"]
        assert "injected failure (forward)" in reason["message"]
        assert "out of step" in reason["message"] and "out of step" in eng.health()
        _later_requests_abort_alike(eng, reason)
    finally:
        eng.shutdown()
    assert process_gone(pid) and process_gone(core)


def test_rank_0_failing_after_the_collectives_fails_the_step_and_the_ranks_stay_in_step(
    tiny_llama,
):
    """The grammar mask is rank 0's alone and is filled after the step's last collective: its
    error fails that step's requests, and the next steps still give TP=2's tokens."""
    from sgl_engine import Engine
    from sgl_engine.testing import fail_once

    eng = Engine(tiny_llama, device="cpu", max_total_tokens=4096, tp_size=2, tp_timeout_s=10)
    try:
        want = [o["text"] for o in _run(eng)]
        eng.flush_cache()
        eng.inspect(fail_once, "bitmask")
        failed = eng.generate("hello", {**GREEDY, "max_new_tokens": 3})["meta_info"]
        assert failed["finish_reason"]["type"] == "abort"
        assert "internal error" in failed["finish_reason"]["message"]
        assert not eng.health()
        assert [o["text"] for o in _run(eng)] == want
        eng.check_invariants()
    finally:
        eng.shutdown()


def test_shutdown_kills_a_rank_that_does_not_take_the_stop(tiny_llama):
    from sgl_engine import Engine

    eng = Engine(tiny_llama, device="cpu", max_total_tokens=4096, tp_size=2, tp_timeout_s=120)
    core, pid = eng.pids
    os.kill(pid, signal.SIGSTOP)  # idle and long before tp_timeout_s: nothing has noticed
    start = time.monotonic()
    eng.shutdown()
    assert time.monotonic() - start < 30  # not tp_timeout_s
    assert process_gone(pid) and process_gone(core)


def test_a_killed_engine_process_fails_its_requests_and_calls(tiny_llama):
    """Rank 0's process (the engine's child) killed mid-stream: the stream ends with an abort
    naming it, later requests end so at once, calls raise, shutdown returns; nothing is left."""
    from sgl_engine import Engine
    from sgl_engine.errors import EngineUnavailableError

    eng = Engine(tiny_llama, device="cpu", max_total_tokens=4096, tp_size=2)
    try:
        pids = eng.pids
        stream = eng.generate("hi", {**GREEDY, "max_new_tokens": 100000}, stream=True)
        first = next(stream)
        assert first["meta_info"]["finish_reason"] is None
        os.kill(pids[0], signal.SIGKILL)
        last = list(stream)[-1]
        reason = last["meta_info"]["finish_reason"]
        assert reason["type"] == "abort"
        assert f"engine process (pid {pids[0]}) was killed by SIGKILL" in reason["message"]
        assert last["text"].startswith(first["text"])
        later = eng.generate(["a", "b"], {**GREEDY, "max_new_tokens": 3})
        assert [r["meta_info"]["finish_reason"]["type"] for r in later] == ["abort", "abort"]
        with pytest.raises(EngineUnavailableError, match="SIGKILL"):
            eng.metrics()
    finally:
        eng.shutdown()
    wait_until(lambda: all(process_gone(p) for p in pids), 10)  # the follower follows


def test_tp_size_must_divide_the_heads(tiny_llama):
    from sgl_engine import Engine

    with pytest.raises(ValueError, match="not divisible by tp_size"):
        Engine(tiny_llama, device="cpu", tp_size=3)
    assert not dist.is_initialized()


def test_serve_tp_flag_reaches_the_engine(monkeypatch):
    import argparse

    from sgl_engine.server import launch

    seen: dict = {}
    monkeypatch.setattr(launch, "serve", lambda model, host, port, **kw: seen.update(kw))
    parser = launch.add_serve_arguments(argparse.ArgumentParser())
    launch.serve_from_args(parser.parse_args(["--tp", "2"]))
    assert seen["tp_size"] == 2


def test_a_hung_group_teardown_is_bounded_and_logged(monkeypatch, caplog):
    """A communicator whose teardown never returns costs an error in the log, not a hung
    shutdown (the teardown thread is left behind, a daemon)."""
    import threading

    from sgl_engine.distributed import group as group_mod

    release = threading.Event()
    monkeypatch.setattr(group_mod.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(group_mod, "_destroy", lambda group, abort: release.wait(30))
    try:
        assert group_mod.destroy_group(None, timeout_s=0.2) is False
        assert "did not finish in 0 s" in caplog.text
    finally:
        release.set()
    monkeypatch.setattr(group_mod, "_destroy", lambda group, abort: None)
    assert group_mod.destroy_group(None, timeout_s=5) is True
