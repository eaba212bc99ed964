"""The tensor-parallel process group of one rank: collectives on activations, control broadcasts.

Two torch.distributed groups over the same ranks: the default group (gloo, on the CPU) carries
the step plans rank 0 broadcasts to the followers; `device_group` (NCCL on CUDA, gloo on the
CPU) carries the all-reduces and all-gathers of the model. Both are bounded by `tp_timeout_s`
once set-up is over (the control group allows longer while the ranks load their shards), so
that a stuck or vanished rank raises `CollectiveError` instead of hanging the others.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _abort_process_group

from sgl_engine.distributed import fused_norm, one_shot, push_norm

try:
    from torch.distributed.distributed_c10d import _set_pg_timeout
except ImportError:  # older torch: the control group keeps its set-up timeout
    _set_pg_timeout = None

log = logging.getLogger(__name__)

CONTROL_TIMEOUT = datetime.timedelta(minutes=30)
DESTROY_TIMEOUT_S = 15.0
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class CollectiveError(RuntimeError):
    """A collective of the tensor-parallel group failed: a peer timed out, went away or broke
    the connection. The ranks are out of step, so the group cannot be used again."""


@contextlib.contextmanager
def _collective(what: str):
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as exc:
        raise CollectiveError(f"tensor-parallel {what} failed: {exc}") from exc


@dataclass
class TPGroup:
    """One rank's view of the group. Holds process groups only; no model state."""

    rank: int
    size: int
    device_group: Any = None
    fast: one_shot.OneShotAllReduce | None = None
    fused: fused_norm.FusedAllReduceNorm | None = None
    push: push_norm.PushAllReduceNorm | None = None

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks and return the sum: a new tensor on the one-shot path (small
        messages, when enabled), else `x` summed in place over the device group."""
        if self.fast is not None and self.fast.fits(x):
            return self.fast(x)
        with _collective("all-reduce"):
            dist.all_reduce(x, group=self.device_group)
        return x

    def all_reduce_add_rmsnorm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, ops: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The end of a block half whose row-parallel layer left its all-reduce to us: returns
        (rmsnorm(sum + residual), sum + residual) of the ranks' partial sums `x`, in one fused
        kernel when enabled and `x` fits, else `all_reduce` then `ops.add_rmsnorm`. Partial sums
        that a product already pushed to the peer (`push_norm.py`) take that path's kernel."""
        if self.push is not None and self.push.took(x):
            return self.push(x, residual, weight, eps)
        if self.fused is not None and self.fused.fits(x):
            return self.fused(x, residual, weight, eps)
        return ops.add_rmsnorm(self.all_reduce(x), residual, weight, eps)

    def enable_fast_paths(
        self, mode: str, dtype: torch.dtype, device: torch.device, hidden: int
    ) -> bool:
        """Collective (every rank, same `mode`, before any CUDA graph is captured): set up the
        one-shot all-reduce for `dtype` messages per `mode` (see `one_shot.setup`) and, for
        "fused" and "push", the fused all-reduce + add + RMSNorm of `hidden`-wide rows
        (`fused_norm.py`), and for "push" the pushing batch-1 products where they apply
        (`push_norm.py`). Mutates `fast`, `fused` and `push`; returns whether the one-shot path
        is on."""
        self.fast = one_shot.setup(mode, self.device_group, dtype, device, self.min_int)
        args = (self.device_group, self.rank, self.size, hidden, dtype, device, self.min_int)
        if mode in ("fused", "push"):
            self.fused = fused_norm.setup(*args)
        if mode == "push":
            self.push = push_norm.setup(*args)
        return self.fast is not None

    def drop_fast_paths(self) -> None:
        """Forget the one-shot and fused paths (their peer memory goes with the group)."""
        self.fast = None
        if self.push is not None:
            self.push.close()
            self.push = None
        if self.fused is not None:
            self.fused.close()
            self.fused = None

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's [n, d] `x` along the last dimension (rank order): one
        all-gather into one [size * n, d] buffer, then a transpose."""
        n, d = x.shape
        out = torch.empty((self.size * n, d), dtype=x.dtype, device=x.device)
        with _collective("all-gather"):
            _all_gather_single(out, x.contiguous(), group=self.device_group)
        return out.view(self.size, n, d).transpose(0, 1).reshape(n, self.size * d)

    def broadcast_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` into every rank's `x` (same shape and dtype everywhere), on the device."""
        with _collective("broadcast"):
            dist.broadcast(x, src=0, group=self.device_group)
        return x

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's `obj` (picklable) to every rank, over the CPU control group."""
        box = [obj]
        with _collective("control broadcast"):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def min_int(self, value: int) -> int:
        """The smallest of every rank's `value` (the control group, on the CPU)."""
        t = torch.tensor([value], dtype=torch.int64)
        with _collective("control all-reduce"):
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    @staticmethod
    def bound_control(timeout_s: float) -> None:
        """Set-up is over on this rank: from now on a control collective that waits longer than
        `timeout_s` for a peer raises (rank 0's heartbeats keep idle followers inside it).
        Mutates the default process group's timeout."""
        if _set_pg_timeout is None:
            log.warning(
                "this torch cannot change a process group's timeout: the control group keeps "
                "its %s set-up timeout, so a rank that hangs holds the others that long",
                CONTROL_TIMEOUT,
            )
            return
        _set_pg_timeout(datetime.timedelta(seconds=timeout_s))


