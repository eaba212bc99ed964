"""Building blocks: RMSNorm, rotary embedding (all transformers RoPE scalings), SwiGLU.

Each takes the model's `ops` (models/ops.py) so the same module runs the reference arithmetic
or fused kernels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sgl_engine.distributed.group import TPGroup
from sgl_engine.distributed.layers import ColumnParallelLinear, RowParallelLinear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(
        self,
        x: torch.Tensor,
        ops: Any,
        residual: torch.Tensor | None = None,
        tp: TPGroup | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without `residual`: norm(x). With it: (norm(x + residual), x + residual). With `tp`
        too, `x` is a row-parallel layer's partial sum: all-reduced first, maybe in the same
        kernel (`TPGroup.all_reduce_add_rmsnorm`)."""
        if residual is None:
            return ops.rmsnorm(x, self.weight, self.eps)
        if tp is not None:
            return tp.all_reduce_add_rmsnorm(x, residual, self.weight, self.eps, ops)
        return ops.add_rmsnorm(x, residual, self.weight, self.eps)


def rope_inv_freq(hf_config: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling, computed by transformers' own RoPE functions."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "dynamic":
        raise ValueError("dynamic NTK RoPE scaling is not supported")
    if rope_type != "default":
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
        return inv_freq.float(), float(scaling)
    base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    return inv_freq, 1.0


class RotaryEmbedding(nn.Module):
    """Neox-style rotation of the full head dimension, from a precomputed cos/sin cache."""

    def __init__(self, hf_config: Any, head_dim: int, max_positions: int) -> None:
        super().__init__()
        inv_freq, scaling = rope_inv_freq(hf_config, head_dim)
        t = torch.arange(max_positions, dtype=torch.float)
        freqs = torch.outer(t, inv_freq)
        self.head_dim = head_dim
        self.register_buffer("cos", freqs.cos() * scaling, persistent=False)
        self.register_buffer("sin", freqs.sin() * scaling, persistent=False)
        self.register_buffer("cos_sin", torch.cat([self.cos, self.sin], -1), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, ops: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q is [T, Hq * D] and k is [T, Hkv * D]; returns them rotated."""
        return ops.rope(positions, q, k, self.cos, self.sin, self.cos_sin, self.head_dim)


class SwiGLU(nn.Module):
    """gate/up merged and column-parallel, down row-parallel: one all-reduce under TP (left to
    the caller with `reduce=False`)."""

    def __init__(self, hidden: int, intermediate: int, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(hidden, [intermediate, intermediate], tp=tp)
        self.down_proj = RowParallelLinear(intermediate, hidden, tp=tp)

    def forward(self, x: torch.Tensor, ops: Any, reduce: bool = True) -> torch.Tensor:
        return self.down_proj(ops.silu_mul(self.gate_up_proj(x)), reduce)
