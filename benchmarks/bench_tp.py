"""Tensor parallelism on the GPUs of one host (random bf16 weights, greedy, EOS ignored).

    python benchmarks/bench_tp.py [--phases 7b,70b] [--json out.json]

7b: a Llama-2-7B-shaped model on TP=1 (GPU 0) then TP=2 (GPUs 0-1): greedy tokens compared
position by position (a divergence is excused only where TP=1's top-2 logprobs are a bf16
near-tie), and batch-1 decode tokens/s of both against each one's weight-read roofline.
70b: a Llama-2-70B-shaped model (~138 GB in bf16: more than one H200 holds) on TP=2: the
MMLU-style workload's requests/s and batch-1 decode tokens/s against its roofline.
The roofline of TP=N reads 1/N of the weights per GPU per token (copy bandwidth x N / bytes);
it leaves out the two all-reduces per layer, which batch-1 decode pays in latency.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import copy_bandwidth, mmlu_prompts, timed  # noqa: E402

LLAMA2 = {
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
    "70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
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
NEAR_TIE = 0.05


def model_dir(root: Path, shape: str) -> Path:
    from sgl_engine.testing import make_tiny_tokenizer
    from transformers import LlamaConfig

    path = root / f"llama-{shape}-shape"
    path.mkdir(parents=True, exist_ok=True)
    LlamaConfig(
        **LLAMA2[shape],
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        torch_dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    ).save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


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
        res.append({"ids": o["output_ids"], "gaps": gaps})
    return res


def compare(ref: list[dict], got: list[dict]) -> dict:
    equal, tie, real = 0, [], []
    for r, g in zip(ref, got, strict=True):
        i = next(
            (k for k, (a, b) in enumerate(zip(r["ids"], g["ids"], strict=True)) if a != b), None
        )
        if i is None:
            equal += 1
        elif r["gaps"][i] < NEAR_TIE:
            tie.append((i, round(r["gaps"][i], 4)))
        else:
            real.append((i, round(r["gaps"][i], 4)))
    return {
        "prompts": len(ref),
        "identical": equal,
        "near_tie_divergences": tie,
        "real_divergences": real,
    }


def batch1(eng, nbytes: int, tp: int, bw: float) -> dict:
    sp = {"max_new_tokens": 256, "temperature": 0, "ignore_eos": True}
    eng.generate(input_ids=[1, 2, 3, 4], sampling_params={**sp, "max_new_tokens": 8})
    dt, _ = timed(lambda: eng.generate(input_ids=[5, 6, 7, 8], sampling_params=sp))
    roof = bw * tp / nbytes
    return {"tok_s": 255 / dt, "roofline_tok_s": roof, "fraction": 255 / dt / roof}


def mmlu(eng) -> dict:
    prompts = mmlu_prompts(random.Random(0))
    sp = {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}
    eng.generate(input_ids=prompts[:4], sampling_params={**sp, "max_new_tokens": 4})
    eng.flush_cache()
    dt, _ = timed(lambda: eng.generate(input_ids=prompts, sampling_params=sp))
    return {"req_s": len(prompts) / dt, "seconds": dt}


def model_bytes(eng, tp: int) -> int:
    return tp * sum(p.numel() * p.element_size() for p in eng.runner.model.parameters())


def run(path: Path, tp: int, work) -> dict:
    from sgl_engine import Engine

    t = time.perf_counter()
    eng = Engine(str(path), **ENGINE, tp_size=tp)
    try:
        out = {"startup_s": time.perf_counter() - t}
        out.update(work(eng))
        eng.check_invariants()
        return out
    finally:
        eng.shutdown()
        del eng
        gc.collect()
        torch.cuda.empty_cache()


def phase_7b(root: Path, results: dict, out: str | None, bw: float) -> None:
    path = model_dir(root, "7b")
    probes = {}
    for tp in (1, 2):

        def work(eng, tp=tp):
            probes[tp] = probe(eng)
            return {"decode_bs1": batch1(eng, model_bytes(eng, tp), tp, bw)}

        emit(results, out, **{f"7b tp{tp}": run(path, tp, work)})
    emit(results, out, **{"7b greedy tp2 vs tp1": compare(probes[1], probes[2])})
    r1 = results["7b tp1"]["decode_bs1"]["tok_s"]
    r2 = results["7b tp2"]["decode_bs1"]["tok_s"]
    emit(results, out, **{"7b bs1 speedup tp2/tp1": r2 / r1})


def phase_70b(root: Path, results: dict, out: str | None, bw: float) -> None:
    path = model_dir(root, "70b")

    def work(eng):
        res = {"mmlu": mmlu(eng)}
        res["decode_bs1"] = batch1(eng, model_bytes(eng, 2), 2, bw)
        res["kv_slots"] = eng.runner.num_slots
        return res

    emit(results, out, **{"70b tp2": run(path, 2, work)})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phases", default="7b,70b")
    ap.add_argument("--json", default=None)
    ap.add_argument("--root", default="/tmp/sgl-bench")
    args = ap.parse_args()
    results: dict = {
        "device": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    bw = copy_bandwidth()
    emit(results, args.json, copy_bw_TBps=bw / 1e12)
    phases = {"7b": phase_7b, "70b": phase_70b}
    for name in args.phases.split(","):
        try:
            phases[name](Path(args.root), results, args.json, bw)
        except Exception as exc:  # noqa: BLE001 -- keep the other phase's figures
            emit(results, args.json, **{f"{name} failed": repr(exc)[:2000]})


if __name__ == "__main__":
    main()
