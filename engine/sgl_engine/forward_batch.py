"""The tensors of one forward pass: the boundary between the scheduler's lists and the model."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import torch


class ForwardMode(Enum):
    EXTEND = "extend"
    DECODE = "decode"


@dataclass
class ForwardBatch:
    """A ragged batch. Sequence i owns query rows `qo_indptr[i]:qo_indptr[i+1]` and reads its
    whole KV (cached prefix plus this step's tokens) from the pool slots
    `kv_indices[kv_indptr[i]:kv_indptr[i+1]]`, the layout flashinfer's paged kernels take.

    The attention backend stores whatever it plans once per batch in `attn_metadata`.
    """

    mode: ForwardMode
    input_ids: torch.Tensor
    positions: torch.Tensor
    out_cache_loc: torch.Tensor
    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    extend_lens: list[int]
    prefix_lens: list[int]
    seq_lens: list[int]
    attn_metadata: Any = field(default=None)

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def build(
        cls,
        mode: ForwardMode,
        input_ids: list[int],
        positions: list[int],
        out_cache_loc: list[int],
        extend_lens: list[int],
        prefix_lens: list[int],
        kv_slots: list[list[int]],
        device: torch.device,
    ) -> ForwardBatch:
        qo, kv = [0], [0]
        for n, slots in zip(extend_lens, kv_slots, strict=True):
            qo.append(qo[-1] + n)
            kv.append(kv[-1] + len(slots))
        flat = np.fromiter(itertools.chain.from_iterable(kv_slots), dtype=np.int32, count=kv[-1])

        def t(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.int64).to(device, non_blocking=True)

        return cls(
            mode=mode,
            input_ids=t(input_ids),
            positions=t(positions),
            out_cache_loc=t(out_cache_loc),
            qo_indptr=torch.tensor(qo, dtype=torch.int32).to(device, non_blocking=True),
            kv_indptr=torch.tensor(kv, dtype=torch.int32).to(device, non_blocking=True),
            kv_indices=torch.from_numpy(flat).to(device, non_blocking=True),
            extend_lens=list(extend_lens),
            prefix_lens=list(prefix_lens),
            seq_lens=[len(s) for s in kv_slots],
        )
