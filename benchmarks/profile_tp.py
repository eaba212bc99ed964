"""Where a batch-1 decode step's time goes at TP=1 and at TP=2 (7B shape, random bf16 weights).

    python benchmarks/profile_tp.py [--tp 1,2] [--all-reduce fused] [--decode-gemv triton]
    python benchmarks/profile_tp.py --smoke        # the same steps on the CPU (gloo, tiny model)

For each size, one engine: batch-1 decode tokens/s (bench_gpu's `decode_roofline`), then, while a
long batch-1 decode runs, a trace of rank 0's device (torch.profiler, in the engine process, so
it works for a TP engine too) and a cProfile of its scheduler thread over the same steps.
Printed per decode step: the device's busy time against the step's wall time (the rest is idle:
host work or waiting on a rank), the kernels by name (launches and device us), and the largest
idle gaps with the kernels on either side. The followers are not traced: a rank that lags shows
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
from bench_tp import ENGINE, SHAPES, SMOKE_ENGINE  # noqa: E402
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
    pstats.Stats(_held["host"], stream=text).sort_stats("tottime").print_stats(18)
    out["host_profile"] = text.getvalue()
    _held.clear()
    return out


def summarize(trace: dict, steps: int, cuda: bool) -> dict:
    """Per-step figures from a chrome trace of `steps` forward passes."""
    cats = DEVICE_CATS if cuda else {"cpu_op"}
    evs = sorted(
        (e for e in trace.get("traceEvents", []) if e.get("cat") in cats and "dur" in e),
        key=lambda e: e["ts"],
    )
    if not evs or steps <= 0:
        return {"steps": steps, "events": len(evs)}
    span = evs[-1]["ts"] + evs[-1]["dur"] - evs[0]["ts"]
    busy = sum(e["dur"] for e in evs) if cuda else span
    by_name: dict[str, list[float]] = defaultdict(list)
    for e in evs:
        by_name[e["name"][:80]].append(e["dur"])
    gaps = []
    for a, b in zip(evs, evs[1:], strict=False):
        gap = b["ts"] - (a["ts"] + a["dur"])
        if gap > 0:
            gaps.append((gap, a["name"][:50], b["name"][:50]))
    gaps.sort(reverse=True)
    long_gaps = sum(g for g, *_ in gaps if g >= 20)
    return {
        "steps": steps,
        "events_per_step": len(evs) / steps,
        "wall_us_per_step": span / steps,
        "busy_us_per_step": busy / steps,
        "idle_us_per_step": (span - busy) / steps,
        "idle_in_gaps_over_20us_per_step": long_gaps / steps,
        "kernels": sorted(
            ((n, len(d) / steps, sum(d) / steps) for n, d in by_name.items()),
            key=lambda r: -r[2],
        )[:24],
        "largest_gaps": gaps[:8],
    }


def traced_decode(eng, tokens: int, settle_s: float, window_s: float) -> dict:
    """Trace `window_s` of a batch-1 decode of `tokens` tokens, `settle_s` after it starts."""
    sp = {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True}
    gen = threading.Thread(target=lambda: eng.generate(input_ids=[5, 6, 7, 8], sampling_params=sp))
    gen.start()
    time.sleep(settle_s)
    before = eng.inspect(start_trace)
    time.sleep(window_s)
    with tempfile.TemporaryDirectory() as tmp:
        out = eng.inspect(stop_trace, before, str(Path(tmp) / "trace.json"))
    gen.join()
    return out


def report(label: str, res: dict) -> None:
    t = res["trace"]
    print(f"\n=== {label}: {res['decode_bs1']['ours_tok_s']:.1f} tok/s through the engine")
    if "wall_us_per_step" not in t:
        print(f"no trace events: {t}")
        return
    print(
        f"traced {t['steps']} steps: wall {t['wall_us_per_step']:.0f} us/step, device busy "
        f"{t['busy_us_per_step']:.0f}, idle {t['idle_us_per_step']:.0f} (of it in gaps >= 20 us: "
        f"{t['idle_in_gaps_over_20us_per_step']:.0f}); {t['events_per_step']:.0f} device events"
    )
    print(f"{'kernel':80s} {'n/step':>7s} {'us/step':>8s}")
    for name, n, us in t["kernels"]:
        print(f"{name:80s} {n:7.1f} {us:8.1f}")
    print("largest idle gaps (us, after, before):")
    for gap, a, b in t["largest_gaps"]:
        print(f"  {gap:8.1f}  {a} -> {b}")
    print(t["host_profile"][:4000])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--all-reduce", default="fused", help="tp_all_reduce of the TP>1 engines")
    ap.add_argument("--decode-gemv", default="triton")
    ap.add_argument("--root", default="/tmp/sgl-bench")
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true")
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
            if args.smoke:
                sp = {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}
                t0 = time.perf_counter()
                eng.generate(input_ids=[5, 6, 7, 8], sampling_params=sp)
                bs1 = {"ours_tok_s": 15 / (time.perf_counter() - t0)}
                trace = traced_decode(eng, 400, 0.3, 0.5)
            else:
                bs1 = decode_roofline(eng, facts["weight_bytes"])
                trace = traced_decode(eng, 600, 0.5, 0.4)
        finally:
            eng.shutdown()
        label = f"tp{tp}" + (f" {facts['all_reduce']}" if tp > 1 else "")
        results[label] = {"decode_bs1": bs1, "trace": trace}
        report(label, results[label])
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
