"""Tensor parallelism on the GPUs of one host (random bf16 weights, greedy, EOS ignored).

    python benchmarks/bench_tp.py [--phases 7b,70b] [--json out.json]
    python benchmarks/bench_tp.py --smoke          # the same steps on the CPU (gloo, tiny model)

7b: a Llama-2-7B-shaped model on TP=1 (GPU 0) then TP=2 (GPUs 0-1): greedy tokens compared
position by position (a divergence is excused only where TP=1's top-2 logprobs are a bf16
near-tie), and batch-1 decode tokens/s of both against each one's weight-read roofline.
70b: a Llama-2-70B-shaped model (~138 GB in bf16: more than one H200 holds) on TP=2: the
MMLU-style workload's requests/s and batch-1 decode tokens/s against its roofline.
The roofline of TP=N is the copy bandwidth over the bytes of one rank's shard (each GPU reads
its 1/N of the weights per token); it leaves out the two all-reduces per layer, which batch-1
decode pays in latency. Engine start-up phases are logged with timestamps.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import gc
import json
import logging
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import (  # noqa: E402
    LLAMA2_7B,
    copy_bandwidth,
    decode_roofline,
    llama_dir,
    mmlu_prompts,
    timed,
)
from sgl_engine.testing import runner_facts  # noqa: E402

SHAPES = {
    "7b": LLAMA2_7B,
    "70b": dict(
        LLAMA2_7B,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
    ),
    "smoke": dict(
        LLAMA2_7B,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    ),
}
ENGINE = dict(
    device="cuda",
    dtype="bfloat16",
    random_weights=True,
    attention_backend="flashinfer",
    cuda_graph_max_bs=64,
    chunked_prefill_size=8192,
    mem_fraction_static=0.6,
)
SMOKE_ENGINE = dict(device="cpu", dtype="float32", random_weights=True, max_total_tokens=4096)
NEAR_TIE = 0.05
SHUTDOWN_DUMP_S = 7.0


def emit(results: dict, out: str | None, **new) -> None:
    results.update(new)
    print(json.dumps(new, default=str), flush=True)
    if out:
        Path(out).write_text(json.dumps(results, indent=1, default=str))


def probe(eng, n: int = 16, new: int = 32) -> list[dict]:
    rng = random.Random(1)
    prompts = [[rng.randrange(100, 31000) for _ in range(48)] for _ in range(n)]
    sp = {"max_new_tokens": new, "temperature": 0, "ignore_eos": True}
    outs = eng.generate(
        input_ids=prompts, sampling_params=sp, return_logprob=True, top_logprobs_num=2
    )
    res = []
    for o in outs:
        tops = o["meta_info"]["output_top_logprobs"]
        gaps = [t[0][0] - t[1][0] for t in tops]
        lps = [t[0] for t in o["meta_info"]["output_token_logprobs"]]
        res.append({"ids": o["output_ids"], "gaps": gaps, "lps": lps})
    return res


def compare(ref: list[dict], got: list[dict]) -> dict:
    """Position of each prompt's first differing token and the reference's top-2 gap there.
    `logprob_noise`: the largest difference of the chosen token's logprob at positions before
    the first divergence (how far the two runs' numerics drift apart); a divergence is
    `within_noise` when its gap is under twice that, and a near-tie under NEAR_TIE."""
    equal, tie, real, noise, gaps = 0, [], [], 0.0, []
    for r, g in zip(ref, got, strict=True):
        i = _first_diff(r, g)
        upto = len(r["ids"]) if i is None else i
        for a, b in zip(r["lps"][:upto], g["lps"][:upto], strict=True):
            noise = max(noise, abs(a - b))
        if i is None:
            equal += 1
            continue
        gaps.append(r["gaps"][i])
        (tie if r["gaps"][i] < NEAR_TIE else real).append((i, round(r["gaps"][i], 4)))
    within = sum(gap < 2 * noise for gap in gaps)
    return {
        "prompts": len(ref),
        "identical": equal,
        "near_tie_divergences": tie,
        "real_divergences": real,
        "logprob_noise": round(noise, 4),
        "divergences_within_noise": within,
    }


def _first_diff(r: dict, g: dict) -> int | None:
    pairs = zip(r["ids"], g["ids"], strict=True)
    return next((k for k, (a, b) in enumerate(pairs) if a != b), None)


def first_token_s(eng) -> float:
    """Seconds of a 1-token greedy generate of the prompt batch-1 decode starts from."""
    sp = {"max_new_tokens": 1, "temperature": 0, "ignore_eos": True}
    return timed(lambda: eng.generate(input_ids=[5, 6, 7, 8], sampling_params=sp))[0]


def batch1(eng, smoke: bool) -> dict:
    """Batch-1 decode, median of 3 runs, against the roofline of one rank's shard; with the
    split of a run into its first token (`ttft_ms`: a 1-token generate, median of 5) and the
    255 decode steps after it (`step_ms`)."""
    if not smoke:
        res = decode_roofline(eng, shard_bytes(eng))
        one = sorted(first_token_s(eng) for _ in range(5))[2]
        res["ttft_ms"] = 1e3 * one
        res["step_ms"] = 1e3 * (255 / res["ours_tok_s"] - one) / 255
        return res
    sp = {"max_new_tokens": 32, "temperature": 0, "ignore_eos": True}
    dt, _ = timed(lambda: eng.generate(input_ids=[5, 6, 7, 8], sampling_params=sp))
    return {"ours_tok_s": 31 / dt}


def mmlu(eng) -> dict:
    prompts = mmlu_prompts(random.Random(0))
    sp = {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}
    eng.generate(input_ids=prompts[:4], sampling_params={**sp, "max_new_tokens": 4})
    eng.flush_cache()
    dt, _ = timed(lambda: eng.generate(input_ids=prompts, sampling_params=sp))
    return {"req_s": len(prompts) / dt, "seconds": dt}


def shard_bytes(eng) -> int:
    """Bytes of rank 0's parameters: what each GPU reads per decode step."""
    return eng.inspect(runner_facts)["weight_bytes"]


def run(path: Path, tp: int, work, engine: dict, report) -> None:
    """Start an engine, `report(figures)` (before shutting down: a hang there loses nothing)."""
    from sgl_engine import Engine

    t = time.perf_counter()
    eng = Engine(str(path), **engine, tp_size=tp)
    try:
        out = {"startup_s": time.perf_counter() - t}
        out.update(work(eng))
        eng.check_invariants()
        report(out)
        t = time.perf_counter()
    finally:
        watch = _stack_dumps_after(SHUTDOWN_DUMP_S, eng)
        eng.shutdown()
        watch()
        del eng
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    logging.info("tp=%d engine shut down in %.1f s", tp, time.perf_counter() - t)


def _stack_dumps_after(seconds: float, eng):
    """If shutdown takes over `seconds`, print every rank's thread stacks: the engine process's
    and the followers' once (their SIGUSR1 handler; before the grace period for the followers
    ends), this process's every `seconds` (faulthandler). Returns the cancel function."""
    pids = list(getattr(eng, "pids", []))

    def dump() -> None:
        logging.error("shutdown still running after %.0f s: thread stacks follow", seconds)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGUSR1)

    faulthandler.dump_traceback_later(seconds, repeat=True, exit=False)
    timer = threading.Timer(seconds, dump)
    timer.daemon = True
    timer.start()

    def cancel() -> None:
        faulthandler.cancel_dump_traceback_later()
        timer.cancel()

    return cancel


