"""The built-in `ray` backend plugin: engine replicas as Ray actors, cache- and graph-aware
routing (see `backend.py`). Importing this module does not import Ray."""

from __future__ import annotations

from typing import Any

from sgl_plugins.backend import CAPABILITIES
from sgl_plugins.builtin.ray.backend import RayBackend, ReplicaDiedError
from sgl_plugins.hookspecs import hookimpl

__all__ = ["RayBackend", "ReplicaDiedError", "register_backends"]


@hookimpl
def register_backends(register: Any) -> None:
    register(
        "ray",
        RayBackend,
        CAPABILITIES,
        description="engine replicas as Ray actors, cache- and graph-aware routing",
    )
