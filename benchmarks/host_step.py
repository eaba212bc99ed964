"""Host (CPU) time per decode step of the MMLU-style batch, old and new KV-index layout side by
side in one run.

    python benchmarks/host_step.py [--runs 5] [--reps 50]

The GPU workload (bench_gpu.py `mmlu_prompts`: 64 requests, a 1024-token shared prefix and 64
own tokens each, 16 greedy new tokens) decodes in CUDA graphs with cascade attention on (the
7B shape is MHA). This machine has no CUDA, so the same engine runs on a tiny random MHA Llama
with `HostGraphs(stub=True)` in place of the graph runner: its choices (which batches replay a
graph, which a cascade graph) are the real ones, but a "replay" runs no model, so a decode
step's time is its host work alone (the flashinfer plan and the CUDA copies are not in it).

Layouts: "old" builds every decode batch's full KV index list and also splits every batch
sharing a long prefix (`runner.full_kv_lists = True`, the code before this change); "new"
splits only batches that will replay a cascade graph and then builds only the split.

Prints, per decode step, in microseconds: `ForwardBatch.build` on the run's real decode
batches and its pieces, the scheduler step's wall time (forward stubbed), and a cProfile of
the decode steps (cumulative time of the scheduler's and runner's parts, per step).
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import pstats
import random
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from sgl_engine import Engine
from sgl_engine.cuda_graph import CASCADE_MIN_PREFIX
from sgl_engine.forward_batch import ForwardBatch, ForwardMode, shared_prefix_len
from sgl_engine.host_graphs import HostGraphs
from sgl_engine.testing import make_tiny_model_dir

LAYOUTS = {"old": True, "new": False}  # label: runner.full_kv_lists
PROFILED = [  # (label, file, function) as cProfile names them
    ("Scheduler.step (all of it)", "scheduler.py", "step"),
    ("  _look_ahead: next step's SeqInputs", "scheduler.py", "_look_ahead"),
    ("  ModelRunner.launch", "model_runner.py", "launch"),
    ("    ModelRunner._build", "model_runner.py", "_build"),
    ("      ForwardBatch.build", "forward_batch.py", "build"),
    ("      shared_prefix_len", "forward_batch.py", "shared_prefix_len"),
    ("    stubbed replay (HostGraphs.run)", "host_graphs.py", "run"),
    ("  _land: collect + per-token bookkeeping", "scheduler.py", "_land"),
    ("    ModelRunner.collect", "model_runner.py", "collect"),
    ("    processor.on_token (detokenize, stops)", "processor.py", "on_token"),
    ("    Scheduler.finish (radix insert, free)", "scheduler.py", "finish"),
    ("  processor.sampling_spec", "processor.py", "sampling_spec"),
]


def mmlu_cpu_prompts(rng: random.Random, vocab: int) -> list[list[int]]:
    """bench_gpu.mmlu_prompts' shape in the tiny vocabulary: 64 x (1024 shared + 64 own)."""
    prefix = [rng.randrange(3, vocab) for _ in range(1024)]
    return [prefix + [rng.randrange(3, vocab) for _ in range(64)] for _ in range(64)]


def make_engine(root: Path) -> Engine:
    path = make_tiny_model_dir(
        root / "llama-mha", num_key_value_heads=4, max_position_embeddings=2048
    )
    eng = Engine(
        str(path),
        device="cpu",
        max_total_tokens=16384,
        chunked_prefill_size=8192,
        overlap_schedule=True,
    )

    def install() -> None:  # as bench_gpu's engine: graphs up to 256 rows, cascade on
        eng.runner.graphs = HostGraphs(eng.runner, max_bs=256, stub=True)
        eng.runner.shared_prefix_min = CASCADE_MIN_PREFIX

    eng._call(install)
    return eng


def set_layout(eng: Engine, label: str) -> None:
    eng._call(lambda: setattr(eng.runner, "full_kv_lists", LAYOUTS[label]))


def generate(eng: Engine, prompts: list[list[int]]) -> list[list[int]]:
    eng.flush_cache()
    sp = {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}
    return [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=sp)]


def is_decode_round(sched) -> bool:
    """Every admitted request is running and none waits: the step is a decode step."""
    return bool(sched.running) and not sched.waiting and sched.chunked is None


def timed_run(eng: Engine, prompts, prof: cProfile.Profile | None = None):
    """One run of the workload: its outputs, the wall time of each decode step (us), and the
    decode batches' kv slot lists (recorded at launch)."""
    sched, runner = eng.scheduler, eng.runner
    inner_step, inner_launch = sched.step, runner.launch
    steps: list[float] = []
    batches: list[list[list[int]]] = []

    def step():
        decode = is_decode_round(sched)
        if decode and prof is not None:
            prof.enable()
        t = time.perf_counter()
        out = inner_step()
        dt = time.perf_counter() - t
        if decode and prof is not None:
            prof.disable()
        if decode:
            steps.append(dt * 1e6)
        return out

    def launch(mode, seqs, *args, **kwargs):
        if mode is ForwardMode.DECODE:
            batches.append([s.kv_slots for s in seqs])
        return inner_launch(mode, seqs, *args, **kwargs)

    def wrap() -> None:
        sched.step, runner.launch = step, launch

    def unwrap() -> None:
        sched.step, runner.launch = inner_step, inner_launch

    eng._call(wrap)
    try:
        outs = generate(eng, prompts)
    finally:
        eng._call(unwrap)
    return outs, steps, batches