def init_group(
    rank: int, size: int, init_method: str, device: torch.device, timeout_s: float
) -> TPGroup:
    """Join the group (every rank calls this with the same arguments but `rank`)."""
    if dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is already initialised in this process: one tensor-parallel "
            "engine per process (shut the other one down first)"
        )
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=size, timeout=CONTROL_TIMEOUT
    )
    backend = "nccl" if device.type == "cuda" else "gloo"
    device_group = dist.new_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return TPGroup(rank, size, device_group)


def drain() -> None:
    """Wait for this rank's queued kernels. Every rank does so before leaving the group: a rank
    that tears its communicator down with collectives still in flight strands its peers' halves
    of them, and their next synchronisation never returns (seen at shutdown on two H200s)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def destroy_group(
    group: TPGroup | None = None, abort: bool = False, timeout_s: float = DESTROY_TIMEOUT_S
) -> bool:
    """Leave the groups, waiting at most `timeout_s`; returns whether the teardown finished.

    Normally every rank calls this at about the same time, all still alive and idle (rank 0
    right after telling the followers to stop, before waiting for them to exit): NCCL's
    teardown is collective (it finalises with the peers), so a rank that destroys its group
    after its peers have exited waits for them forever (seen on two H200s). `abort` (a rank
    died) aborts the NCCL communicator instead, which does not wait for peers. The teardown
    runs in a daemon thread so that a communicator that still hangs costs an error in the log,
    not the engine's shutdown; this process then cannot start another tensor-parallel engine.
    """
    if not dist.is_initialized():
        return True
    thread = threading.Thread(
        target=_destroy, args=(group, abort), name="sgl-tp-destroy", daemon=True
    )
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        log.error(
            "leaving the tensor-parallel process group did not finish in %.0f s; left behind "
            "(this process cannot start another tensor-parallel engine)",
            timeout_s,
        )
        return False
    return True


def _destroy(group: TPGroup | None, abort: bool) -> None:
    dg = group.device_group if group is not None else None
    if abort and dg is not None and dist.get_backend(dg) == "nccl":
        with contextlib.suppress(ValueError, RuntimeError):
            _abort_process_group(dg)
    dist.destroy_process_group()


def shard_range(total: int, rank: int, size: int, what: str) -> tuple[int, int]:
    """[start, end) of rank's equal share of `total` (which must divide evenly)."""
    if total % size:
        raise ValueError(f"{what} ({total}) is not divisible by tp_size ({size})")
    n = total // size
    return rank * n, (rank + 1) * n