def phase_7b(root: Path, results: dict, out: str | None, args) -> None:
    shape = "smoke" if args.smoke else args.shape or "7b"
    path = llama_dir(root, f"llama-{shape}-shape", SHAPES[shape])
    engine = SMOKE_ENGINE if args.smoke else {**ENGINE, "decode_gemv": args.decode_gemv}
    probes: dict[str, list[dict]] = {}
    runs = [(tp, mode) for tp in args.tp for mode in (args.all_reduce if tp > 1 else ["-"])]
    for tp, mode in runs:
        label = f"{shape} tp{tp}" + (f" {mode}" if tp > 1 else "")

        def work(eng, label=label):
            probes[label] = probe(eng)
            if args.probes:
                Path(args.probes, f"{label}.json").write_text(json.dumps(probes[label]))
            res = {"all_reduce_path": _path(eng)}
            if not args.probe_only:
                res.update(decode_bs1=batch1(eng, args.smoke), shard_bytes=shard_bytes(eng))
            return res

        def report(res, label=label, tp=tp):
            emit(results, out, **{label: res})
            ref = f"{shape} tp1"
            saved = Path(args.probes or ".", f"{ref}.json")
            if ref not in probes and args.probes and saved.exists():
                probes[ref] = json.loads(saved.read_text())
            if tp == 1 or ref not in probes:
                return
            emit(results, out, **{f"{label}: greedy vs tp1": compare(probes[ref], probes[label])})
            if not args.probe_only and ref in results:
                r1 = results[ref]["decode_bs1"]["ours_tok_s"]
                r2 = res["decode_bs1"]["ours_tok_s"]
                emit(results, out, **{f"{label}: bs1 speedup over tp1": r2 / r1})

        extra = {} if tp == 1 else {"tp_all_reduce": mode}
        run(path, tp, work, {**engine, **extra}, report)


