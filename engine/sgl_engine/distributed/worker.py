"""A follower rank (1..N-1): one process that holds its shard and follows rank 0's plans."""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import threading
import time

import torch

from sgl_engine.distributed.driver import HEARTBEAT, STOP, WorkerSpec
from sgl_engine.distributed.group import TPGroup, destroy_group, drain, init_group


def worker_main(index: int, spec: WorkerSpec) -> None:
    """The process entry point (torch.multiprocessing calls it with index = rank - 1). Logs at
    the engine process's level; SIGUSR1 prints every thread's stack (for a rank that hangs)."""
    from sgl_engine.model_runner import ModelRunner

    rank = index + 1
    logging.basicConfig(
        level=spec.log_level, format=f"%(asctime)s rank {rank} %(name)s %(message)s"
    )
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    _exit_with_parent()
    device = spec.device(rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, torch.get_num_threads() // spec.config.tp_size))
    group = init_group(
        rank, spec.config.tp_size, spec.init_method, device, spec.config.tp_timeout_s
    )
    try:
        runner = ModelRunner(
            spec.config.replace(device=str(device)),
            spec.model_path,
            spec.hf_config,
            spec.context_length,
            spec.random_weights,
            tp=group,
        )
        group.bound_control(spec.config.tp_timeout_s)  # rank 0's heartbeats keep us inside it
        follow(runner, group)
        runner.release()
        drain()
    finally:
        if not destroy_group(group):
            os._exit(0)  # a hung communicator teardown would hang the interpreter's exit too


def follow(runner, group: TPGroup) -> None:
    """Run every step rank 0 publishes, until it says stop (a broken group raises)."""
    while True:
        plan = group.broadcast_object()
        if plan == STOP:
            return
        if plan == HEARTBEAT:
            continue
        ids = None
        if plan.device_ids:
            ids = torch.empty(plan.device_ids, dtype=torch.int64, device=runner.device)
            group.broadcast_tensor(ids)
        runner.follow(plan.mode, plan.seqs, plan.sampled, ids)


def _exit_with_parent() -> None:
    """Leave at once if the engine process goes away without stopping us (e.g. SIGKILL)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="sgl-tp-parent-watch", daemon=True).start()
