"""Batch-1 matrix-vector products of the 7B shape at TP=1 and at TP=2 (one rank's shard), side by
side: how fast each reads its weight, with the Triton one-row kernel (models/gemv.py, autotuned
per shape) and with cuBLAS (torch's linear). Each call is captured 100 times in a CUDA graph
and replayed; the time per call includes the gaps between kernels, as in a decode step. The
same weight is read 100 times, so a weight that fits the L2 cache (50 MB on an H200: o_proj,
and down at TP=2) reads faster than in a model, where each layer's weight is new: those rows
overstate. The per-step sums (32 layers and the lm_head) say how much of a step the products
are.

  python3 benchmarks/gemv_shapes.py            # one GPU
"""

from __future__ import annotations

import json

import torch
from tp_allreduce_kernels import graph_us  # benchmarks/ is on the path of its scripts

HIDDEN, INTER, VOCAB = 4096, 11008, 32000
SHAPES = {  # name: (N, K) of y[1, N] = x[1, K] W[N, K]^T
    "qkv": (3 * HIDDEN, HIDDEN),
    "o_proj": (HIDDEN, HIDDEN),
    "gate_up": (2 * INTER, HIDDEN),
    "down": (HIDDEN, INTER),
    "lm_head": (VOCAB, HIDDEN),
}


def shard(n: int, k: int, name: str, tp: int) -> tuple[int, int]:
    """One rank's share: column-parallel layers split N, row-parallel ones split K."""
    return (n, k // tp) if name in ("o_proj", "down") else (n // tp, k)


def main() -> None:
    from sgl_engine.models.gemv import gemv

    dev, dtype = torch.device("cuda"), torch.bfloat16
    rows = []
    step = {}
    for tp in (1, 2):
        for name, (n0, k0) in SHAPES.items():
            n, k = shard(n0, k0, name, tp)
            w = torch.randn(n, k, dtype=dtype, device=dev)
            x = torch.randn(1, k, dtype=dtype, device=dev)
            gemv(x, w)  # autotune outside capture
            mb = w.numel() * 2 / 1e6
            row = {"tp": tp, "name": name, "N": n, "K": k, "MB": round(mb, 1)}
            for label, fn in (
                ("triton", lambda x=x, w=w: gemv(x, w)),
                ("cublas", lambda x=x, w=w: torch.nn.functional.linear(x, w)),
            ):
                us = graph_us(fn, 100, 20)
                row[f"{label}_us"] = round(us, 2)
                row[f"{label}_TBps"] = round(mb / us, 3)  # MB per us is TB/s
                times = 1 if name == "lm_head" else 32
                step[(tp, label)] = step.get((tp, label), 0.0) + us * times
            rows.append(row)
            print(json.dumps(row), flush=True)
            del w
    for (tp, label), us in sorted(step.items()):
        print(json.dumps({"tp": tp, "kernel": label, "products_per_step_ms": round(us / 1e3, 3)}))


if __name__ == "__main__":
    main()
