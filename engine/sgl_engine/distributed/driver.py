"""Rank 0's side of tensor parallelism: start the follower ranks, lead them, watch them, stop them.

The engine process is rank 0 (a `ProcessEngine`'s child: the caller's process is only its front,
`engine_process.py`): it keeps the scheduler, the radix cache and the sampler, and holds shard 0
of the model. Ranks 1..N-1 are processes started with torch.multiprocessing (spawn);
each runs `worker.follow` and does, step by step, what rank 0's plan says. A rank that dies is
noticed by a watchdog thread: the other followers are stopped and every later (and the current)
forward pass raises `TensorParallelError` naming the rank, which fails those requests; the
engine then only has to be shut down. A collective that fails or times out (a rank that
hangs past `tp_timeout_s`) does the same: the ranks are out of step, so the followers are
stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing.connection
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.multiprocessing as mp

from sgl_engine.config import EngineConfig
from sgl_engine.distributed.group import (
    CollectiveError,
    TPGroup,
    destroy_group,
    drain,
    init_group,
)
from sgl_engine.errors import EngineUnavailableError
from sgl_engine.forward_batch import ForwardMode

log = logging.getLogger(__name__)

STOP, HEARTBEAT = "stop", "heartbeat"
JOIN_S = 10.0
CANNOT_SERVE = "this engine cannot serve any more requests, shut it down"


class TensorParallelError(EngineUnavailableError):
    """A tensor-parallel rank died or the group broke; this engine cannot serve any more."""


@dataclass(frozen=True)
class WorkerSpec:
    """What a follower rank needs to build its shard of the model runner."""

    config: EngineConfig
    model_path: str | None
    hf_config: Any
    context_length: int
    random_weights: bool
    init_method: str
    log_level: int = logging.WARNING

    def device(self, rank: int) -> torch.device:
        from sgl_engine.model_runner import pick_device

        base = pick_device(self.config.device)
        if base.type != "cuda":
            return base
        return torch.device("cuda", (base.index or 0) + rank)


@dataclass
class StepPlan:
    """One forward pass as the followers need it: the sequences without their sampling specs,
    which rows rank 0 samples (the logits all-gather), and how many input ids follow on the
    device group (a decode step launched from the previous step's ids), if any."""

    mode: ForwardMode
    seqs: list[Any]
    sampled: list[int]
    device_ids: int = 0


class TensorParallel:
    """Starts ranks 1..tp_size-1 and joins the group as rank 0.

    `publish` is called from the engine's scheduler thread only; a heartbeat thread keeps idle
    followers from timing out on the control group; a watchdog thread waits on the followers'
    process sentinels. `shutdown` stops all of them and leaves no process behind.
    """

    def __init__(
        self,
        config: EngineConfig,
        model_path: str | None,
        hf_config: Any,
        context_length: int,
        random_weights: bool,
    ) -> None:
        from sgl_engine.distributed.worker import worker_main

        self.size = config.tp_size
        self.timeout_s = config.tp_timeout_s
        self.heartbeat_s = min(30.0, config.tp_timeout_s / 10)  # idle followers hear from us
        self._tmp = tempfile.mkdtemp(prefix="sgl-tp-")
        spec = WorkerSpec(
            config,
            model_path,
            hf_config,
            context_length,
            random_weights,
            f"file://{self._tmp}/rdv",
            logging.getLogger().getEffectiveLevel(),
        )
        self.failure: str | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # one control broadcast at a time
        self._failing = threading.Lock()
        self._reaping = threading.Lock()
        self._last_sent = time.monotonic()
        self.ctx = mp.start_processes(
            worker_main, (spec,), nprocs=self.size - 1, join=False, daemon=True
        )
        self.procs = list(self.ctx.processes)
        self._watchdog = threading.Thread(target=self._watch, name="sgl-tp-watchdog", daemon=True)
        self._watchdog.start()
        self._heartbeat: threading.Thread | None = None
        try:
            self.group = self._rendezvous(spec)
        except BaseException:
            self.shutdown()
            raise

    def ready(self) -> None:
        """Every rank has built its shard (no more set-up collectives on the control group):
        from now on control collectives are bounded by `tp_timeout_s` (each follower does the
        same), and heartbeats keep idle followers from timing out."""
        self.group.bound_control(self.timeout_s)
        self._heartbeat = threading.Thread(target=self._beat, name="sgl-tp-heartbeat", daemon=True)
        self._heartbeat.start()

    def _rendezvous(self, spec: WorkerSpec) -> TPGroup:
        """Join the group, giving up as soon as a follower dies before it got there."""
        box: dict[str, Any] = {}

        def join() -> None:
            try:
                box["group"] = init_group(
                    0, self.size, spec.init_method, spec.device(0), spec.config.tp_timeout_s
                )
            except BaseException as exc:  # noqa: BLE001 -- handed to the caller
                box["error"] = exc

        thread = threading.Thread(target=join, name="sgl-tp-rendezvous", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.1)
            if self.failure is not None:
                raise TensorParallelError(self.failure)
        if "error" in box:
            raise box["error"]
        return box["group"]

    # ---- leading the followers -----------------------------------------------------------
    def publish(self, plan: StepPlan, input_ids: torch.Tensor | None = None) -> None:
        """Send a step's plan (and its device input ids) to the followers; scheduler thread."""
        if self.failure is not None:
            raise TensorParallelError(self.failure)
        with self._lock:
            self.group.broadcast_object(plan)
            self._last_sent = time.monotonic()
        if input_ids is not None:
            self.group.broadcast_tensor(input_ids.contiguous())

    @staticmethod
    def plan(mode: ForwardMode, seqs: list[Any], input_ids: torch.Tensor | None) -> StepPlan:
        return StepPlan(
            mode,
            [dataclasses.replace(s, sample=None) for s in seqs],
            [i for i, s in enumerate(seqs) if s.sample is not None],
            0 if input_ids is None else int(input_ids.numel()),
        )

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Wrap rank 0's part of a step that the followers run too (its collectives). Any error
        in it becomes `TensorParallelError` and stops the followers (`_broken`): rank 0 left the
        step part-way, so the ranks are out of step, whether a rank died, a collective failed
        or rank 0 itself raised."""
        if self.failure is not None:
            raise TensorParallelError(self.failure)
        try:
            yield
        except Exception as exc:
            self._broken(exc)
            raise TensorParallelError(self.failure) from exc

    def _broken(self, exc: BaseException) -> None:
        """Declare the group gone because of `exc`. A dead rank's watchdog names it best, so
        wait a moment for that; otherwise a failed collective (a rank that hangs, or a broken
        connection), or rank 0's own error, is declared here."""
        deadline = time.monotonic() + 1.0
        while self.failure is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.failure is not None:
            return
        if isinstance(exc, CollectiveError):
            reason = re.sub(r"\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", str(exc))
        else:
            reason = f"rank 0 failed part-way through a step ({type(exc).__name__}: {exc})"
        self._declare(f"{reason}; the ranks are out of step")

    def _beat(self) -> None:
        while not self._stopping.wait(self.heartbeat_s / 3):
            with self._lock:
                if self._stopping.is_set() or self.failure is not None:
                    return
                if time.monotonic() - self._last_sent < self.heartbeat_s:
                    continue
                try:
                    self.group.broadcast_object(HEARTBEAT)
                except Exception as exc:  # noqa: BLE001 -- reported as the group's failure
                    failed = exc
                else:
                    self._last_sent = time.monotonic()
                    continue
            if not self._stopping.is_set():
                self._broken(failed)
            return

    # ---- watching them -------------------------------------------------------------------
    def _watch(self) -> None:
        sentinels = {p.sentinel: rank for rank, p in enumerate(self.procs, start=1)}
        ready = multiprocessing.connection.wait(list(sentinels))
        if self._stopping.is_set():
            return
        rank = sentinels[ready[0]]
        proc = self.procs[rank - 1]
        proc.join(1.0)
        failure = f"tensor-parallel rank {rank} (pid {proc.pid}) {describe_exit(proc.exitcode)}"
        error = self._worker_error(rank)
        self._declare(f"{failure}: {error}" if error else failure)

    def _declare(self, failure: str) -> None:
        """The group is gone (the first reason given wins): every later step raises it, and the
        surviving followers are stopped, since they cannot go on without the others. That
        runs in a thread of its own: an NCCL abort can block for good (seen on two H200s), and
        the caller may be the scheduler thread."""
        with self._failing:
            if self.failure is not None:
                return
            self.failure = f"{failure}; {CANNOT_SERVE}"
        log.error("%s", self.failure)
        threading.Thread(target=self._abort, name="sgl-tp-abort", daemon=True).start()

    def _worker_error(self, rank: int) -> str:
        """The last line of the traceback the worker left behind, if it raised."""
        try:
            with open(self.ctx.error_files[rank - 1], "rb") as fh:
                import pickle

                text = pickle.load(fh)
        except (OSError, EOFError, ValueError, TypeError, AttributeError, ImportError):
            return ""
        lines = [line for line in str(text).splitlines() if line.strip()]
        return lines[-1].strip() if lines else ""

    def _abort(self) -> None:
        """Stop the surviving followers (they cannot go on without the dead rank) and break a
        collective rank 0 may be blocked in (NCCL does not notice a dead peer by itself)."""
        if self.group_is_nccl():
            with contextlib.suppress(Exception):
                from torch.distributed.distributed_c10d import _abort_process_group

                _abort_process_group(self.group.device_group)
        self._stop_procs(grace=2.0)

    def group_is_nccl(self) -> bool:
        group = getattr(self, "group", None)
        if group is None:
            return False
        import torch.distributed as dist

        return dist.get_backend(group.device_group) == "nccl"

    def _stop_procs(self, grace: float) -> None:
        with self._reaping:  # the abort thread and shutdown may both get here
            for p in self.procs:
                p.join(grace)
            for p in self.procs:
                if p.is_alive():
                    p.terminate()
                    p.join(grace)
                if p.is_alive():
                    p.kill()
                    p.join()

    # ---- stopping ------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Tell the followers to stop, wait for them (kill those that do not), leave the group.

        After a rank died the group is not torn down: on NCCL that abort can block for good (a
        collective never ends), and this process (a `ProcessEngine`'s child) exits next anyway."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        group = getattr(self, "group", None)
        left, told = group is None, False
        if self.failure is None and group is not None:
            drain()
            told = self._tell_stop()
            if told:
                destroy_group(group)  # with the followers, which do the same now
                left = True  # done, or stuck in its thread: never a second teardown
        self._stop_procs(grace=JOIN_S if told else 1.0)
        if self._heartbeat is not None:
            self._heartbeat.join(JOIN_S)
        if not left and self.failure is None:
            destroy_group(group, abort=True)
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _tell_stop(self) -> bool:
        """Broadcast STOP, waiting at most JOIN_S for the followers to take it (one that hangs
        is killed next, which ends the broadcast); returns whether they all took it."""
        told = threading.Event()

        def tell() -> None:
            with self._lock:
                try:
                    self.group.broadcast_object(STOP)
                except Exception:  # noqa: BLE001 -- they are killed next
                    return
                told.set()

        thread = threading.Thread(target=tell, name="sgl-tp-stop", daemon=True)
        thread.start()
        thread.join(JOIN_S)
        if not told.is_set():
            log.warning("the tensor-parallel ranks did not take the stop; killing them")
        return told.is_set()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]


def describe_exit(code: int | None) -> str:
    """How a process ended, for an error message ("was killed by SIGKILL", ...)."""
    if code is None:
        return "stopped responding"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"
