"""JSON decode (bench_gpu.py's workload) with jump-forward on and off: requests/s over repeated
runs, forward passes, and where each pass's time goes.

    python benchmarks/json_breakdown.py                 # CUDA, the 7B-shaped random model
    python benchmarks/json_breakdown.py --tiny          # CPU, a tiny random model (smoke run)
    python benchmarks/json_breakdown.py --tiny --profile 30  # plus the scheduler's cProfile

One engine serves every mode (switched on the scheduler and runner between them), so the model,
the KV pool and the CUDA graphs are built once; on CUDA the graphs go up to `--graph-max-bs`
rows (bench_gpu.py's 160: a run round after jumps carries ~100 tokens). Modes: jump-forward
with its run rounds unrolled into decode rows (a graph replay on CUDA), jump-forward with those rounds as
eager extends (the behaviour before unrolling), and jump-forward off. Per mode: `--runs` timed
runs, uninstrumented, then one instrumented run whose timers split each scheduler step into
grammar (bitmask fill; token accept and detokenise), jump (forced text, retokenisation),
forward host (batch build, attention plan, kernel launches, sampling), forward device wait
(a synchronize right after the launch), collect and the rest of the scheduler ("scheduler
other"); each section's own time, nested timed calls excluded. Passes are counted as prefill,
run-extend (some running row had several pending tokens: it jumped) and run-decode.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpu import (  # noqa: E402
    GPU_ENGINE,
    JSON_PARAMS,
    _median,
    _sync,
    _valid_city,
    json_prompts,
    llama_dir,
    model_dir,
    timed,
)

TINY = dict(
    vocab_size=32000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=4096,
)
CPU_ENGINE = dict(
    device="cpu", random_weights=True, max_total_tokens=65536, chunked_prefill_size=8192
)


def tiny_model_dir(root: Path, layers: int) -> Path:
    return llama_dir(root, f"json-breakdown-tiny-{layers}", dict(TINY, num_hidden_layers=layers))


class Timers:
    """Seconds per section and pass counts per kind, filled by wrappers on the scheduler thread."""

    def __init__(self, clock=time.perf_counter) -> None:
        self.clock = clock
        self.seconds: dict[str, float] = defaultdict(float)
        self.passes: dict[str, int] = defaultdict(int)
        self.pass_seconds: dict[str, float] = defaultdict(float)
        self.pass_tokens: dict[str, int] = defaultdict(int)
        self.jumped_rows = 0
        self.graph_passes: dict[str, int] = defaultdict(int)
        self.unrolled_passes: dict[str, int] = defaultdict(int)
        self.jumps = 0
        self.kind = "?"
        self._stack: list[float] = []

    def _call(self, section: str, fn, *args):
        """Run fn, adding its time less that of timed calls inside it to `section`."""
        self._stack.append(0.0)
        t = self.clock()
        try:
            return fn(*args)
        finally:
            dt = self.clock() - t
            self.seconds[section] += dt - self._stack.pop()
            if self._stack:
                self._stack[-1] += dt

    def wrap(self, obj, name: str, section: str) -> None:
        inner = getattr(obj, name)
        setattr(obj, name, lambda *args: self._call(section, inner, *args))

    def wrap_launch(self, runner) -> None:
        """Time the launch on the host, then synchronise: the wait is the device's remainder."""
        inner = runner.launch

        def launch(*args):
            self._call("forward device wait", _sync)
            t0 = self.clock()
            out = self._call("forward host", inner, *args)
            self._call("forward device wait", _sync)
            t2 = self.clock()
            seqs = args[1]
            self.passes[self.kind] += 1
            self.pass_seconds[self.kind] += t2 - t0
            self.pass_tokens[self.kind] += sum(len(s.new_ids) for s in seqs)
            if self.kind == "run-extend":
                self.jumped_rows += sum(len(s.new_ids) > 1 for s in seqs)
            return out

        runner.launch = launch

    def wrap_forward(self, runner) -> None:
        """Count the passes that replayed a CUDA graph."""
        inner = runner._forward

        def _forward(*args):
            before = getattr(runner, "unrolled_passes", 0)
            hidden, graph = inner(*args)
            self.graph_passes[self.kind] += graph is not None
            self.unrolled_passes[self.kind] += getattr(runner, "unrolled_passes", 0) - before
            return hidden, graph

        runner._forward = _forward

    def wrap_jump(self, processor) -> None:
        inner = processor.jump_forward

        def jump_forward(req):
            step = self._call("jump", inner, req)
            self.jumps += step is not None
            return step

        processor.jump_forward = jump_forward

    def wrap_kind(self, sched) -> None:
        """Record what the scheduler launches: a prefill round, or a run round of the running
        requests as a decode (one token each) or an extend (some row jumped)."""
        inner = sched._launch

        def _launch(mode, batch, seqs, prefill, *rest):
            self.kind = "prefill" if prefill else f"run-{mode.value}"
            return inner(mode, batch, seqs, prefill, *rest)

        sched._launch = _launch


