"""CUDA-graph capture of decode steps for a set of batch sizes (flashinfer backend only).

A step of `n` running requests replays the graph of the smallest captured size >= n. Padding
rows read and write the dummy slot 0, so they never touch a real request's KV.
"""

from __future__ import annotations

import bisect
from typing import Any

import torch

from sgl_engine.attention.flashinfer_backend import pinned
from sgl_engine.forward_batch import ForwardBatch, ForwardMode
from sgl_engine.kv_cache import KVPool


def default_batch_sizes(max_bs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16))
    return [s for s in sizes if s <= max_bs]


class CudaGraphRunner:
    """Owns the static input buffers and one graph (with its own decode plan) per size."""

    def __init__(
        self, model: Any, pool: KVPool, attn: Any, batch_sizes: list[int], device: torch.device
    ) -> None:
        self.model, self.pool, self.attn = model, pool, attn
        self.sizes = sorted(batch_sizes)
        max_bs = self.sizes[-1]
        self.max_kv = pool.num_slots + 1 + max_bs
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.out_loc = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.wrappers: dict[int, Any] = {}
        self.mempool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.sizes):
            self._capture(bs)

    def _static_batch(self, bs: int) -> ForwardBatch:
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
            attn_metadata=self.wrappers[bs],
        )

    def _plan(self, bs: int, kv_lens: list[int], kv_indices: torch.Tensor) -> None:
        indptr = [0]
        for n in kv_lens:
            indptr.append(indptr[-1] + n)
        self.attn.plan_decode(self.wrappers[bs], pinned(indptr), kv_indices, pinned([1] * bs))

    def _capture(self, bs: int) -> None:
        self.wrappers[bs] = self.attn.graph_decode_wrapper(bs, self.max_kv)
        self._plan(bs, [1] * bs, torch.zeros(bs, dtype=torch.int32, device=self.input_ids.device))
        batch = self._static_batch(bs)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.model(batch, self.pool, self.attn)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            self.outputs[bs] = self.model(batch, self.pool, self.attn)
        self.graphs[bs] = graph

    def can_run(self, batch: ForwardBatch) -> bool:
        return batch.mode is ForwardMode.DECODE and batch.batch_size <= self.sizes[-1]

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Replay for `batch` (decode only); returns hidden states [batch_size, H]."""
        n = batch.batch_size
        bs = self.sizes[bisect.bisect_left(self.sizes, n)]
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.out_loc[:n].copy_(batch.out_cache_loc)
        if bs > n:
            self.input_ids[n:bs].zero_()
            self.positions[n:bs].zero_()
            self.out_loc[n:bs].zero_()
        pad = torch.zeros(bs - n, dtype=torch.int32, device=batch.kv_indices.device)
        self._plan(bs, batch.seq_lens + [1] * (bs - n), torch.cat([batch.kv_indices, pad]))
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