def per_call_us(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e6


def build_args(rows: list[list[int]]) -> tuple:
    n = len(rows)
    lens = [len(r) - 1 for r in rows]
    return (
        ForwardMode.DECODE,
        torch.zeros(n, dtype=torch.int64),  # the overlapped step's ids, already a tensor
        lens,
        [r[-1] for r in rows],
        [1] * n,
        lens,
        rows,
        torch.device("cpu"),
    )


def full_list(rows: list[list[int]]) -> np.ndarray:
    """What the old layout added to a cascade-bound batch: every row's slots, flattened."""
    return np.fromiter(itertools.chain.from_iterable(rows), np.int32, count=sum(map(len, rows)))


def own_list(rows: list[list[int]], shared: int) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(r[shared:] for r in rows), np.int32)


def build_table(batches: list[list[list[int]]], reps: int) -> dict[str, dict[str, float]]:
    """`ForwardBatch.build` and its pieces on the run's real decode batches: the mean over the
    batches of each one's time per call (us)."""
    cols: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}

    def add(col: str, label: str, fn) -> None:
        cols[col].setdefault(label, []).append(per_call_us(fn, reps))

    for rows in batches:
        args, shared = build_args(rows), shared_prefix_len(rows)
        add("old", "ForwardBatch.build", partial(ForwardBatch.build, *args, CASCADE_MIN_PREFIX))
        add(
            "new",
            "ForwardBatch.build",
            partial(ForwardBatch.build, *args, CASCADE_MIN_PREFIX, True),
        )
        for col in ("old", "new"):
            add(col, "  shared_prefix_len (binary search)", partial(shared_prefix_len, rows))
            add(col, "  own slots after the prefix", partial(own_list, rows, shared))
        add("old", "  full kv index list", partial(full_list, rows))
        add("new", "  full kv index list", lambda: None)
    return {c: {k: statistics.fmean(v) for k, v in d.items()} for c, d in cols.items()}


def unsplit_table(reps: int) -> list[tuple[str, float, float]]:
    """Batches of the same rows (1024 shared + 70 own slots) that cannot replay a cascade
    graph: the old layout split them anyway, the new one does not (us per build)."""
    rng = random.Random(0)
    prefix = rng.sample(range(1, 1 << 20), 1024)
    out = []
    for n, why in ((4, "under CASCADE_MIN_ROWS"), (300, "over the largest graph")):
        rows = [prefix + rng.sample(range(1 << 20, 1 << 21), 70) for _ in range(n)]
        args = build_args(rows)
        old = per_call_us(partial(ForwardBatch.build, *args, CASCADE_MIN_PREFIX), reps)
        new = per_call_us(partial(ForwardBatch.build, *args, 0), reps)
        out.append((f"  {n} rows ({why})", old, new))
    return out


def profile_table(prof: cProfile.Profile, steps: int) -> dict[str, float]:
    stats = pstats.Stats(prof).stats
    out = {}
    for label, file, name in PROFILED:
        cum = sum(v[3] for (f, _, fn), v in stats.items() if f.endswith(file) and fn == name)
        out[label] = cum / steps * 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5, help="timed runs per layout, interleaved")
    ap.add_argument("--reps", type=int, default=50, help="calls per batch in the build timing")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        eng = make_engine(Path(tmp))
        try:
            report(eng, args)
        finally:
            eng.shutdown()


def report(eng: Engine, args) -> None:
    prompts = mmlu_cpu_prompts(random.Random(10), vocab=500)
    outs, steps, prof = {}, {"old": [], "new": []}, {}
    for label in LAYOUTS:  # warm up both
        set_layout(eng, label)
        outs[label] = timed_run(eng, prompts)[0]
    assert outs["old"] == outs["new"], "the layouts' outputs differ"
    batches = []
    for _ in range(args.runs):
        for label in LAYOUTS:
            set_layout(eng, label)
            out, dts, seen = timed_run(eng, prompts)
            assert out == outs["old"]
            steps[label] += dts
            batches = seen
    for label in LAYOUTS:
        set_layout(eng, label)
        prof[label] = cProfile.Profile()
        n = len(timed_run(eng, prompts, prof[label])[1])
        prof[label] = profile_table(prof[label], n)
    sched_graphs = eng.runner.graphs
    print(
        f"MMLU-style batch: {len(prompts)} requests x ({len(prompts[0])} prompt + 16 new) tokens,"
        f" {len(batches)} decode batches of {sorted({len(b) for b in batches})} rows,"
        f" {statistics.fmean(sum(map(len, b)) for b in batches):.0f} kv slots each;"
        f" {sched_graphs.cascade_replays} cascade / {sched_graphs.plain_replays} plain replays"
    )
    print(f"outputs identical across layouts: {outs['old'] == outs['new']}")
    builds = build_table(batches, args.reps)
    rows = [("ForwardBatch.build on the run's decode batches", None, None)]
    rows += [(k, builds["old"][k], builds["new"][k]) for k in builds["old"]]
    rows.append(("ForwardBatch.build of batches no cascade graph takes", None, None))
    rows += unsplit_table(max(args.reps // 5, 3))
    rows.append(("decode step wall (forward stubbed), median", None, None))
    rows.append(
        ("  Scheduler.step", statistics.median(steps["old"]), statistics.median(steps["new"]))
    )
    rows.append(("cProfile of the decode steps, cumulative, per step", None, None))
    rows += [(k, prof["old"][k], prof["new"][k]) for k in prof["old"]]
    width = max(len(r[0]) for r in rows) + 2
    print(f"{'us per decode step':<{width}}{'old':>10}{'new':>10}{'saved':>10}")
    for label, old, new in rows:
        if old is None:
            print(label)
        else:
            print(f"{label:<{width}}{old:>10.0f}{new:>10.0f}{old - new:>10.0f}")


if __name__ == "__main__":
    main()
