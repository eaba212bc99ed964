"""Decode graphs without CUDA, for tests and benchmarks on the CPU (torch attention).

`HostGraphs` makes the choices of the real `CudaGraphRunner` (`can_run`, `cascade_bound`,
`takes_cascade`, which the model runner's batch builds follow) and runs each "replay" eagerly
from only what that graph would read: a cascade replay rebuilds every row's slots from the
shared and own slots alone, a plain one reads the full lists. With `stub`, a replay runs no
model at all (the ids follow from the positions): the host side of a step, for benchmarks.
"""

from __future__ import annotations

from typing import Any

import torch

from sgl_engine.cuda_graph import (
    CASCADE_MIN_ROWS,
    CudaGraphRunner,
    GraphOutput,
    default_batch_sizes,
    kv_index_capacity,
)
from sgl_engine.forward_batch import ForwardBatch, ForwardMode

_build = ForwardBatch.build  # the rebuild is not a step's batch, even where a test spies on those


class HostGraphs(CudaGraphRunner):
    """Install as `runner.graphs` of a CPU `ModelRunner` before any request; counts its
    replays of either kind in `cascade_replays` and `plain_replays`."""

    def __init__(self, runner: Any, max_bs: int, cascade: bool = True, stub: bool = False) -> None:
        self.model, self.pool, self.attn = runner.model, runner.pool, runner.attn
        self.sizes = default_batch_sizes(max_bs)
        self.max_kv = kv_index_capacity(self.sizes[-1], runner.context_length)
        self.eager_fallbacks = self.cascade_replays = self.plain_replays = 0
        self.cascade_graphs = {bs: None for bs in self.sizes if cascade and bs >= CASCADE_MIN_ROWS}
        self.stub, self.hidden_size = stub, runner.model_config.hidden_size

    def run(self, batch: ForwardBatch) -> GraphOutput:
        cascade = self.takes_cascade(batch)
        self.cascade_replays += cascade
        self.plain_replays += not cascade
        if self.stub:
            return self._stub_output(batch)
        if cascade:
            batch = rows_from_split(batch)
        self.attn.plan(batch)
        return self._forward(batch)

    def _stub_output(self, batch: ForwardBatch) -> GraphOutput:
        n = batch.batch_size
        ids = batch.positions % 97 + 3
        zeros = torch.zeros(n, dtype=torch.float32)
        packed = torch.stack([ids.double(), zeros.double(), zeros.double()])
        hidden = torch.zeros(n, self.hidden_size)
        return GraphOutput(hidden, hidden, ids, zeros[:, None], zeros, packed)


def rows_from_split(batch: ForwardBatch) -> ForwardBatch:
    """A split decode batch rebuilt with full lists from its shared and own slots only."""
    shared = batch.kv_indices[: batch.shared_prefix].tolist()
    own, at = batch.own_indices.tolist(), batch.own_indptr.tolist()
    rows = [shared + own[at[i] : at[i + 1]] for i in range(batch.batch_size)]
    return _build(
        ForwardMode.DECODE,
        batch.input_ids,
        batch.positions.tolist(),
        batch.out_cache_loc.tolist(),
        batch.extend_lens,
        batch.prefix_lens,
        rows,
        batch.positions.device,
    )
