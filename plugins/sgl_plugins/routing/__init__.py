"""Cache- and graph-aware routing over replicas (pure Python; used by the `ray` backend and by
`benchmarks/sim_routing.py`)."""

from __future__ import annotations

from sgl_plugins.routing.groups import Unit, graph_units, prompt_units, subgraph
from sgl_plugins.routing.prefix_tree import PrefixTree
from sgl_plugins.routing.router import POLICIES, Decision, NoReplicaError, Router, RouterConfig

__all__ = [
    "POLICIES",
    "Decision",
    "NoReplicaError",
    "PrefixTree",
    "Router",
    "RouterConfig",
    "Unit",
    "graph_units",
    "prompt_units",
    "subgraph",
]
