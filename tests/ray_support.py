"""Helpers shared by the Ray tests that kill engines under live actors."""

from __future__ import annotations

import os
import signal

import ray
from sgl_engine.testing import process_gone


def engine_pids(backend, replica: int) -> list[int]:
    """The replica's engine processes: its engine process (rank 0), then its followers."""
    return ray.get(backend.replicas[replica].engine_pids.remote())


def kill_rank(backend, replica: int, index: int = 1) -> list[int]:
    """SIGKILL one of the replica's engine processes (default: rank 1); returns them all."""
    pids = engine_pids(backend, replica)
    os.kill(pids[index], signal.SIGKILL)
    return pids


def back(backend, replica: int, old_pids: list[int]) -> bool:
    """`replica` routed to again, with a healthy engine in new processes, the old ones gone."""
    return (
        replica in backend.router.live
        and ray.get(backend.replicas[replica].health.remote()) is None
        and not set(engine_pids(backend, replica)) & set(old_pids)
        and all(process_gone(p) for p in old_pids)
    )
