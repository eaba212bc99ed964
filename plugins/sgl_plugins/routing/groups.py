"""Routing units of a CallGraph: which leaves must travel together, and on what key.

Graph-aware: one unit per subtree under the root (leaves in different root subtrees share no
prompt token), keyed by the subtree's deepest node common to all its leaves -- so every leaf
under a shared node goes to one replica. Otherwise one unit per leaf, keyed by its prompt.
`subgraph` cuts the leaves routed to one replica out of a graph, keeping their shared nodes.
Reads graphs only; duck-typed on CallGraph (nodes, leaves, children, leaves_at, prompt_ids).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sgl_plugins.graph import common_prefix_len


@dataclass(frozen=True)
class Unit:
    """Leaves routed together; `key` is their shared prompt prefix, `prompts` their prompts."""

    leaves: tuple[int, ...]
    key: tuple[int, ...]
    prompts: tuple[tuple[int, ...], ...]


def graph_units(graph: Any, tokenizer: Any = None, *, grouped: bool = True) -> list[Unit]:
    """The routing units of `graph` in leaf order of their first leaf (see the module doc)."""
    prompts: dict[int, tuple[int, ...]] = {}

    def prompt(node: int) -> tuple[int, ...]:
        if node not in prompts:
            prompts[node] = tuple(graph.prompt_ids(node, tokenizer))
        return prompts[node]

    if not grouped:
        return [Unit((leaf.id,), prompt(leaf.node), (prompt(leaf.node),)) for leaf in graph.leaves]
    units = [
        Unit((leaf_id,), (), ((),)) for leaf_id in graph.leaves_at(graph.root)
    ]  # leaves on the empty prompt
    for child in graph.children(graph.root):
        leaf_ids = sorted(_subtree_leaves(graph, child))
        if not leaf_ids:
            continue
        key = prompt(_branch_node(graph, child))
        units.append(
            Unit(tuple(leaf_ids), key, tuple(prompt(graph.leaf(i).node) for i in leaf_ids))
        )
    return sorted(units, key=lambda u: u.leaves[0])


def prompt_units(prompts: Sequence[Sequence[int]], *, grouped: bool = True) -> list[Unit]:
    """Units of a plain batch of token-id prompts (unit leaves are prompt indices): grouped by
    their first token, keyed by the group's common prefix."""
    if not grouped:
        return [Unit((i,), tuple(p), (tuple(p),)) for i, p in enumerate(prompts)]
    groups: dict[int | None, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p[0] if len(p) else None, []).append(i)
    units = []
    for members in groups.values():
        seqs = [tuple(prompts[i]) for i in members]
        units.append(Unit(tuple(members), _common_prefix(seqs), tuple(seqs)))
    return sorted(units, key=lambda u: u.leaves[0])


def subgraph(graph: Any, leaf_ids: Sequence[int]) -> tuple[Any, list[int]]:
    """A new graph of the same class holding `leaf_ids` (in that order) and the nodes on their
    paths; returns it and the original id of each of its leaves."""
    out = type(graph)()
    mapped = {graph.root: out.root}
    for leaf_id in leaf_ids:
        leaf = graph.leaf(leaf_id)
        for node in graph.path(leaf.node):
            if node.id not in mapped:
                mapped[node.id] = out.add_node(
                    mapped[node.parent], node.text, token_ids=node.token_ids
                )
        out.add_leaf(
            mapped[leaf.node],
            dict(leaf.sampling_params),
            regex=leaf.regex,
            json_schema=leaf.json_schema,
            ebnf=leaf.ebnf,
            choices=leaf.choices,
            return_logprob=leaf.return_logprob,
            logprob_start_len=leaf.logprob_start_len,
            top_logprobs_num=leaf.top_logprobs_num,
            metadata=leaf.metadata,
        )
    return out, list(leaf_ids)


def _subtree_leaves(graph: Any, node: int) -> list[int]:
    out, stack = [], [node]
    while stack:
        n = stack.pop()
        out.extend(graph.leaves_at(n))
        stack.extend(graph.children(n))
    return out


def _branch_node(graph: Any, node: int) -> int:
    """Walk down single-child chains without leaves: the deepest node all leaves share."""
    while not graph.leaves_at(node) and len(graph.children(node)) == 1:
        (node,) = graph.children(node)
    return node


def _common_prefix(seqs: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    first = seqs[0]
    n = len(first)
    for s in seqs[1:]:
        n = common_prefix_len(first[:n], s)
    return first[:n]
