"""Batch-1 decode's matrix-vector products (y = x W^T for one row) as one Triton kernel.

At one row a linear layer only streams its weight; cuBLAS picks split-K kernels plus a reduce
kernel for some of a 7B model's shapes and reads them below the copy bandwidth. This kernel
gives each program BLOCK_N output features and walks the whole K, accumulating in fp32 (no
split, so results do not depend on the launch), autotuned per (N, K) on the first call (which
must happen outside CUDA-graph capture: the capture warm-up does it).
"""

from __future__ import annotations

import functools

import torch


def _configs():
    import triton

    return [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
        for n, k, w in (
            (4, 512, 4),
            (8, 256, 4),
            (8, 512, 4),
            (16, 256, 4),
            (16, 256, 8),
            (16, 512, 8),
            (32, 128, 4),
            (32, 256, 8),
        )
    ]


@functools.cache
def _build():
    import triton
    import triton.language as tl

    @triton.autotune(configs=_configs(), key=["N", "K"])
    @triton.jit
    def gemv_kernel(
        x_ptr, w_ptr, y_ptr, N, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
    ):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        mask_n = rn < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask_k = (k0 + rk) < K
            w = tl.load(
                w_ptr + rn[:, None] * stride_w + (k0 + rk)[None, :],
                mask=mask_n[:, None] & mask_k[None, :],
                other=0.0,
            )
            x = tl.load(x_ptr + k0 + rk, mask=mask_k, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=mask_n)

    return gemv_kernel


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [1, K] @ weight[N, K]^T -> [1, N] in x's dtype; weight rows contiguous."""
    import triton

    n, k = weight.shape
    x = x.contiguous()
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _build()[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](x, weight, y, n, k, weight.stride(0))
    return y
