"""sgl_plugins: the pluggy hook spec, the plugin manager, and the contract backends implement
(the Backend protocol in `backend`, CallGraph and its result types in `graph`)."""

from __future__ import annotations

from sgl_plugins.backend import (
    CAPABILITIES,
    Backend,
    BackendBase,
    ContinuationScore,
    StreamChunk,
)
from sgl_plugins.graph import CallGraph, Leaf, LeafResult, Usage, common_prefix_len
from sgl_plugins.hookspecs import hookimpl, hookspec
from sgl_plugins.manager import PluginManager, get_backend, get_plugin_manager

__all__ = [
    "CAPABILITIES",
    "Backend",
    "BackendBase",
    "CallGraph",
    "ContinuationScore",
    "Leaf",
    "LeafResult",
    "PluginManager",
    "StreamChunk",
    "Usage",
    "common_prefix_len",
    "get_backend",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
]
