"""The KV pool: one K/V buffer per layer, indexed by slot (slot 0 is a dummy)."""

from __future__ import annotations

import torch


class KVPool:
    """Holds `num_slots + 1` token slots per layer. Mutated only by `store`.

    `kv[layer]` is [slots + 1, 2, Hkv, D] (flashinfer's one-tensor NHD layout with pages of one
    token); `k[layer]` and `v[layer]` are its two halves as views."""

    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_slots + 1, 2, num_kv_heads, head_dim)
        self.num_slots = num_slots
        self.kv = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.k = [kv[:, 0] for kv in self.kv]
        self.v = [kv[:, 1] for kv in self.kv]

    def store(self, layer: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k and v [T, Hkv, D] at slots `loc`: one indexed write when v follows k in
        memory (both views of one qkv projection), two otherwise."""
        kv = _side_by_side(k, v, self.kv[layer].dtype)
        if kv is not None:
            self.kv[layer][loc] = kv
            return
        self.k[layer][loc] = k.to(self.k[layer].dtype)
        self.v[layer][loc] = v.to(self.v[layer].dtype)

    @staticmethod
    def bytes_per_token(
        num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return (
            2 * num_layers * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()
        )


def _side_by_side(k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """k and v as one [T, 2, Hkv, D] view when v starts where k's row ends, else None."""
    if k.dtype != dtype or v.dtype != dtype or k.shape != v.shape or k.dim() != 3:
        return None
    t, h, d = k.shape
    row = h * d
    stride = k.stride(0) if t > 1 else 2 * row  # a one-row view's first stride is arbitrary
    if k.stride()[1:] != (d, 1) or v.stride()[1:] != (d, 1) or stride < 2 * row:
        return None
    if (t > 1 and v.stride(0) != stride) or v.data_ptr() != k.data_ptr() + row * k.element_size():
        return None
    return k.as_strided((t, 2, h, d), (stride, row, d, 1))
