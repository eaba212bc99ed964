"""The attention backend interface."""

from __future__ import annotations

from typing import Protocol

import torch

from sgl_engine.forward_batch import ForwardBatch
from sgl_engine.kv_cache import KVPool


class AttentionBackend(Protocol):
    """Paged attention over the KV pool.

    `plan` runs once per batch, before the first layer, and may store metadata in
    `batch.attn_metadata` (flashinfer builds its prefill/decode plans there). `forward` runs
    per layer: it writes this step's k/v into the pool at `batch.out_cache_loc` (mutating the
    pool), then attends each sequence's queries over its whole KV, causally for the new tokens.
    q is [T, Hq, D], k and v are [T, Hkv, D]; the result is [T, Hq * D].
    """

    def plan(self, batch: ForwardBatch) -> None: ...

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: int,
        batch: ForwardBatch,
        pool: KVPool,
        scale: float,
    ) -> torch.Tensor: ...
