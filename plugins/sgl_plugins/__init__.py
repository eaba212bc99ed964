"""sgl_plugins: the pluggy hook spec and plugin manager that backends plug into."""

from __future__ import annotations

from sgl_plugins.backend import Backend, BackendBase, ContinuationScore, StreamChunk
from sgl_plugins.hookspecs import hookimpl, hookspec
from sgl_plugins.manager import PluginManager, get_backend, get_plugin_manager

__all__ = [
    "Backend",
    "BackendBase",
    "ContinuationScore",
    "PluginManager",
    "StreamChunk",
    "get_backend",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
]
