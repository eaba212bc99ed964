"""Batch-1 decode's elementwise ops fused into the matrix-vector product that follows them.

At one row a decoder layer is weight streaming plus a few hundred tiny kernels per step; these
two Triton kernels remove three of them per layer (models/llama.py DecoderLayer, with
`decode_gemv="fused"`):

- `gemv_add_rmsnorm`: residual add + RMSNorm, then the qkv or gate_up projection;
- `gemv_silu_mul`: SiLU-and-mul, then the down projection.

Each program owns BLOCK_N output features and walks the whole input row once (a few thousand
elements, read from L2 by every program) beside its weight rows. `gemv_add_rmsnorm` applies the
row's rms, a scalar, after the dot product (W (gamma * r)) / rms(r), so the row is read in the
same pass as the weights: a first version that computed the rms in a pass of its own before
any weight load ran batch-1 decode 18% slower on an H200. It therefore skips TorchOps' bf16
rounding of the normed row (each element within one bf16 step of it); `gemv_silu_mul`
keeps TorchOps' roundings (models/ops.py) and equals `gemv(silu_mul(x), w)` up to fp32
accumulation order. Autotuned per (N, K) like models/gemv.py, on the first call, which
must happen outside CUDA-graph capture (the capture's warm-up does it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sgl_engine.models.gemv import configs


@functools.cache
def _build() -> tuple:
    import triton
    import triton.language as tl

    @triton.autotune(configs=configs(), key=["N", "K"])
    @triton.jit
    def add_rmsnorm_kernel(
        x_ptr,
        res_ptr,
        gamma_ptr,
        w_ptr,
        y_ptr,
        res_out_ptr,
        N,
        K,
        stride_w,
        eps,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        dtype = x_ptr.dtype.element_ty
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        mask_n = rn < N
        sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask_k = (k0 + rk) < K
            w = tl.load(
                w_ptr + rn[:, None] * stride_w + (k0 + rk)[None, :],
                mask=mask_n[:, None] & mask_k[None, :],
                other=0.0,
            )
            r = tl.load(x_ptr + k0 + rk, mask=mask_k, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                r += tl.load(res_ptr + k0 + rk, mask=mask_k, other=0.0).to(tl.float32)
                r = r.to(dtype)
                mine = ((k0 + rk) // BLOCK_K) % tl.num_programs(0) == pid
                tl.store(res_out_ptr + k0 + rk, r, mask=mask_k & mine)
                r = r.to(tl.float32)
            sq += r * r
            g = tl.load(gamma_ptr + k0 + rk, mask=mask_k, other=0.0).to(tl.float32)
            acc += w.to(tl.float32) * (g * r)[None, :]
        rstd = tl.rsqrt(tl.sum(sq, axis=0) / K + eps)
        y = tl.sum(acc, axis=1) * rstd
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=mask_n)

    @triton.autotune(configs=configs(), key=["N", "K"])
    @triton.jit
    def silu_mul_kernel(
        x_ptr, w_ptr, y_ptr, N, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
    ):
        dtype = x_ptr.dtype.element_ty
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        mask_n = rn < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask_k = (k0 + rk) < K
            gate = tl.load(x_ptr + k0 + rk, mask=mask_k, other=0.0).to(tl.float32)
            up = tl.load(x_ptr + K + k0 + rk, mask=mask_k, other=0.0).to(tl.float32)
            silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
            h = (silu * up).to(dtype).to(tl.float32)
            w = tl.load(
                w_ptr + rn[:, None] * stride_w + (k0 + rk)[None, :],
                mask=mask_n[:, None] & mask_k[None, :],
                other=0.0,
            )
            acc += w.to(tl.float32) * h[None, :]
        tl.store(y_ptr + rn, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=mask_n)

    return add_rmsnorm_kernel, silu_mul_kernel


def _grid(n: int) -> Callable[[dict], tuple[int]]:
    return lambda meta: (-(-n // meta["BLOCK_N"]),)


def gemv_add_rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    gamma: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TorchOps.add_rmsnorm (or rmsnorm without `residual`) of one row x [1, K], then its
    product with weight [N, K] (rows contiguous), the normed row unrounded (module docstring). Returns (y [1, N], new residual [1, K]), each
    written into a new tensor (disjoint slices of the residual by different programs), the
    inputs untouched; without `residual` nothing is added and the new residual is x itself."""
    n, k = weight.shape
    x = x.contiguous()
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(x) if residual is not None else x
    res_in = residual.contiguous() if residual is not None else x
    kernel = _build()[0]
    kernel[_grid(n)](
        x, res_in, gamma, weight, y, res_out, n, k, weight.stride(0), eps, residual is not None
    )
    return y, res_out


def gemv_silu_mul(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """TorchOps.silu_mul of one row gate_up [1, 2K] (gate then up), then its product with
    weight [N, K] (rows contiguous): y [1, N] in a new tensor, in gate_up's dtype."""
    n, k = weight.shape
    gate_up = gate_up.contiguous()
    y = torch.empty((1, n), dtype=gate_up.dtype, device=gate_up.device)
    _build()[1][_grid(n)](gate_up, weight, y, n, k, weight.stride(0))
    return y


@dataclass(frozen=True)
class FusedGemv:
    """The kernels a DecoderLayer runs at one row in place of norm + gemv and SiLU-mul + gemv
    (the Triton ones by default; a test may give others with the same signatures)."""

    add_rmsnorm: Callable[..., tuple[torch.Tensor, torch.Tensor]] = gemv_add_rmsnorm
    silu_mul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = gemv_silu_mul
