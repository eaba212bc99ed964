"""Where a step's time goes on the GPU (7B-shaped model, random bf16 weights).

    python benchmarks/profile_gpu.py [--small] [--kernels] [--skip-mmlu]

Prints: batch-1 decode through the engine vs the bare CUDA-graph replay (the GPU floor of a
step) and the scheduler thread's cProfile; the MMLU-style workload's per-step timeline
(mode, batch size, wall ms) and cProfile; with --kernels, kernel tables of batch-1 decode and
of the MMLU batch's big prefill (its achieved matmul rate: the lever left for 300 req/s).
Shared-prefix (cascade) attention kernels are compared in cascade_kernels.py.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpu import GPU_ENGINE, mmlu_prompts, model_dir, run_batch, timed  # noqa: E402


def on_scheduler_thread(eng, fn):
    return eng._call(fn)


def profiled(eng, fn, top: int = 25) -> str:
    prof = cProfile.Profile()
    on_scheduler_thread(eng, prof.enable)
    fn()
    on_scheduler_thread(eng, prof.disable)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def step_timeline(eng, fn) -> list[tuple[str, int, float]]:
    sched = eng.scheduler
    steps: list[tuple[str, int, float]] = []
    inner = sched.step

    def step():
        t = time.perf_counter()
        n_prefill = sched.counters.prefill_passes
        out = inner()
        kind = "prefill" if sched.counters.prefill_passes > n_prefill else "run"
        steps.append((kind, len(sched.running), (time.perf_counter() - t) * 1e3))
        return out

    sched.step = step
    try:
        fn()
    finally:
        sched.step = inner
    return steps


def graph_floor(eng, bs: int = 1, reps: int = 100) -> dict:
    """One replay (model, lm_head and greedy pick) back to back: the GPU floor of a step."""
    g = eng.runner.graphs.graphs[bs]
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        g.replay()
    torch.cuda.synchronize()
    return {"replay_ms": (time.perf_counter() - t) / reps * 1e3}


def eager_kernels(eng, tokens: int = 32, top: int = 14) -> list[tuple[str, int, float]]:
    """Kernels of batch-1 decode run eagerly (graphs off): (name, launches per step, us per
    step), the largest first; the same kernels a replay runs."""
    from torch.profiler import ProfilerActivity, profile

    graphs = eng.runner.graphs
    on_scheduler_thread(eng, lambda: setattr(eng.runner, "graphs", None))
    sp = {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True}
    try:
        eng.generate(input_ids=[7, 8, 9], sampling_params=sp)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            eng.generate(input_ids=[7, 8, 9, 10], sampling_params=sp)
    finally:
        on_scheduler_thread(eng, lambda: setattr(eng.runner, "graphs", graphs))
    rows = _kernel_table(prof, per=tokens)
    total = sum(r[2] for r in rows)
    print(
        f"eager bs1 decode: {sum(r[1] for r in rows)} kernels, {total:.0f} us of kernel time/step"
    )
    return rows[:top]


def _kernel_table(prof, per: int = 1, scale: float = 1.0) -> list[tuple[str, int, float]]:
    """The profiled kernels as (name, launches / per, device us / per x scale), largest first."""
    rows = [
        (e.key[:90], e.count // per, e.device_time_total / per * scale)
        for e in prof.key_averages()
        if e.device_time_total > 0
    ]
    return sorted(rows, key=lambda r: -r[2])


def prefill_kernels(eng, prompts: list[list[int]], top: int = 14) -> list[tuple[str, int, float]]:
    """Kernels of the MMLU batch's big prefill (the 63 x 64 own tokens over the cached shared
    prefix; one token each, so the decode steps are left out): (name, launches, ms), the
    largest first, after the achieved rate of the run's matmul work."""
    from torch.profiler import ProfilerActivity, profile

    eng.flush_cache()
    sp = {"max_new_tokens": 1, "temperature": 0, "ignore_eos": True}
    eng.generate(input_ids=prompts[:1], sampling_params=sp)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eng.generate(input_ids=prompts[1:], sampling_params=sp)
    rows = _kernel_table(prof, scale=1e-3)
    tokens = sum(len(p) for p in prompts[1:]) - (len(prompts) - 1) * 1024
    params = sum(p.numel() for p in eng.runner.model.parameters())
    total = sum(r[2] for r in rows)
    if not total:
        return []
    print(
        f"prefill of {tokens} tokens: {sum(r[1] for r in rows)} kernels, {total:.1f} ms of "
        f"kernel time, {2 * params * tokens / total / 1e9:.0f} TFLOP/s of 2 x params x tokens"
    )
    return rows[:top]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument(
        "--kernels",
        action="store_true",
        help="kernel tables: eager bs1 decode, and the MMLU batch's big prefill",
    )
    ap.add_argument("--skip-mmlu", action="store_true")
    args = ap.parse_args()
    from sgl_engine import Engine

    path = model_dir(Path("/tmp/sgl-bench"), args.small)
    common = GPU_ENGINE
    sp = {"max_new_tokens": 128, "temperature": 0, "ignore_eos": True}
    with Engine(str(path), **common) as eng:
        eng.generate(input_ids=[1, 2, 3, 4], sampling_params={**sp, "max_new_tokens": 8})
        dt, _ = timed(lambda: eng.generate(input_ids=[5, 6, 7, 8], sampling_params=sp))
        print(f"bs1 engine: {dt / 127 * 1e3:.3f} ms/token ({127 / dt:.1f} tok/s)")
        print("bs1 floor:", graph_floor(eng))
        steps = step_timeline(eng, lambda: eng.generate(input_ids=[9, 10, 11], sampling_params=sp))
        ms = sorted(s[2] for s in steps)
        print(f"bs1 step wall ms: median {ms[len(ms) // 2]:.3f} p10 {ms[len(ms) // 10]:.3f}")
        print(profiled(eng, lambda: eng.generate(input_ids=[1, 5, 9], sampling_params=sp), 15))
        if args.kernels:
            for name, count, us in eager_kernels(eng):
                print(f"  {us:8.1f} us  x{count:<4d} {name}")
        if args.skip_mmlu:
            return
        prompts = mmlu_prompts(random.Random(0))
        run_batch(eng, prompts[:4], 4)
        dt, _ = run_batch(eng, prompts, 16)
        print(f"mmlu: {64 / dt:.1f} req/s")
        eng.flush_cache()
        steps = step_timeline(eng, lambda: run_batch(eng, prompts, 16))
        print("mmlu steps (kind, running, ms):", [(k, n, round(m, 2)) for k, n, m in steps])
        print("mmlu step kinds:", Counter(k for k, _, _ in steps))
        print(profiled(eng, lambda: run_batch(eng, prompts, 16)))
        if args.kernels:
            for name, count, ms in prefill_kernels(eng, prompts):
                print(f"  {ms:8.2f} ms  x{count:<5d} {name}")


if __name__ == "__main__":
    main()
