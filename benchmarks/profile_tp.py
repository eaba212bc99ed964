"""Where a batch-1 decode step's time goes at TP=1 and at TP=2 (7B shape, random bf16 weights).

    python benchmarks/profile_tp.py [--tp 1,2] [--all-reduce fused] [--decode-gemv triton]
    python benchmarks/profile_tp.py --smoke        # the same steps on the CPU (gloo, tiny model)

For each size, one engine: batch-1 decode tokens/s (bench_gpu's `decode_roofline`), then, while a
long batch-1 decode runs, rank 0's host parts of a step timed (wrappers, no profiler), then a
trace of rank 0's device (torch.profiler, in the engine process, so it works for a TP engine
too) and a cProfile of its scheduler thread over the same steps. Printed per decode step: the
host parts (calls and us), the device's busy time against the step's wall time (the rest is
idle: host work or waiting on a rank), the kernels by name (launches and device us), and the
largest idle gaps with the kernels on either side. The followers are not traced: a rank that lags shows
as rank 0 waiting inside its collectives (their kernels grow).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import pstats
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import decode_roofline, llama_dir  # noqa: E402
from bench_tp import ENGINE, SHAPES, SMOKE_ENGINE, first_token_s  # noqa: E402
from sgl_engine.testing import runner_facts  # noqa: E402

DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
_held: dict[str, Any] = {}  # the engine process's profilers between start and stop


def start_trace(engine) -> int:
    """On the scheduler thread (`inspect`): start both profilers; returns the passes so far."""
    from torch.profiler import ProfilerActivity, profile

    cuda = engine.runner.device.type == "cuda"
    prof = profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU])
    prof.start()
    host = cProfile.Profile()
    host.enable()
    _held.update(prof=prof, host=host, cuda=cuda)
    return engine.scheduler.counters.forward_passes


def stop_trace(engine, passes_before: int, path: str) -> dict:
    """Stop both profilers; the step summary (see the module docstring)."""
    _held["host"].disable()
    prof = _held["prof"]
    if _held["cuda"]:
        torch.cuda.synchronize(engine.runner.device)
    prof.stop()
    steps = engine.scheduler.counters.forward_passes - passes_before
    prof.export_chrome_trace(path)
    out = summarize(json.loads(Path(path).read_text()), steps, _held["cuda"])
    text = io.StringIO()
    stats = pstats.Stats(_held["host"], stream=text).strip_dirs()
    stats.sort_stats("tottime").print_stats(18)
    stats.sort_stats("cumulative").print_stats(30)
    out["host_profile"] = text.getvalue()
    _held.clear()
    return out


def summarize(trace: dict, steps: int, cuda: bool) -> dict:
    """Per-step figures from a chrome trace of `steps` forward passes. Busy time is the union
    of the device events (a kernel launched early, with programmatic dependent launch, overlaps
    the one before it: `overlap_us_per_step`)."""
    cats = DEVICE_CATS if cuda else {"cpu_op"}
    evs = sorted(
        (e for e in trace.get("traceEvents", []) if e.get("cat") in cats and "dur" in e),
        key=lambda e: e["ts"],
    )
    if not evs or steps <= 0:
        return {"steps": steps, "events": len(evs)}
    span = evs[-1]["ts"] + evs[-1]["dur"] - evs[0]["ts"]
    by_name: dict[str, list[float]] = defaultdict(list)
    gaps, busy, end = [], 0.0, evs[0]["ts"]
    prev = evs[0]["name"]
    for e in evs:
        by_name[_label(e)].append(e["dur"])
        if e["ts"] > end:
            gaps.append((e["ts"] - end, prev[:50], e["name"][:50]))
        busy += max(0.0, e["ts"] + e["dur"] - max(end, e["ts"]))
        if e["ts"] + e["dur"] > end:
            end, prev = e["ts"] + e["dur"], e["name"]
    gaps.sort(reverse=True)
    return {
        "steps": steps,
        "events_per_step": len(evs) / steps,
        "wall_us_per_step": span / steps,
        "busy_us_per_step": busy / steps,
        "overlap_us_per_step": (sum(e["dur"] for e in evs) - busy) / steps,
        "idle_us_per_step": (span - busy) / steps,
        "idle_in_gaps_over_20us_per_step": sum(g for g, *_ in gaps if g >= 20) / steps,
        "kernels": sorted(
            ((n, len(d) / steps, sum(d) / steps) for n, d in by_name.items()),
            key=lambda r: -r[2],
        )[:26],
        "largest_gaps": gaps[:8],
    }


def _label(event: dict) -> str:
    """The kernel's name, with its grid for the one-row products (one shape per grid)."""
    name = event["name"]
    if "gemv" in name:
        return f"{name[:40]} grid {event.get('args', {}).get('grid')}"
    return name[:80]