@contextmanager
def instrumented(eng, clock=time.perf_counter):
    """Install timers on the engine's scheduler, processor and runner for the duration."""
    sched, proc, runner = eng.scheduler, eng.processor, eng.runner
    saved = [
        (obj, name, obj.__dict__.get(name))
        for obj, name in (
            (sched, "step"),
            (sched, "_schedule_prefill"),
            (sched, "_launch"),
            (proc, "fill_bitmask"),
            (proc, "on_token"),
            (proc, "jump_forward"),
            (runner, "launch"),
            (runner, "_forward"),
            (runner, "collect"),
        )
    ]
    timers = Timers(clock)

    def install() -> None:
        timers.wrap(sched, "step", "step")
        timers.wrap(sched, "_schedule_prefill", "admission")
        timers.wrap(proc, "fill_bitmask", "grammar bitmask")
        timers.wrap(proc, "on_token", "token accept+detok")
        timers.wrap_jump(proc)
        timers.wrap_kind(sched)
        timers.wrap_launch(runner)
        timers.wrap_forward(runner)
        timers.wrap(runner, "collect", "collect")

    def restore() -> None:
        for obj, name, value in saved:
            if value is None:
                obj.__dict__.pop(name, None)
            else:
                setattr(obj, name, value)

    eng._call(install)
    try:
        yield timers
    finally:
        eng._call(restore)


def configure(eng, jump: bool, unroll: int) -> None:
    """Jump-forward on or off, and the largest extend (tokens) that runs unrolled (0: none)."""
    sched, runner = eng.scheduler, eng.runner

    def apply() -> None:
        sched.config = sched.config.replace(enable_jump_forward=jump)
        runner.unroll_max_tokens = unroll

    eng._call(apply)


def one_run(eng, prompts) -> dict:
    eng.flush_cache()
    before = eng.metrics()
    dt, outs = timed(lambda: eng.generate(input_ids=prompts, sampling_params=JSON_PARAMS))
    after = eng.metrics()
    return {
        "req_s": len(prompts) / dt,
        "seconds": dt,
        "forward_passes": after["forward_passes"] - before["forward_passes"],
        "prefill_passes": after["prefill_passes"] - before["prefill_passes"],
        "output_tokens": sum(len(o["output_ids"]) for o in outs),
        "forced_tokens": after["forced_tokens"] - before["forced_tokens"],
        "valid": sum(_valid_city(o["text"]) for o in outs),
        "texts": [o["text"] for o in outs],
    }


def breakdown(timers: Timers, run: dict) -> dict:
    """Per pass, each section's own time (time inside nested timed calls is theirs): "step"
    is then the scheduler's remaining work."""
    s = dict(timers.seconds)
    s["scheduler other"] = s.pop("step", 0.0)
    passes = sum(timers.passes.values())
    return {
        "wall_s": run["seconds"],
        "passes": dict(timers.passes),
        "tokens_per_pass": {k: timers.pass_tokens[k] / n for k, n in timers.passes.items()},
        "ms_per_pass_of_kind": {
            k: 1e3 * timers.pass_seconds[k] / n for k, n in timers.passes.items()
        },
        "ms_per_pass": {k: 1e3 * v / passes for k, v in s.items()},
        "graph_passes": dict(timers.graph_passes),
        "unrolled_passes": dict(timers.unrolled_passes),
        "jumps": timers.jumps,
        "jumped_rows_in_extend_passes": timers.jumped_rows,
    }


def profile_run(eng, prompts, top: int) -> str:
    prof = cProfile.Profile()
    eng.flush_cache()
    eng._call(prof.enable)
    eng.generate(input_ids=prompts, sampling_params=JSON_PARAMS)
    eng._call(prof.disable)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def measure(eng, prompts, runs: int, profile: int, unroll: int, clock=time.perf_counter) -> dict:
    results: dict = {}
    default = getattr(eng.runner, "unroll_max_tokens", 0)
    for label, jump, limit in MODES:
        configure(eng, jump, unroll if limit else 0)
        eng.generate(input_ids=prompts, sampling_params=JSON_PARAMS)  # warm every shape once
        rs = [one_run(eng, prompts) for _ in range(runs)]
        with instrumented(eng, clock) as timers:
            run = one_run(eng, prompts)
        res = {
            "unroll_max_tokens": unroll if limit else 0,
            "req_s_runs": [r["req_s"] for r in rs],
            "forward_passes": [r["forward_passes"] for r in rs],
            "prefill_passes": rs[0]["prefill_passes"],
            "output_tokens": rs[0]["output_tokens"],
            "forced_tokens": rs[0]["forced_tokens"],
            "valid": rs[0]["valid"],
            "same_output_each_run": all(r["texts"] == rs[0]["texts"] for r in rs + [run]),
            "texts": rs[0]["texts"],
            "instrumented": {"req_s": run["req_s"], **breakdown(timers, run)},
        }
        results[label] = res
        print(json.dumps({label: {k: v for k, v in res.items() if k != "texts"}}), flush=True)
        if profile:
            print(f"---- cProfile of the scheduler thread, {label} ----")
            print(profile_run(eng, prompts, profile), flush=True)
    a, b = (results[label]["texts"] for label, _, _ in MODES[:2])
    results["unrolled and eager jump-forward give the same records"] = a == b
    configure(eng, True, default)
    eng.check_invariants()
    return results


