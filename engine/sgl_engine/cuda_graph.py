"""CUDA-graph capture of decode steps for a set of batch sizes (flashinfer backend only).

A step of `n` running requests replays the graph of the smallest captured size >= n. Padding
rows read and write the dummy slot 0, so they never touch a real request's KV.

Each graph runs the model, the lm_head and greedy selection (log-softmax, argmax, the chosen
token's logprob, packed for one copy to the host), so a plain greedy decode step is one replay.
Steps that need the general sampler take the graph's logits.

All graphs share one KV-index buffer sized by `kv_index_capacity`: a decode batch lists every
slot of every sequence, and sequences sharing a radix prefix repeat the shared slots, so what a
batch carries is bounded by its rows times the context length, not by the pool size.

With `cascade`, sizes of at least CASCADE_MIN_ROWS also get a shared-prefix graph: a batch whose
rows all share at least CASCADE_MIN_PREFIX leading slots (`ForwardBatch.shared_prefix`) replays
it, reading the shared slots once for all rows (`CascadeDecode`); its rows' own slots go in the
same shared index buffer, the shared slots in one of context-length entries. Such a graph reads
only the batch's split, so the model runner builds nothing else for a batch `cascade_bound`
says will replay one; batches that cannot replay one are not split at all.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import torch

from sgl_engine.attention.flashinfer_backend import pinned
from sgl_engine.forward_batch import ForwardBatch, ForwardMode, indptr
from sgl_engine.kv_cache import KVPool

KV_INDEX_CAP = 1 << 25
CASCADE_MIN_ROWS = 8
CASCADE_MIN_PREFIX = 256


def default_batch_sizes(max_bs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16))
    return [s for s in sizes if s <= max_bs]


def kv_index_capacity(max_bs: int, context_length: int) -> int:
    """Entries of the shared KV-index buffer of graphs up to `max_bs` rows.

    Bound: a decode row reads its sequence's slots, at most `context_length` of them (the
    processor finishes a request at the context length; the overlapped look-ahead stops one
    token before it), whatever it shares with other rows; a padding row reads one slot. A batch
    of n <= bs real rows padded to bs therefore lists at most n * ctx + (bs - n) <= bs * ctx
    indices. Capped at KV_INDEX_CAP entries (128 MiB); a batch over the buffer runs eagerly.
    """
    return min(max_bs * max(context_length, 1), KV_INDEX_CAP)


def graph_kv_entries(seq_lens: list[int], sizes: list[int]) -> int:
    """The KV indices a decode batch of `seq_lens` puts in the buffer once padded to a size."""
    bs = sizes[bisect.bisect_left(sizes, len(seq_lens))]
    return sum(seq_lens) + bs - len(seq_lens)


@dataclass
class GraphOutput:
    """One replay's results: views into the graph's static buffers (valid until the next replay
    of that size; copies queued on the stream before then read the right values)."""

    hidden: torch.Tensor
    logits: torch.Tensor
    next_ids: torch.Tensor
    logprobs: torch.Tensor
    chosen: torch.Tensor
    packed: torch.Tensor


class CudaGraphRunner:
    """Owns the static input buffers and one graph (with its own decode plan) per size."""

    def __init__(
        self,
        model: Any,
        pool: KVPool,
        attn: Any,
        batch_sizes: list[int],
        device: torch.device,
        context_length: int,
        cascade: bool = False,
    ) -> None:
        self.model, self.pool, self.attn = model, pool, attn
        self.sizes = sorted(batch_sizes)
        max_bs = self.sizes[-1]
        self.max_kv = kv_index_capacity(max_bs, context_length)
        self.kv_indices = torch.zeros(self.max_kv, dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.out_loc = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, GraphOutput] = {}
        self.wrappers: dict[int, Any] = {}
        self.eager_fallbacks = 0
        self.cascade_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.cascade_outputs: dict[int, GraphOutput] = {}
        self.cascade_meta: dict[int, Any] = {}
        self.cascade_replays = 0
        self.shared_indices = (
            torch.zeros(max(context_length, 1), dtype=torch.int32, device=device)
            if cascade
            else None
        )
        self.mempool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():  # as the replays run: no autograd state on the pool
            for bs in reversed(self.sizes):
                self._capture(bs)
                if cascade and bs >= CASCADE_MIN_ROWS:
                    self._capture_cascade(bs)

    def _static_batch(self, bs: int, meta: Any = None) -> ForwardBatch:
        zeros = torch.zeros(bs + 1, dtype=torch.int32, device=self.input_ids.device)
        return ForwardBatch(
            mode=ForwardMode.DECODE,
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            out_cache_loc=self.out_loc[:bs],
            qo_indptr=zeros,
            kv_indptr=zeros,
            kv_indices=zeros,
            extend_lens=[1] * bs,
            prefix_lens=[0] * bs,
            seq_lens=[1] * bs,
            attn_metadata=self.wrappers[bs] if meta is None else meta,
        )

    def _plan(self, bs: int, kv_lens: list[int], kv_indices: torch.Tensor) -> None:
        self.attn.plan_decode(
            self.wrappers[bs], pinned(indptr(kv_lens)), kv_indices, pinned([1] * bs)
        )

    def _forward(self, batch: ForwardBatch) -> GraphOutput:
        hidden = self.model(batch, self.pool, self.attn)
        logits = self.model.logits(hidden)
        logprobs = torch.log_softmax(logits, dim=-1)
        next_ids = logits.argmax(dim=-1)
        chosen = logprobs.gather(1, next_ids.unsqueeze(1)).squeeze(1)
        packed = torch.stack(
            [next_ids.double(), chosen.double(), torch.zeros_like(chosen, dtype=torch.float64)]
        )
        return GraphOutput(hidden, logits, next_ids, logprobs, chosen, packed)

    def _capture(self, bs: int) -> None:
        self.wrappers[bs] = self.attn.graph_decode_wrapper(bs, self.kv_indices)
        self._plan(bs, [1] * bs, torch.zeros(bs, dtype=torch.int32, device=self.input_ids.device))
        self.graphs[bs], self.outputs[bs] = self._record(self._static_batch(bs))

    def _capture_cascade(self, bs: int) -> None:
        meta = self.attn.graph_cascade(bs, self.kv_indices, self.shared_indices)
        zeros = torch.zeros(bs, dtype=torch.int32, device=self.input_ids.device)
        self.attn.plan_cascade(meta, bs, zeros[:1], [1] * bs, zeros)
        self.cascade_meta[bs] = meta
        self.cascade_graphs[bs], self.cascade_outputs[bs] = self._record(
            self._static_batch(bs, meta)
        )

    def _record(self, batch: ForwardBatch) -> tuple[torch.cuda.CUDAGraph, GraphOutput]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(batch)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            out = self._forward(batch)
        return graph, out

    def can_run(self, batch: ForwardBatch) -> bool:
        """Decode batches up to the largest size whose KV indices fit the shared buffer (always,
        by `kv_index_capacity`'s bound, unless the cap applied); others run eagerly."""
        if batch.mode is not ForwardMode.DECODE or batch.batch_size > self.sizes[-1]:
            return False
        if graph_kv_entries(batch.seq_lens, self.sizes) > self.max_kv:
            self.eager_fallbacks += 1
            return False
        return True

    def cascade_bound(self, seq_lens: list[int]) -> bool:
        """Whether a decode batch of `seq_lens` replays a shared-prefix graph once its rows
        share enough slots: it runs in a graph (`can_run`, without counting a fallback) of a
        size captured with a cascade variant. Pure: the model runner asks before building."""
        n = len(seq_lens)
        if not self.cascade_graphs or n > self.sizes[-1]:
            return False
        if self._size(n) not in self.cascade_graphs:
            return False
        return graph_kv_entries(seq_lens, self.sizes) <= self.max_kv

    def _size(self, n: int) -> int:
        """The captured size a batch of `n` rows replays (n <= the largest)."""
        return self.sizes[bisect.bisect_left(self.sizes, n)]

    def takes_cascade(self, batch: ForwardBatch) -> bool:
        """Whether `run` replays `batch` in its size's shared-prefix graph; raises for a batch
        built split-only (no `kv_indptr`) that has none to replay, as it lists nothing else."""
        cascade = batch.shared_prefix > 0 and self._size(batch.batch_size) in self.cascade_graphs
        if not cascade and batch.kv_indptr is None:
            raise ValueError("a split-only decode batch has no shared-prefix graph to replay")
        return cascade

    def run(self, batch: ForwardBatch) -> GraphOutput:
        """Replay for `batch` (decode only); returns its first batch_size rows. A batch built
        split-only (no `kv_indptr`) must take a shared-prefix graph."""
        n = batch.batch_size
        bs = self._size(n)
        cascade = self.takes_cascade(batch)
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.out_loc[:n].copy_(batch.out_cache_loc)
        if bs > n:
            self.input_ids[n:bs].zero_()
            self.positions[n:bs].zero_()
            self.out_loc[n:bs].zero_()
        pad = torch.zeros(bs - n, dtype=torch.int32, device=batch.kv_indices.device)
        shared = batch.shared_prefix
        if cascade:
            own = [length - shared for length in batch.seq_lens] + [1] * (bs - n)
            self.attn.plan_cascade(
                self.cascade_meta[bs],
                bs,
                batch.kv_indices[:shared],
                own,
                torch.cat([batch.own_indices, pad]),
            )
            self.cascade_graphs[bs].replay()
            self.cascade_replays += 1
            o = self.cascade_outputs[bs]
        else:
            self._plan(bs, batch.seq_lens + [1] * (bs - n), torch.cat([batch.kv_indices, pad]))
            self.graphs[bs].replay()
            o = self.outputs[bs]
        return GraphOutput(
            o.hidden[:n],
            o.logits[:n],
            o.next_ids[:n],
            o.logprobs[:n],
            o.chosen[:n],
            o.packed[:, :n],
        )
