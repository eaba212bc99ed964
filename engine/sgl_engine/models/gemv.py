"""Batch-1 decode's matrix-vector products (y = x W^T for one row) as one Triton kernel.

At one row a linear layer only streams its weight; cuBLAS picks split-K kernels plus a reduce
kernel for some of a 7B model's shapes and reads them below the copy bandwidth. This kernel
gives each program BLOCK_N output features and walks the whole K, accumulating in fp32 (no
split, so results do not depend on the launch), autotuned per (N, K) on the first call (which
must happen outside CUDA-graph capture: the capture warm-up does it).

On Hopper and later it takes part in programmatic dependent launch, as flashinfer's norm and
activation kernels around it do: it is launched before the kernel it follows has finished,
reads its first weight tile (which nothing before it writes) while that kernel drains, waits
for it (`gdc_wait`) before reading x, and lets the next kernel launch once its own loop is
done. A decode step runs 4 products a layer, each one a kernel boundary a few microseconds
long otherwise.
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
        x_ptr,
        w_ptr,
        y_ptr,
        peer_ptr,
        round_ptr,
        N,
        K,
        stride_w,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PDL: tl.constexpr,
        PUSH: tl.constexpr,
    ):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        mask_n = rn < N
        w_rows = w_ptr + rn[:, None] * stride_w
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
        y = tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty)
        if PUSH:
            slot = tl.load(round_ptr) % 3
            bits = y.to(tl.int16, bitcast=True)  # -0.0 (the peer's "empty") made +0.0 by its
            pushed = tl.where(bits == -32768, 0, bits)  # bits: a float select keeps -0.0
            tl.store(peer_ptr + slot * N + rn, pushed.to(y.dtype, bitcast=True), mask=mask_n)
        tl.store(y_ptr + rn, y, mask=mask_n)

    return gemv_kernel


def choose(setting: str, device: torch.device, dtype: torch.dtype) -> str:
    """`decode_gemv` resolved for a device: "auto" is "triton" where `hopper_triton_missing`
    finds nothing missing (where the GPU tests and benchmarks ran it), else "cublas"; off CUDA
    it is always "cublas" (nothing else runs there)."""
    if device.type != "cuda":
        return "cublas"
    if setting != "auto":
        return setting
    return "cublas" if hopper_triton_missing(device, dtype) else "triton"


def hopper_triton_missing(device: torch.device, dtype: torch.dtype) -> str | None:
    """What the batch-1 Triton kernels (this module's, distributed/push_norm.py's) lack on
    `device` for `dtype` activations, or None: a Hopper or later GPU, bf16/fp16, Triton."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return "it needs Hopper or later GPUs"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"it needs bfloat16 or float16 activations, not {dtype}"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "it needs Triton"
    return None


@functools.cache
def pdl_supported(device: torch.device) -> bool:
    """Whether Triton kernels on `device` can take part in programmatic dependent launch (sm90+,
    and a Triton that has `gdc_wait`)."""
    import triton.language as tl

    has_gdc = hasattr(tl.extra.cuda, "gdc_wait")
    return has_gdc and torch.cuda.get_device_capability(device)[0] >= 9


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    pdl: bool | None = None,
    push: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """x [1, K] @ weight[N, K]^T -> [1, N] in x's dtype; weight rows contiguous. Programmatic
    dependent launch where the device has it, unless `pdl` is False (the result is the same).

    `push` = (peer, round): also store the result, with -0.0 made +0.0, into row `round % 3` of
    `peer` ([3, N], x's dtype; a peer's memory) as each program finishes (push_norm.py reads
    it there). `round` (int32 [1]) is only read."""
    import triton

    n, k = weight.shape
    x = x.contiguous()
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    pdl = pdl is not False and pdl_supported(x.device)
    peer, round_ = push if push is not None else (y, _no_round(x.device))
    _build()[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
        x,
        weight,
        y,
        peer,
        round_,
        n,
        k,
        weight.stride(0),
        PDL=pdl,
        PUSH=push is not None,
        launch_pdl=pdl,
    )
    return y


@functools.cache
def _no_round(device: torch.device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int32, device=device)