TIMED = {
    "scheduler.step": ("scheduler", "step"),
    "runner.launch": ("runner", "launch"),
    "runner.collect": ("runner", "collect"),
    "runner._build": ("runner", "_build"),
    "graphs.run": ("graphs", "run"),
    "driver.publish": ("driver", "publish"),
}


def _owners(engine) -> dict[str, Any]:
    runner = engine.runner
    return {
        "scheduler": engine.scheduler,
        "runner": runner,
        "graphs": runner.graphs,
        "driver": runner.driver,
        "graph": runner.graphs.graphs[1] if runner.graphs is not None else None,
    }


def start_timers(engine) -> int:
    """On the scheduler thread: time each call of the host's parts of a step (wrappers set as
    instance attributes over the methods; `stop_timers` removes them)."""
    owners = _owners(engine)
    times: dict[str, list[float]] = defaultdict(list)
    parts = dict(TIMED, **({"graph.replay": ("graph", "replay")} if owners["graph"] else {}))
    for key, (owner, name) in parts.items():
        obj = owners[owner]
        if obj is None:
            continue
        inner = getattr(obj, name)

        def timed_call(*a, _inner=inner, _key=key, **kw):
            t = time.perf_counter()
            try:
                return _inner(*a, **kw)
            finally:
                times[_key].append(time.perf_counter() - t)

        setattr(obj, name, timed_call)
    _held.update(times=times, parts=parts)
    return engine.scheduler.counters.forward_passes


def stop_timers(engine, passes_before: int) -> dict:
    """Remove the wrappers; per key: calls per step and mean us per call, over the steps."""
    owners = _owners(engine)
    for owner, name in _held["parts"].values():
        if owners[owner] is not None and name in vars(owners[owner]):
            delattr(owners[owner], name)
    steps = engine.scheduler.counters.forward_passes - passes_before
    times = _held.pop("times")
    return {
        "steps": steps,
        **{k: (len(v) / max(steps, 1), 1e6 * sum(v) / len(v)) for k, v in times.items() if v},
    }


def traced_decode(eng, tokens: int, settle_s: float, window_s: float) -> dict:
    """During a batch-1 decode of `tokens` tokens: the host timers over `window_s`, then the
    trace over the next `window_s` (`settle_s` after the decode starts)."""
    sp = {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True}
    gen = threading.Thread(target=lambda: eng.generate(input_ids=[5, 6, 7, 8], sampling_params=sp))
    gen.start()
    time.sleep(settle_s)
    before = eng.inspect(start_timers)
    time.sleep(window_s)
    host = eng.inspect(stop_timers, before)
    before = eng.inspect(start_trace)
    time.sleep(window_s)
    with tempfile.TemporaryDirectory() as tmp:
        out = eng.inspect(stop_trace, before, str(Path(tmp) / "trace.json"))
    gen.join()
    return dict(out, host_timers=host)


