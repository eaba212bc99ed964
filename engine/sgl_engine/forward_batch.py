"""The tensors of one forward pass: the boundary between the scheduler's lists and the model."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
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

    `shared_prefix` (decode batches built with `shared_prefix_min`): the number of leading KV
    slots every row has in common (0 if under that minimum); `kv_indices[:shared_prefix]` are
    they, and `own_indices[own_indptr[i]:own_indptr[i+1]]` are row i's slots after them.

    A split batch built `split_only` (for a cascade decode graph, which reads nothing else) does
    not list every row's slots: `kv_indices` is just the shared slots and `kv_indptr` is None.
    Every other batch has the full lists (`split_only` is False, or the batch was not split).
    """

    mode: ForwardMode
    input_ids: torch.Tensor
    positions: torch.Tensor
    out_cache_loc: torch.Tensor
    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor | None
    kv_indices: torch.Tensor
    extend_lens: list[int]
    prefix_lens: list[int]
    seq_lens: list[int]
    attn_metadata: Any = field(default=None)
    shared_prefix: int = 0
    own_indptr: torch.Tensor | None = None
    own_indices: torch.Tensor | None = None

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
        input_ids: list[int] | torch.Tensor,
        positions: list[int],
        out_cache_loc: list[int],
        extend_lens: list[int],
        prefix_lens: list[int],
        kv_slots: list[list[int]],
        device: torch.device,
        shared_prefix_min: int = 0,
        split_only: bool = False,
    ) -> ForwardBatch:
        """`input_ids` may already be a tensor on `device` (the overlapped decode step takes the
        previous step's sampled ids without reading them back). With `shared_prefix_min`, a
        decode batch also gets its rows' common leading slots split off; with `split_only`, a
        batch so split gets only that split (class docstring)."""
        if len(extend_lens) != len(kv_slots):
            raise ValueError("extend_lens and kv_slots differ in length")
        seq_lens = [len(s) for s in kv_slots]
        qo, kv = indptr(extend_lens), indptr(seq_lens)
        shared = 0
        if mode is ForwardMode.DECODE and shared_prefix_min > 0:
            shared = shared_prefix_len(kv_slots)
            shared = shared if shared >= shared_prefix_min else 0
        full = not (shared and split_only)
        if full:
            head = qo + kv
            flat = np.fromiter(itertools.chain.from_iterable(kv_slots), np.int32, count=kv[-1])
        else:
            head = qo
            flat = np.fromiter(kv_slots[0], np.int32, count=shared)
        parts = [np.asarray(head, np.int32), flat]
        if shared:
            own = indptr(n - shared for n in seq_lens)
            own_flat = np.fromiter(
                itertools.chain.from_iterable(s[shared:] for s in kv_slots),
                dtype=np.int32,
                count=own[-1],
            )
            parts += [np.asarray(own, np.int32), own_flat]
        int32 = to_device(np.concatenate(parts), torch.int32, device)
        n = len(extend_lens) + 1
        end = len(head) + len(flat)
        on_device = isinstance(input_ids, torch.Tensor)
        int64 = to_device(
            positions + out_cache_loc + ([] if on_device else input_ids), torch.int64, device
        )
        tokens = len(positions)
        return cls(
            mode=mode,
            input_ids=input_ids if on_device else int64[2 * tokens :],
            positions=int64[:tokens],
            out_cache_loc=int64[tokens : 2 * tokens],
            qo_indptr=int32[:n],
            kv_indptr=int32[n : 2 * n] if full else None,
            kv_indices=int32[len(head) : end],
            extend_lens=list(extend_lens),
            prefix_lens=list(prefix_lens),
            seq_lens=seq_lens,
            shared_prefix=shared,
            own_indptr=int32[end : end + n] if shared else None,
            own_indices=int32[end + n :] if shared else None,
        )


def indptr(lens: Iterable[int]) -> list[int]:
    """Offsets of ragged rows of `lens` items: [0, l0, l0 + l1, ...]."""
    return list(itertools.accumulate(lens, initial=0))


def shared_prefix_len(kv_slots: list[list[int]]) -> int:
    """How many leading slots all of `kv_slots` have in common, below each one's last slot (a
    decode row's own new token). A slot holds one token's KV: two rows holding the same slot at
    position p share the radix-tree node there, so they share every position before p too.
    That makes "all rows agree at p" monotone in p, and a binary search over p finds the
    length in O(rows x log length)."""
    if len(kv_slots) < 2:
        return 0
    first = kv_slots[0]
    lo, hi = 0, min(len(s) for s in kv_slots) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        slot = first[mid - 1]
        if all(s[mid - 1] == slot for s in kv_slots):
            lo = mid
        else:
            hi = mid - 1
    return lo


def to_device(values: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values (a list, an array or a CPU tensor) as a `dtype` tensor on `device`; staged
    through pinned memory on CUDA, so the copy never waits for the work already queued there."""
    host = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
