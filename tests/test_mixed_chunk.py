"""Mixed chunks (`enable_mixed_chunk`): running requests' next tokens ride along each prefill
pass. Same greedy tokens as without the flag and as solo runs; the running rows really advance
in every chunk pass (a spy on the scheduler's launches); no KV leak (make_engine checks)."""

from __future__ import annotations

import threading
import time

import pytest

GREEDY = {"temperature": 0.0, "ignore_eos": True}
LONG = [[(7 * i) % 400 + 3 for i in range(300)], [(5 * i) % 300 + 9 for i in range(200)]]
SHORT = ["Hello there", "abc", "The sky", "ID: "]
SHORT_PARAMS = [
    {**GREEDY, "max_new_tokens": 12},
    {**GREEDY, "max_new_tokens": 10, "stop": ["I"]},
    {**GREEDY, "max_new_tokens": 16, "regex": r"(yes|no), [0-9]{2}"},
    {**GREEDY, "max_new_tokens": 24, "regex": r"ID-0042: \{ok\} [a-z]{3}"},  # jump-forward
]


def _spy(eng) -> list[list[tuple[str, int, bool]]]:
    """Record each launched pass as (rid, tokens, running row) per sequence."""
    passes: list[list[tuple[str, int, bool]]] = []
    sched = eng.scheduler
    real = sched._launch

    def launch(mode, batch, seqs, prefill, *args):
        passes.append([(r.rid, n, s.running) for (r, n), s in zip(batch, seqs, strict=True)])
        return real(mode, batch, seqs, prefill, *args)

    sched._launch = launch
    return passes


def _run_arriving(eng) -> tuple[list[dict], list[list[tuple[str, int, bool]]]]:
    """The long prompts start prefilling; the short requests are posted while the second
    chunk pass is held back, so they arrive in the middle of the long prefill."""
    passes = _spy(eng)
    sched = eng.scheduler
    spied = sched._launch
    arrived = threading.Event()

    def launch(mode, batch, seqs, prefill, *args):
        if len(passes) == 1 and not arrived.is_set():
            arrived.set()
            deadline = time.monotonic() + 30
            while not eng._inbox and time.monotonic() < deadline:
                time.sleep(0.01)
        return spied(mode, batch, seqs, prefill, *args)

    sched._launch = launch
    longs: list[dict] = []
    params = [{**GREEDY, "max_new_tokens": 6}, {**GREEDY, "max_new_tokens": 5}]
    worker = threading.Thread(
        target=lambda: longs.extend(
            eng.generate(input_ids=LONG, sampling_params=params, rid=["L0", "L1"])
        )
    )
    worker.start()
    assert arrived.wait(60)
    shorts = eng.generate(SHORT, SHORT_PARAMS, rid=[f"S{i}" for i in range(len(SHORT))])
    worker.join(120)
    assert len(longs) == 2
    return longs + shorts, passes


def test_mixed_chunks_give_the_same_tokens_as_without_and_as_solo(tiny_llama, make_engine):
    outs = {}
    for flag in (False, True):
        eng = make_engine(tiny_llama, chunked_prefill_size=64, enable_mixed_chunk=flag)
        outs[flag], passes = _run_arriving(eng)
        eng.check_invariants()
        assert (eng.metrics()["mixed_passes"] > 0) is flag
        mixed = [p for p in passes if {run for *_, run in p} == {True, False}]
        assert bool(mixed) is flag
        if flag:  # a row of several forced tokens (jump-forward) rode along a chunk
            assert any(n > 1 and run for p in mixed for _, n, run in p), passes
    ids = {flag: [o["output_ids"] for o in got] for flag, got in outs.items()}
    assert ids[True] == ids[False]
    assert [o["text"] for o in outs[True]] == [o["text"] for o in outs[False]]
    reasons = {f: [o["meta_info"]["finish_reason"] for o in got] for f, got in outs.items()}
    assert reasons[True] == reasons[False]
    assert reasons[True][3] == {"type": "stop", "matched": "I"}  # the stop string
    assert [r["type"] for r in reasons[True][4:]] == ["stop", "stop"]  # grammars complete
    # with the overlap scheduler too: mixed passes only start when no step is in flight
    eng = make_engine(
        tiny_llama, chunked_prefill_size=64, enable_mixed_chunk=True, overlap_schedule=True
    )
    overlapped, _ = _run_arriving(eng)
    metrics = eng.metrics()
    assert metrics["mixed_passes"] > 0 and metrics["overlapped_passes"] > 0
    assert [o["output_ids"] for o in overlapped] == ids[False]
    solo = make_engine(tiny_llama)
    long_params = [{**GREEDY, "max_new_tokens": 6}, {**GREEDY, "max_new_tokens": 5}]
    for ids_, p, out in zip(LONG, long_params, outs[True][:2], strict=True):
        assert solo.generate(input_ids=ids_, sampling_params=p)["output_ids"] == out["output_ids"]
    for text, p, out in zip(SHORT, SHORT_PARAMS, outs[True][2:], strict=True):
        assert solo.generate(text, p)["output_ids"] == out["output_ids"]