def traced_prompts(eng, n: int) -> dict:
    """`n` one-token generates of a 4-token prompt (a prefill and its sampled token each): the
    median wall time of a generate, the host timers over `n` more, then the trace over `n` more."""
    walls = sorted(first_token_s(eng) for _ in range(n))
    before = eng.inspect(start_timers)
    for _ in range(n):
        first_token_s(eng)
    host = eng.inspect(stop_timers, before)
    before = eng.inspect(start_trace)
    for _ in range(n):
        first_token_s(eng)
    with tempfile.TemporaryDirectory() as tmp:
        out = eng.inspect(stop_trace, before, str(Path(tmp) / "trace.json"))
    return dict(out, host_timers=host, ttft_ms=1e3 * walls[n // 2])


def report(label: str, res: dict) -> None:
    t = res["trace"]
    if "ttft_ms" in t:
        print(f"\n=== {label}: a 1-token generate takes {t['ttft_ms']:.1f} ms (median)")
    else:
        print(f"\n=== {label}: {res['decode_bs1']['ours_tok_s']:.1f} tok/s through the engine")
    if "wall_us_per_step" not in t:
        print(f"no trace events: {t}")
        return
    h = t["host_timers"]
    print(f"host, {h['steps']} steps untraced (calls/step, us/call):")
    for key in [*TIMED, "graph.replay"]:
        if key in h:
            print(f"  {key:18s} {h[key][0]:5.2f} {h[key][1]:8.1f}")
    print(
        f"traced {t['steps']} steps: wall {t['wall_us_per_step']:.0f} us/step, device busy "
        f"{t['busy_us_per_step']:.0f}, idle {t['idle_us_per_step']:.0f} (of it in gaps >= 20 us: "
        f"{t['idle_in_gaps_over_20us_per_step']:.0f}), kernels overlapping "
        f"{t['overlap_us_per_step']:.0f}; {t['events_per_step']:.0f} device events"
    )
    print(f"{'kernel':80s} {'n/step':>7s} {'us/step':>8s}")
    for name, n, us in t["kernels"]:
        print(f"{name:80s} {n:7.1f} {us:8.1f}")
    print("largest idle gaps (us, after, before):")
    for gap, a, b in t["largest_gaps"]:
        print(f"  {gap:8.1f}  {a} -> {b}")
    print(t["host_profile"][:9000])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--all-reduce", default="fused", help="tp_all_reduce of the TP>1 engines")
    ap.add_argument("--decode-gemv", default="triton")
    ap.add_argument("--root", default="/tmp/sgl-bench")
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--prompts", type=int, default=0, help="trace this many 1-token generates")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from sgl_engine import Engine

    shape = "smoke" if args.smoke else "7b"
    path = llama_dir(Path(args.root), f"llama-{shape}-shape", SHAPES[shape])
    base = SMOKE_ENGINE if args.smoke else {**ENGINE, "decode_gemv": args.decode_gemv}
    results: dict = {"date": time.strftime("%Y-%m-%d")}
    for tp in [int(t) for t in args.tp.split(",")]:
        extra = {"tp_all_reduce": "auto" if args.smoke else args.all_reduce} if tp > 1 else {}
        eng = Engine(str(path), **base, **extra, tp_size=tp)
        try:
            facts = eng.inspect(runner_facts)
            if args.prompts:
                bs1, trace = {}, traced_prompts(eng, args.prompts)
            elif args.smoke:
                sp = {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}
                t0 = time.perf_counter()
                eng.generate(input_ids=[5, 6, 7, 8], sampling_params=sp)
                bs1 = {"ours_tok_s": 15 / (time.perf_counter() - t0)}
                trace = traced_decode(eng, 500, 0.3, 0.5)
            else:
                bs1 = decode_roofline(eng, facts["weight_bytes"])
                trace = traced_decode(eng, 900, 0.5, 0.5)
        finally:
            eng.shutdown()
        label = f"tp{tp}" + (f" {facts['all_reduce']}" if tp > 1 else "")
        results[label] = {"decode_bs1": bs1, "trace": trace}
        report(label, results[label])
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
