"""The built-in `ray` backend plugin: engine replicas as Ray actors, cache- and graph-aware
routing (see `backend.py`). Importing this module does not import Ray."""

from __future__ import annotations

from typing import Any

from sgl_plugins.backend import CAPABILITIES
from sgl_plugins.builtin.ray.backend import RayBackend, RayBackendFactory, ReplicaDiedError
from sgl_plugins.builtin.ray.replica_set import ReplicaPool, ReplicaSet
from sgl_plugins.builtin.ray.replicated_engine import ReplicatedEngine
from sgl_plugins.hookspecs import hookimpl

__all__ = [
    "RayBackend",
    "RayBackendFactory",
    "ReplicaDiedError",
    "ReplicaPool",
    "ReplicaSet",
    "ReplicatedEngine",
    "register_backends",
]


@hookimpl
def register_backends(register: Any) -> None:
    register(
        "ray",
        RayBackendFactory(),
        CAPABILITIES,
        description="engine replicas as Ray actors, cache- and graph-aware routing",
    )