@pytest.mark.parametrize("flag", [True, False])
def test_a_running_request_gets_a_token_in_every_chunk_pass_only_when_mixed(
    tiny_llama, make_engine, flag
):
    eng = make_engine(tiny_llama, chunked_prefill_size=64, enable_mixed_chunk=flag)
    passes = _spy(eng)
    long_ids = [(7 * i) % 400 + 3 for i in range(640)]  # ten chunks of 64
    params = [{**GREEDY, "max_new_tokens": 2}, {**GREEDY, "max_new_tokens": 6}]
    outs = eng.generate(input_ids=[long_ids, [11, 12, 13]], sampling_params=params, rid=["L", "S"])
    chunk_passes = [p for p in passes if any(r == "L" and not run for r, _, run in p)]
    s_running = [p for p in passes if ("S", 1, True) in p]
    assert len(s_running) == 5  # S's first token comes from its prefill, the other five here
    if flag:
        # after S's prefill, every chunk of L carries S's next token until S is done
        first = next(i for i, p in enumerate(chunk_passes) if ("S", 3, False) in p)
        following = chunk_passes[first + 1 : first + 6]
        assert all(("S", 1, True) in p for p in following), passes
        assert all(any(r == "L" and not run for r, _, run in p) for p in s_running)
        assert sum(n for _, n, _ in following[0]) <= 64  # the decode row counts in the budget
        assert eng.metrics()["mixed_passes"] == 5
    else:
        assert not any(any(run for *_, run in p) and any(not run for *_, run in p) for p in passes)
        assert all(p == [("S", 1, True)] for p in s_running)
        assert eng.metrics()["mixed_passes"] == 0
    solo = make_engine(tiny_llama)
    for ids, p, out in zip([long_ids, [11, 12, 13]], params, outs, strict=True):
        assert solo.generate(input_ids=ids, sampling_params=p)["output_ids"] == out["output_ids"]


def test_mixing_under_a_tight_pool_with_retractions(tiny_llama, make_engine):
    """A pool too small for every request: a mixed pass never retracts (its rows must fit as
    they stand); plain run rounds retract and re-admit as without the flag. Outputs stay those
    of solo runs and nothing leaks."""
    eng = make_engine(
        tiny_llama, chunked_prefill_size=32, enable_mixed_chunk=True, max_total_tokens=160
    )
    prompts = [[(3 * i + k) % 200 + 5 for i in range(30 + 10 * k)] for k in range(4)]
    params = {**GREEDY, "max_new_tokens": 60}
    outs = eng.generate(input_ids=prompts, sampling_params=params)
    eng.check_invariants()
    metrics = eng.metrics()
    assert metrics["mixed_passes"] > 0 and metrics["retractions"] > 0
    assert metrics["aborted_requests"] == 0
    solo = make_engine(tiny_llama)
    for ids, out in zip(prompts, outs, strict=True):
        assert (
            solo.generate(input_ids=ids, sampling_params=params)["output_ids"] == out["output_ids"]
        )
