"""The reference backend: gathers each sequence's KV from the pool and calls torch SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sgl_engine.forward_batch import ForwardBatch, ForwardMode
from sgl_engine.kv_cache import KVPool


class TorchAttentionBackend:
    """Runs on CPU and GPU; a loop over sequences, so it is the reference, not the fast path."""

    def __init__(self, **_: object) -> None:
        pass

    def plan(self, batch: ForwardBatch) -> None:
        qo = batch.qo_indptr.tolist()
        kv = batch.kv_indptr.tolist()
        padded = _padded_slots(batch) if batch.mode is ForwardMode.DECODE else None
        batch.attn_metadata = (qo, kv, padded)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: int,
        batch: ForwardBatch,
        pool: KVPool,
        scale: float,
    ) -> torch.Tensor:
        pool.store(layer, batch.out_cache_loc, k, v)
        qo, kv, padded = batch.attn_metadata
        kbuf, vbuf = pool.k[layer], pool.v[layer]
        if padded is not None:
            return _decode(q, kbuf, vbuf, *padded, scale)
        out = torch.empty_like(q)
        for i in range(batch.batch_size):
            qs = q[qo[i] : qo[i + 1]]
            slots = batch.kv_indices[kv[i] : kv[i + 1]]
            ks, vs = kbuf[slots].to(q.dtype), vbuf[slots].to(q.dtype)
            out[qo[i] : qo[i + 1]] = _attend(qs, ks, vs, batch.mode, scale)
        return out.reshape(q.shape[0], -1)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: ForwardMode, scale: float
) -> torch.Tensor:
    n, kv_len = q.shape[0], k.shape[0]
    mask = None
    if mode is ForwardMode.EXTEND and n > 1:
        q_pos = torch.arange(kv_len - n, kv_len, device=q.device)[:, None]
        mask = torch.arange(kv_len, device=q.device)[None, :] <= q_pos
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.transpose(0, 1),
        v.transpose(0, 1),
        attn_mask=mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return o.transpose(0, 1)


def _padded_slots(batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's slots as one row of a [B, Lmax] table (padding reads slot 0), and the
    mask of real entries: decode attends every sequence in a single batched matmul."""
    lens = torch.tensor(batch.seq_lens, device=batch.kv_indices.device)
    cols = torch.arange(max(batch.seq_lens), device=lens.device)
    valid = cols[None, :] < lens[:, None]
    pos = (batch.kv_indptr[:-1].long()[:, None] + cols[None, :]).clamp(
        max=batch.kv_indices.numel() - 1
    )
    slots = torch.where(valid, batch.kv_indices.long()[pos], 0)
    return slots, valid


def _decode(
    q: torch.Tensor,
    kbuf: torch.Tensor,
    vbuf: torch.Tensor,
    slots: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    b, hq, d = q.shape
    hkv = kbuf.shape[1]
    k = kbuf[slots].to(q.dtype).permute(0, 2, 3, 1)  # [B, Hkv, D, L]
    v = vbuf[slots].to(q.dtype).permute(0, 2, 1, 3)  # [B, Hkv, L, D]
    scores = torch.matmul(q.view(b, hkv, hq // hkv, d), k).float() * scale
    scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(b, hq * d)
