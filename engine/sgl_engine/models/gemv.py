"""Batch-1 decode's matrix-vector products (y = x W^T for one row) as one Triton kernel.

At one row a linear layer only streams its weight; cuBLAS picks split-K kernels plus a reduce
kernel for some of a 7B model's shapes and reads them below the copy bandwidth. This kernel
gives each program BLOCK_N output features and walks the whole K, accumulating in fp32 (no
split, so results do not depend on the launch), autotuned per (N, K) on the first call (which
must happen outside CUDA-graph capture: the capture warm-up does it).

On Hopper and later it takes part in programmatic dependent launch, as flashinfer's norm and
activation kernels around it do: it is launched before the kernel it follows has finished,
asks L2 for the first PREFETCH_BYTES of its weight (nothing before it writes a weight) and
reads its first tile while that kernel drains, waits for it (`gdc_wait`) before reading x, and
lets the next kernel launch once its own loop is done. After an all-reduce that triggers its
dependents early (distributed/fused_norm.py), the weight streams in while the all-reduce waits
on NVLink. A decode step runs 4 products a layer, each one a kernel boundary a few
microseconds long otherwise.
"""

from __future__ import annotations

import functools

import torch

PREFETCH_BYTES = 16 << 20  # of a product's weight, spread over its rows: a third of H100/H200 L2


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

    gdc = getattr(tl.extra.cuda, "gdc_wait", None) is not None

    @triton.jit
    def l2_prefetch(rows, nbytes):
        """Ask L2 for the first `nbytes` of each row (a TMA bulk prefetch: no registers)."""
        tl.inline_asm_elementwise(
            "cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;",
            "=r,l,r",
            [rows.to(tl.uint64, bitcast=True), tl.zeros(rows.shape, tl.int32) + nbytes],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )

    @triton.autotune(configs=_configs(), key=["N", "K"])
    @triton.jit
    def gemv_kernel(
        x_ptr,
        w_ptr,
        y_ptr,
        N,
        K,
        stride_w,
        prefetch_bytes,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PDL: tl.constexpr,
    ):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        mask_n = rn < N
        w_rows = w_ptr + rn[:, None] * stride_w
        if PDL:
            if prefetch_bytes > 0:
                l2_prefetch(w_ptr + tl.minimum(rn, N - 1).to(tl.int64) * stride_w, prefetch_bytes)
        mask_k = rk < K
        w = tl.load(w_rows + rk[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if PDL:
            tl.extra.cuda.gdc_wait()
        x = tl.load(x_ptr + rk, mask=mask_k, other=0.0)
        acc = w.to(tl.float32) * x.to(tl.float32)[None, :]
        for k0 in range(BLOCK_K, K, BLOCK_K):
            mask_k = (k0 + rk) < K
            w = tl.load(
                w_rows + (k0 + rk)[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0
            )
            x = tl.load(x_ptr + k0 + rk, mask=mask_k, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        y = tl.sum(acc, axis=1)
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=mask_n)

    return gemv_kernel, gdc


@functools.cache
def _pdl(device: torch.device) -> bool:
    """Whether products on `device` take part in programmatic dependent launch (sm90+, and a
    Triton that has it)."""
    return _build()[1] and torch.cuda.get_device_capability(device)[0] >= 9


def gemv(x: torch.Tensor, weight: torch.Tensor, pdl: bool | None = None) -> torch.Tensor:
    """x [1, K] @ weight[N, K]^T -> [1, N] in x's dtype; weight rows contiguous. `pdl` None
    takes programmatic dependent launch where the device has it (the result is the same)."""
    import triton

    n, k = weight.shape
    x = x.contiguous()
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    pdl = _pdl(x.device) if pdl is None else pdl
    kernel = _build()[0]
    kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
        x, weight, y, n, k, weight.stride(0), _prefetch_bytes(weight), PDL=pdl, launch_pdl=pdl
    )
    return y


def _prefetch_bytes(weight: torch.Tensor) -> int:
    """Bytes of each row to prefetch: PREFETCH_BYTES over the rows, at most a row, in the 16-byte
    units a bulk prefetch takes (0, none, where rows do not start on 16 bytes)."""
    row = weight.shape[1] * weight.element_size()
    aligned = weight.data_ptr() % 16 == 0 and weight.stride(0) * weight.element_size() % 16 == 0
    if not aligned:
        return 0
    return min(row, PREFETCH_BYTES // weight.shape[0]) // 16 * 16
