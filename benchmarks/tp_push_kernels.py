"""Batch-1 block halves on two GPUs: the fused all-reduce kernel against products that push.

A TP=2 decode step at batch 1 (`--shape`: 7B, or 70B with its grouped k/v) runs, per layer, the products qkv, o, gate_up and
down, and after o and after down an all-reduce of the partial sums with the residual add and
RMSNorm. Two paths, each captured in one CUDA graph of `--layers` layers and replayed:
  fused  the Triton one-row products, then flashinfer's all-reduce + add + RMSNorm kernel
         (tp_all_reduce="fused")
  push   the same products, o and down pushing their partial sums into the peer's buffer as
         their programs finish, then push_norm.py's sum + add + RMSNorm kernel ("push")
Attention is left out (the o product reads the first columns of qkv's output), so the time is
that of the products and the communication only. Before timing, it checks the push path
against the fused one on the same inputs, eagerly for `--rounds` rounds and replayed from a
graph whose number of rounds is not a multiple of the buffer's three rows, and that both ranks
hold the same bits.

  python3 benchmarks/tp_push_kernels.py --layers 32
  python3 benchmarks/tp_push_kernels.py --shape 70b --layers 80
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tp_allreduce_kernels import capture  # noqa: E402

EPS = 1e-5


@dataclass(frozen=True)
class Shape:
    """A model's decode widths: hidden, MLP intermediate, and the q and k/v projections."""

    hidden: int
    inter: int
    q: int
    kv: int


SHAPES = {"7b": Shape(4096, 11008, 4096, 4096), "70b": Shape(8192, 28672, 8192, 1024)}


def _weights(rank: int, layers: int, dev, sh: Shape) -> list[dict]:
    gen = torch.Generator(device=dev).manual_seed(11 + rank)

    def w(n, k):
        return torch.randn(n, k, device=dev, generator=gen, dtype=torch.bfloat16) * k**-0.5

    return [
        {
            "qkv": w((sh.q + 2 * sh.kv) // 2, sh.hidden),
            "o": w(sh.hidden, sh.q // 2),
            "gate_up": w(sh.inter, sh.hidden),
            "down": w(sh.hidden, sh.inter // 2),
            "ln": torch.rand(sh.hidden, device=dev, generator=gen, dtype=torch.bfloat16) + 0.5,
        }
        for _ in range(layers)
    ]


def _chain(tp, layers, x, res, path: str, sh: Shape):
    """One decode step's products and block-half reductions; returns the last (norm, res)."""
    from sgl_engine.models.gemv import gemv

    for lw in layers:
        a = gemv(x, lw["qkv"])[:, : sh.q // 2]
        x, res = _half(tp, a, lw["o"], res, lw["ln"], path)
        gu = gemv(x, lw["gate_up"])
        h = torch.nn.functional.silu(gu[:, : sh.inter // 2]) * gu[:, sh.inter // 2 :]
        x, res = _half(tp, h, lw["down"], res, lw["ln"], path)
    return x, res


def _half(tp, a, w, res, ln, path):
    from sgl_engine.models.gemv import gemv

    if path == "push":
        return tp.push(tp.push.product(a, w), res, ln, EPS)
    return tp.fused(gemv(a, w), res, ln, EPS)


def _check(tp, dev, rounds: int, hidden: int) -> dict:
    """The push path's (norm, residual) against the fused path's, on the same partial sums."""
    gen = torch.Generator(device=dev).manual_seed(5 + tp.rank)
    shared = torch.Generator(device=dev).manual_seed(99)
    w = torch.randn(hidden, 1024, device=dev, generator=shared, dtype=torch.bfloat16) / 32
    ln = torch.rand(hidden, device=dev, generator=shared, dtype=torch.bfloat16) + 0.5
    worst = {"norm": 0.0, "residual": 0.0}

    def compare(got, want):
        for name, g, r in zip(("norm", "residual"), got, want, strict=True):
            worst[name] = max(worst[name], (g.float() - r.float()).abs().max().item())

    for i in range(rounds):
        a = torch.randn(1, 1024, device=dev, generator=gen, dtype=torch.bfloat16)
        if i % 7 == 0:
            a[:, :] = 0  # all-zero partial sums: +0.0 is data, only -0.0 means empty
        res = torch.randn(1, hidden, device=dev, generator=shared, dtype=torch.bfloat16)
        compare(tp.push(tp.push.product(a, w), res, ln, EPS), tp.fused(_gemv(a, w), res, ln, EPS))
    a_in = torch.zeros(1, 1024, device=dev, dtype=torch.bfloat16)
    res_in = torch.zeros(1, hidden, device=dev, dtype=torch.bfloat16)

    def seven():
        outs = []
        for _ in range(7):
            outs.append(tp.push(tp.push.product(a_in, w), res_in, ln, EPS))
        return outs

    graph, outs = capture(seven, warmups=2)
    for _ in range(5):
        a_in.copy_(torch.randn(1, 1024, device=dev, generator=gen, dtype=torch.bfloat16))
        res_in.copy_(torch.randn(1, hidden, device=dev, generator=shared, dtype=torch.bfloat16))
        graph.replay()
        want = tp.fused(_gemv(a_in, w), res_in, ln, EPS)
        for got in outs:
            compare(got, want)
    torch.cuda.synchronize()
    mine = torch.cat([outs[-1][0], outs[-1][1]], dim=1)
    both = [torch.empty_like(mine) for _ in range(2)]
    dist.all_gather(both, mine, group=tp.device_group)
    worst["ranks_bit_equal"] = bool(torch.equal(both[0], both[1]))
    worst["rounds"] = int(tp.push.round.item())
    return worst


def _gemv(a, w):
    from sgl_engine.models.gemv import gemv

    return gemv(a, w)


def worker(rank: int, init: str, args, out: str) -> None:
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    torch.cuda.set_device(rank)
    from sgl_engine.distributed.group import init_group

    dev = torch.device("cuda", rank)
    tp = init_group(rank, 2, init, dev, 120.0)
    sh = SHAPES[args.shape]
    tp.enable_fast_paths("push", torch.bfloat16, dev, sh.hidden)
    result = {"shape": args.shape, "check": _check(tp, dev, args.rounds, sh.hidden)}
    layers = _weights(rank, args.layers, dev, sh)
    x0 = torch.randn(
        1,
        sh.hidden,
        device=dev,
        dtype=torch.bfloat16,
        generator=torch.Generator(device=dev).manual_seed(1),
    )
    for path in ("fused", "push", "fused", "push"):
        graph, _ = capture(lambda p=path: _chain(tp, layers, x0, x0.clone(), p, sh), warmups=2)
        graph.replay()
        torch.cuda.synchronize()
        tp.min_int(1)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        us = start.elapsed_time(end) * 1e3 / args.reps
        result.setdefault(f"{path}_us_per_step", []).append(round(us, 1))
        del graph
    if rank == 0:
        print(json.dumps(result), flush=True)
        with open(out, "w") as fh:
            json.dump(result, fh)
    tp.min_int(1)
    torch.cuda.synchronize()
    tp.drop_fast_paths()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    out = args.json or os.path.join(tmp, "out.json")
    mp.start_processes(worker, (f"file://{tmp}/rdv", args, out), nprocs=2, start_method="spawn")
    print(open(out).read())


if __name__ == "__main__":
    main()
