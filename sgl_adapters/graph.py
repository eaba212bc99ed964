"""Re-export of the CallGraph contract, which lives in `sgl_plugins.graph` (the plugin layer
owns the contract; front doors and older imports keep using this name)."""

from __future__ import annotations

from sgl_plugins.backend import (
    CAPABILITIES,
    Backend,
    BackendBase,
    ContinuationScore,
    StreamChunk,
)
from sgl_plugins.graph import (
    CONSTRAINT_KEYS,
    ROOT,
    CallGraph,
    Leaf,
    LeafResult,
    Node,
    SharedPrefix,
    Usage,
    common_prefix_len,
)

__all__ = [
    "CAPABILITIES",
    "CONSTRAINT_KEYS",
    "ROOT",
    "Backend",
    "BackendBase",
    "CallGraph",
    "ContinuationScore",
    "Leaf",
    "LeafResult",
    "Node",
    "SharedPrefix",
    "StreamChunk",
    "Usage",
    "common_prefix_len",
]
