"""One-shot all-reduce over peer memory (torch symmetric memory), for the small messages of decode.

A TP decode step all-reduces two [rows, hidden] activations per layer: 8 KB a message at batch 1
on a 7B shape. NCCL's latency for such a message (~10-20 us) is most of a layer's budget, so
messages up to `max_bytes` go through `torch.ops.symm_mem.one_shot_all_reduce_copy` instead:
one kernel that writes this rank's tensor into its symmetric buffer, waits at a barrier on the
peers' signal pads, reads every peer's buffer over NVLink and sums, then waits at a second
barrier so no rank overwrites its buffer while a peer still reads it. Bigger messages (prefill)
stay on NCCL. Only point-to-point loads are used, never NVLink multicast (`multimem`).

The ranks must take the same path for every all-reduce or they deadlock: `fits` depends only on
the message's dtype and size, which are the same on every rank, and `setup` enables the path on
every rank or on none.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from sgl_engine.config import TP_ALL_REDUCE_MODES

log = logging.getLogger(__name__)

MAX_BYTES = 1 << 20
ALIGN = 16
REQUIRED = ("one_shot", "fused", "push")


class OneShotAllReduce:
    """A symmetric buffer of `max_bytes` shared with the group's peers. Collective to build."""

    def __init__(self, buffer: torch.Tensor, group_name: str) -> None:
        self.buffer = buffer
        self.group_name = group_name
        self.calls = 0

    def fits(self, x: torch.Tensor) -> bool:
        """Whether `x` takes this path: same dtype as the buffer, at most its size, and a whole
        number of 16-byte vectors (the kernel's access width on every rank)."""
        nbytes = x.numel() * x.element_size()
        return (
            x.dtype == self.buffer.dtype
            and 0 < x.numel() <= self.buffer.numel()
            and nbytes % ALIGN == 0
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's `x` (a new tensor of x's shape); `x` is left as it was."""
        x = x.contiguous()
        if x.data_ptr() % ALIGN:
            x = x.clone()
        self.calls += 1
        return torch.ops.symm_mem.one_shot_all_reduce_copy(
            self.buffer[: x.numel()].view(x.shape), x, "sum", self.group_name
        )


def setup(
    mode: str,
    device_group: Any,
    dtype: torch.dtype,
    device: torch.device,
    agree: Any,
    max_bytes: int = MAX_BYTES,
) -> OneShotAllReduce | None:
    """Build the one-shot path on every rank of `device_group`, or on none.

    `mode`: "nccl" (never), "one_shot" or "fused" (required: raises if any rank cannot; "fused"
    adds fused_norm.py's path on top), "auto" (on CUDA when every rank can, else NCCL with a
    warning). `agree(flag)` returns the minimum of every
    rank's int flag (the control group), so a rank that cannot allocate the buffer turns the
    path off everywhere before the collective rendezvous. Sets TORCH_SYMM_MEM_DISABLE_MULTICAST
    (unless already set): this path never uses multicast, so the rendezvous need not create it.
    """
    if mode not in TP_ALL_REDUCE_MODES:
        raise ValueError(f"tp_all_reduce must be one of {TP_ALL_REDUCE_MODES}")
    if mode == "nccl" or device.type != "cuda":
        if mode in REQUIRED:
            raise ValueError(f"tp_all_reduce={mode!r} needs CUDA devices")
        return None
    buffer, why = _allocate(dtype, device, max_bytes)
    if not agree(int(buffer is not None)):
        return _refuse(mode, why or "another rank could not allocate its symmetric buffer")
    from torch.distributed import _symmetric_memory as symm_mem

    name = device_group.group_name
    try:
        symm_mem.rendezvous(buffer, name)
        ok = True
    except Exception as exc:  # noqa: BLE001 -- agreed on below, reported by _refuse
        ok, why = False, f"rendezvous failed: {exc!r}"
    if not agree(int(ok)):
        return _refuse(mode, why or "another rank's rendezvous failed")
    log.info("one-shot all-reduce over symmetric memory for messages up to %d bytes", max_bytes)
    return OneShotAllReduce(buffer, name)


def _allocate(
    dtype: torch.dtype, device: torch.device, max_bytes: int
) -> tuple[torch.Tensor | None, str | None]:
    try:
        if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy"):
            return None, "this torch has no symm_mem.one_shot_all_reduce_copy"
        from torch.distributed import _symmetric_memory as symm_mem

        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        n = max_bytes // torch.empty((), dtype=dtype).element_size()
        return symm_mem.empty(n, dtype=dtype, device=device), None
    except Exception as exc:  # noqa: BLE001 -- agreed on by the caller
        return None, f"symmetric buffer allocation failed: {exc!r}"


def _refuse(mode: str, why: str) -> None:
    if mode in REQUIRED:
        raise RuntimeError(f"tp_all_reduce={mode!r} is not available: {why}")
    log.warning("one-shot all-reduce off, every all-reduce goes through NCCL: %s", why)
    return None
