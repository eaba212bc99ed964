"""flashinfer paged attention: prefill over cached prefixes and decode, planned once per batch.

The pool's per-layer buffers [slots + 1, 2, Hkv, D] are viewed as pages of size 1
([slots + 1, 2, 1, Hkv, D], NHD layout), so a sequence's KV is the list of its slot ids.

Decode graphs may split a batch's attention at the KV prefix all its rows share (`CascadeDecode`,
opt-in `cascade_attention`): the prefix is read once for every row, which a few-shot batch of
an MHA model otherwise reads once per row.

A wrapper's plan is written to a pinned host buffer and copied to the device asynchronously;
with overlapped steps the next plan could overwrite that buffer before the copy has run, so each
plan waits for the previous plan's copy (an event, normally long passed) before it starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sgl_engine.forward_batch import ForwardBatch, ForwardMode, indptr
from sgl_engine.kv_cache import KVPool

WORKSPACE_BYTES = 256 << 20


class FlashInferAttentionBackend:
    """`plan` builds the prefill or decode plan for a batch (one per batch, shared by all layers);
    `forward` stores the step's k/v in the pool and runs the planned kernel for one layer; given
    k = v = None it only attends (the model stored them: models/rope_store.py)."""

    accepts_stored_kv = True

    def __init__(
        self, model_config: Any, device: torch.device, dtype: torch.dtype, **_: Any
    ) -> None:
        import flashinfer

        if device.type != "cuda":
            raise ValueError("the flashinfer attention backend needs a CUDA device")
        self.fi = flashinfer
        self.nh, self.nkv, self.hd = (
            model_config.num_heads,
            model_config.num_kv_heads,
            model_config.head_dim,
        )
        self.dtype, self.device = dtype, device
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=self._tensor_cores()
        )
        self._planned = torch.cuda.Event()

    def _tensor_cores(self) -> bool:
        return self.nh // self.nkv >= 4

    def plan(self, batch: ForwardBatch) -> None:
        kv_indptr = pinned(indptr(batch.seq_lens))
        last = pinned([1] * batch.batch_size)
        if batch.mode is ForwardMode.DECODE:
            self.plan_decode(self.decode, kv_indptr, batch.kv_indices, last)
            batch.attn_metadata = self.decode
        else:
            qo_indptr = pinned(indptr(batch.extend_lens))
            self._wait_for_last_plan()
            self._plan_prefill(self.prefill, qo_indptr, kv_indptr, batch.kv_indices, last, True)
            self._planned.record()
            batch.attn_metadata = self.prefill

    def plan_decode(
        self, wrapper: Any, kv_indptr: torch.Tensor, kv_indices: torch.Tensor, last: torch.Tensor
    ) -> None:
        """Plan a decode wrapper; `kv_indptr` and `last` are host tensors (pinned: see `pinned`)."""
        self._wait_for_last_plan()
        self._plan_decode(wrapper, kv_indptr, kv_indices, last)
        self._planned.record()

    def _plan_decode(
        self, wrapper: Any, kv_indptr: torch.Tensor, kv_indices: torch.Tensor, last: torch.Tensor
    ) -> None:
        wrapper.plan(
            kv_indptr,
            kv_indices,
            last,
            self.nh,
            self.nkv,
            self.hd,
            1,
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
        )

    def _plan_prefill(
        self,
        wrapper: Any,
        qo_indptr: torch.Tensor,
        kv_indptr: torch.Tensor,
        kv_indices: torch.Tensor,
        last: torch.Tensor,
        causal: bool,
    ) -> None:
        wrapper.plan(
            qo_indptr,
            kv_indptr,
            kv_indices,
            last,
            self.nh,
            self.nkv,
            self.hd,
            1,
            causal=causal,
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
        )

    def _wait_for_last_plan(self) -> None:
        self._planned.synchronize()

    def graph_decode_wrapper(self, batch_size: int, kv_indices: torch.Tensor) -> Any:
        """A decode wrapper with fixed buffers, for capture in a CUDA graph of `batch_size`.
        `kv_indices` (int32, on the device) may be shared by the wrappers of several graphs:
        plans and replays are ordered on one stream."""
        return self.fi.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace,
            "NHD",
            use_cuda_graph=True,
            use_tensor_cores=self._tensor_cores(),
            paged_kv_indptr_buffer=torch.zeros(
                batch_size + 1, dtype=torch.int32, device=self.device
            ),
            paged_kv_indices_buffer=kv_indices,
            paged_kv_last_page_len_buffer=torch.ones(
                batch_size, dtype=torch.int32, device=self.device
            ),
        )

    def graph_cascade(
        self, batch_size: int, own_indices: torch.Tensor, shared_indices: torch.Tensor
    ) -> CascadeDecode:
        """Fixed-buffer wrappers of a shared-prefix decode of `batch_size` rows, for capture in
        a CUDA graph: a non-causal prefill of all rows over the shared slots (`shared_indices`
        holds up to the context length of them), and a decode of each row over its own slots
        (`own_indices`, shareable like `graph_decode_wrapper`'s)."""
        i32 = dict(dtype=torch.int32, device=self.device)
        shared = self.fi.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace,
            "NHD",
            use_cuda_graph=True,
            qo_indptr_buf=torch.zeros(2, **i32),
            paged_kv_indptr_buf=torch.zeros(2, **i32),
            paged_kv_indices_buf=shared_indices,
            paged_kv_last_page_len_buf=torch.ones(1, **i32),
        )
        own = self.graph_decode_wrapper(batch_size, own_indices)
        return CascadeDecode(shared, own, self.fi.merge_state_in_place)

    def plan_cascade(
        self,
        meta: CascadeDecode,
        batch_size: int,
        shared: torch.Tensor,
        own_lens: list[int],
        own_indices: torch.Tensor,
    ) -> None:
        """Plan both halves of a shared-prefix decode: every row over the slots `shared` (on
        the device), then row i over its `own_lens[i]` slots in `own_indices`."""
        self._wait_for_last_plan()
        self._plan_prefill(
            meta.shared,
            pinned([0, batch_size]),
            pinned([0, int(shared.numel())]),
            shared,
            pinned([1]),
            causal=False,
        )
        self._plan_decode(meta.own, pinned(indptr(own_lens)), own_indices, pinned([1] * batch_size))
        self._planned.record()

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
        if k is not None:  # else the model stored them (models/rope_store.py)
            pool.store(layer, batch.out_cache_loc, k, v)
        cache = pool.kv[layer].unsqueeze(2)
        o = batch.attn_metadata.run(q.contiguous(), cache)
        return o.reshape(q.shape[0], -1)


@dataclass(frozen=True)
class CascadeDecode:
    """A decode batch's attention split at the KV prefix all its rows share (cascade
    attention): the prefix is read once for every row instead of once per row. `run` has the
    decode wrapper's signature, so the model's layers take it as their planned metadata."""

    shared: Any
    own: Any
    merge: Any

    def run(self, q: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        o, lse = self.own.run(q, cache, return_lse=True)
        o_shared, lse_shared = self.shared.run(q, cache, return_lse=True)
        self.merge(o, lse, o_shared, lse_shared)
        return o


def pinned(values: list[int]) -> torch.Tensor:
    """An int32 host tensor in pinned memory: its copy to the device never waits for the
    device's queued work."""
    return torch.tensor(values, dtype=torch.int32).pin_memory()