MODES = [  # label, jump-forward, unrolled extends
    ("jump-forward", True, True),
    ("jump-forward, eager extends", True, False),
    ("no jump-forward", False, False),
]


SECTIONS = [
    "grammar bitmask",
    "token accept+detok",
    "jump",
    "admission",
    "scheduler other",
    "forward host",
    "forward device wait",
    "collect",
]


def table(results: dict) -> str:
    rs = [results[label] for label, _, _ in MODES]
    row = "| {} | " + " | ".join(["{}"] * len(rs)) + " |"
    lines = [
        row.format("", *(label for label, _, _ in MODES)),
        "|---" * (len(rs) + 1) + "|",
        row.format("req/s runs", *(_runs(r["req_s_runs"]) for r in rs)),
        row.format("forward passes", *(r["forward_passes"][0] for r in rs)),
        row.format(
            "output (forced) tokens", *(f"{r['output_tokens']} ({r['forced_tokens']})" for r in rs)
        ),
        row.format("valid records", *(r["valid"] for r in rs)),
    ]
    for kind in ("prefill", "run-extend", "run-decode"):
        cells = []
        for r in rs:
            ins = r["instrumented"]
            n = ins["passes"].get(kind, 0)
            ms = ins["ms_per_pass_of_kind"].get(kind, 0.0)
            tok = ins["tokens_per_pass"].get(kind, 0.0)
            g = ins["graph_passes"].get(kind, 0)
            u = ins["unrolled_passes"].get(kind, 0)
            cells.append(f"{n} x {ms:.2f} ms, {tok:.0f} tok, {u} unrolled, {g} graph" if n else "0")
        lines.append(row.format(f"{kind} passes (synced forward)", *cells))
    for sec in SECTIONS:
        lines.append(
            row.format(
                f"{sec}, ms/pass",
                *(f"{r['instrumented']['ms_per_pass'].get(sec, 0.0):.2f}" for r in rs),
            )
        )
    lines.append(
        row.format("instrumented run, s", *(f"{r['instrumented']['wall_s']:.3f}" for r in rs))
    )
    off = rs[-1]["req_s_runs"]
    for label, r in zip([m[0] for m in MODES[:-1]], rs[:-1], strict=True):
        med = _median(r["req_s_runs"]) / _median(off)
        worst = min(r["req_s_runs"]) / max(off)
        lines.append(f"{label} / no jump-forward: median {med:.2f}x, worst pair {worst:.2f}x")
    return "\n".join(lines)


def _runs(xs: list[float]) -> str:
    return " / ".join(f"{x:.1f}" for x in xs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="CPU, tiny random model")
    ap.add_argument("--tiny-layers", type=int, default=TINY["num_hidden_layers"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--profile", type=int, default=0, help="print the top N of a cProfile")
    ap.add_argument(
        "--graph-max-bs",
        type=int,
        default=GPU_ENGINE["cuda_graph_max_bs"],
        help="CUDA graphs up to this size (an unrolled run round of ~100 tokens must fit)",
    )
    ap.add_argument(
        "--thread-clock",
        action="store_true",
        help="time sections in the scheduler thread's CPU time (steadier on a shared CPU; with "
        "--tiny torch then runs on one thread, so the forward is counted too)",
    )
    ap.add_argument(
        "--unroll", type=int, default=256, help="on CPU: unroll extends of up to this many tokens"
    )
    ap.add_argument("--root", default="/tmp/sgl-bench")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from sgl_engine import Engine

    root = Path(args.root)
    clock = time.thread_time if args.thread_clock else time.perf_counter
    if args.thread_clock and args.tiny:
        torch.set_num_threads(1)
    if args.tiny:
        path, common = tiny_model_dir(root, args.tiny_layers), CPU_ENGINE
    else:
        path = model_dir(root, small=False)
        common = {**GPU_ENGINE, "cuda_graph_max_bs": args.graph_max_bs}
    t = time.perf_counter()
    with Engine(str(path), **common) as eng:
        start = time.perf_counter() - t
        print(json.dumps({"engine_start_s": start}), flush=True)
        graphs = eng.runner.graphs is not None
        unroll = getattr(eng.runner, "unroll_max_tokens", 0) if graphs else args.unroll
        prompts = json_prompts(args.requests)
        results = measure(eng, prompts, args.runs, args.profile, unroll, clock)
    results["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results["engine_start_s"] = start
    print(table(results), flush=True)
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)}))
    if args.json:
        for label, _, _ in MODES:
            results[label].pop("texts")
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