def _path(eng) -> str:
    return eng.inspect(runner_facts)["all_reduce"]


def phase_70b(root: Path, results: dict, out: str | None, args) -> None:
    """The 70B shape on TP=2 with the first of `--all-reduce`'s modes."""
    shape = "smoke" if args.smoke else args.shape or "70b"
    path = llama_dir(root, f"llama-{shape}-shape", SHAPES[shape])
    mode = args.all_reduce[0]

    def work(eng):
        res = {"mmlu": mmlu(eng), "decode_bs1": batch1(eng, args.smoke)}
        res["shard_bytes"] = shard_bytes(eng)
        res["kv_slots"] = eng.inspect(runner_facts)["num_slots"]
        res["all_reduce_path"] = _path(eng)
        return res

    engine = SMOKE_ENGINE if args.smoke else {**ENGINE, "decode_gemv": args.decode_gemv}
    label = f"{shape} tp2 mmlu" + ("" if mode == "auto" else f" {mode}")
    engine = {**engine, "tp_all_reduce": mode}
    run(path, 2, work, engine, lambda r: emit(results, out, **{label: r}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phases", default="7b,70b")
    ap.add_argument("--json", default=None)
    ap.add_argument("--root", default="/tmp/sgl-bench")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU (gloo)")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="another model shape for a phase")
    ap.add_argument("--tp", default="1,2", help="tp sizes of the 7b phase")
    ap.add_argument("--probe-only", action="store_true", help="7b phase: greedy comparison only")
    ap.add_argument("--probes", default=None, help="folder to save/load the greedy probes")
    ap.add_argument(
        "--all-reduce", default="auto", help="tp_all_reduce modes of the 7b phase's TP>1 runs"
    )
    ap.add_argument("--decode-gemv", default="cublas", help="the engine's decode_gemv (GPU)")
    args = ap.parse_args()
    args.tp = [int(t) for t in args.tp.split(",")]
    args.all_reduce = args.all_reduce.split(",")
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cuda = torch.cuda.is_available() and not args.smoke
    results: dict = {
        "device": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
        if cuda
        else "cpu",
        "date": time.strftime("%Y-%m-%d"),
    }
    if cuda:
        emit(results, args.json, copy_bw_TBps=copy_bandwidth() / 1e12)
    phases = {"7b": phase_7b, "70b": phase_70b}
    for name in args.phases.split(","):
        try:
            phases[name](Path(args.root), results, args.json, args)
        except Exception as exc:  # noqa: BLE001 -- keep the other phase's figures
            logging.exception("phase %s failed", name)
            emit(results, args.json, **{f"{name} failed": repr(exc)[:2000]})


if __name__ == "__main__":
    main()
