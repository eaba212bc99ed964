"""RoPE and the KV store of a layer's new tokens in one Triton kernel.

It replaces two kernels a layer that do not shrink under tensor parallelism: flashinfer's RoPE
on the q/k views of the qkv projection (1.8 us a layer at batch 1 on an H200) and the pool's
indexed write of k and v (a torch `index_put`, 3.3 us). It rotates q in place, and writes the
rotated k and the v of each token straight into the pool at its slot, one program per (token,
head). On Hopper and later it takes part in programmatic dependent launch like the products
around it (models/gemv.py): it waits (`gdc_wait`) for the qkv product before reading.

Used where the ops are FlashInferOps and the attention backend only attends when handed
k = v = None (`accepts_stored_kv`: the flashinfer backend); the torch paths keep
`ops.rope` + `KVPool.store`, the reference this kernel is tested against.

Rotation is neox-style over the full head dimension, from the model's cos/sin cache
([positions, head_dim]: cos then sin halves), computed in fp32 and rounded once, as
`TorchOps.rope` and flashinfer's kernel do.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def rope_store_kernel(
        pos_ptr,
        q_ptr,
        k_ptr,
        v_ptr,
        cs_ptr,
        kv_ptr,
        loc_ptr,
        q_stride,
        k_stride,
        v_stride,
        slot_stride,
        NH,
        NKV: tl.constexpr,
        HALF: tl.constexpr,
        BLOCK: tl.constexpr,
        PDL: tl.constexpr,
    ):
        t = tl.program_id(0)
        h = tl.program_id(1)
        d = tl.arange(0, BLOCK)
        m = d < HALF
        if PDL:
            tl.extra.cuda.gdc_wait()
        pos = tl.load(pos_ptr + t)
        cos = tl.load(cs_ptr + pos * 2 * HALF + d, mask=m).to(tl.float32)
        sin = tl.load(cs_ptr + pos * 2 * HALF + HALF + d, mask=m).to(tl.float32)
        if h < NH:
            src = q_ptr + t * q_stride + h * 2 * HALF
            dst = src
        else:
            g = h - NH
            src = k_ptr + t * k_stride + g * 2 * HALF
            slot = tl.load(loc_ptr + t)
            dst = kv_ptr + slot * slot_stride + g * 2 * HALF
            vsrc = v_ptr + t * v_stride + g * 2 * HALF
            vdst = dst + NKV * 2 * HALF
            kv_ty = kv_ptr.dtype.element_ty
            tl.store(vdst + d, tl.load(vsrc + d, mask=m).to(kv_ty), mask=m)
            tl.store(vdst + HALF + d, tl.load(vsrc + HALF + d, mask=m).to(kv_ty), mask=m)
        x1 = tl.load(src + d, mask=m).to(tl.float32)
        x2 = tl.load(src + HALF + d, mask=m).to(tl.float32)
        out_ty = dst.dtype.element_ty
        tl.store(dst + d, (x1 * cos - x2 * sin).to(out_ty), mask=m)
        tl.store(dst + HALF + d, (x2 * cos + x1 * sin).to(out_ty), mask=m)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()

    return rope_store_kernel


def rope_store(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin: torch.Tensor,
    head_dim: int,
    kv: torch.Tensor,
    loc: torch.Tensor,
    pdl: bool = False,
) -> torch.Tensor:
    """Rotate q ([T, Hq * D], rows strided, heads contiguous) in place and return it; rotate k
    and write it and v ([T, Hkv * D] each, like q) into `kv` ([slots, 2, Hkv, D], one layer of
    the pool) at slots `loc` ([T]). `cos_sin` is [positions, D] (cos, then sin), in fp32."""
    import triton

    t = q.shape[0]
    nh, nkv = q.shape[1] // head_dim, k.shape[1] // head_dim
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, not {head_dim}")
    if q.stride(1) != 1 or k.stride(1) != 1 or v.stride(1) != 1:
        raise ValueError("q, k and v must have contiguous heads")
    if t == 0:
        return q
    _build()[(t, nh + nkv)](
        positions, q, k, v, cos_sin, kv, loc,
        q.stride(0), k.stride(0), v.stride(0), kv.stride(0), nh,
        NKV=nkv, HALF=head_dim // 2, BLOCK=triton.next_power_of_2(head_dim // 2),
        PDL=pdl, launch_pdl=pdl,
    )  # fmt: skip
    return q
