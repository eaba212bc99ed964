"""The few elementwise ops of a decoder layer, in two implementations chosen per model.

`TorchOps` is the reference (transformers' arithmetic; any device and dtype). `FlashInferOps`
fuses them into single kernels (RMSNorm, residual add + RMSNorm, RoPE from a cos/sin cache,
SiLU-and-mul) for CUDA in half precision, where a decode step is a few thousand tiny kernels
otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class TorchOps:
    name = "torch"

    @staticmethod
    def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * xf.to(dtype)

    @classmethod
    def add_rmsnorm(
        cls, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        residual = residual + x
        return cls.rmsnorm(residual, weight, eps), residual

    @staticmethod
    def rope(
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cos_sin: torch.Tensor | None,
        head_dim: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        c = cos[positions].unsqueeze(1)
        s = sin[positions].unsqueeze(1)
        t = q.shape[0]
        q = _rotate(q.reshape(t, -1, head_dim), c, s).reshape(t, -1)
        k = _rotate(k.reshape(t, -1, head_dim), c, s).reshape(t, -1)
        return q, k

    @staticmethod
    def silu_mul(x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(dtype)


class FlashInferOps:
    name = "flashinfer"

    def __init__(self) -> None:
        import flashinfer

        self.fi = flashinfer

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self.fi.norm.rmsnorm(x, weight, eps)

    def add_rmsnorm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.fi.norm.fused_add_rmsnorm(x, residual, weight, eps)
        return x, residual

    def rope(self, positions, q, k, cos, sin, cos_sin, head_dim):
        """In place, on the strided q/k views of the qkv projection (the kernel takes strides), so
        k stays beside v for the pool's single write."""
        self.fi.rope.apply_rope_with_cos_sin_cache_inplace(positions, q, k, head_dim, cos_sin, True)
        return q, k

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        return self.fi.activation.silu_and_mul(x)

    def rope_store(self, positions, q, k, v, cos_sin, head_dim, kv, batch):
        """RoPE of q (in place, returned) and k, and k and v written into the pool layer `kv`
        at the batch's slots: one Triton kernel (models/rope_store.py)."""
        from sgl_engine.models.gemv import pdl_supported
        from sgl_engine.models.rope_store import rope_store

        pdl = pdl_supported(q.device)
        return rope_store(positions, q, k, v, cos_sin, head_dim, kv, batch.out_cache_loc, pdl)


def choose_ops(name: str, device: torch.device, dtype: torch.dtype) -> TorchOps | FlashInferOps:
    """`auto` picks the fused kernels on CUDA in fp16/bf16 when flashinfer is installed."""
    if name == "auto":
        from sgl_engine.attention import flashinfer_available

        fused = (
            device.type == "cuda"
            and dtype in (torch.float16, torch.bfloat16)
            and flashinfer_available()
        )
        name = "flashinfer" if fused else "torch"
    if name == "flashinfer":
        return FlashInferOps()
    if name == "torch":
        return TorchOps()
    raise ValueError(f"unknown ops implementation {name!r}; choose auto, torch or flashinfer")
