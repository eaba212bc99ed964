"""The router's approximate prefix tree: which replica (tenant) probably holds which prefix.

Like sgl-router's tree: one radix tree over token ids shared by all tenants; each node records
the tenants that sent a prompt through it and when (a logical clock). It is approximate by
design: it sees the prompts the router sent, not the outputs the replicas appended nor what
their caches evicted; `evict` bounds each tenant's share to roughly its replica's KV capacity,
least recently routed first. Invariant: a tenant present at a node is present at all its
ancestors. Pure Python, not thread-safe (the `Router` holds a lock around it).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence


class _Node:
    __slots__ = ("key", "children", "parent", "tenants", "id")

    def __init__(self, key: tuple[int, ...], parent: _Node | None, node_id: int) -> None:
        self.key = key
        self.children: dict[int, _Node] = {}
        self.parent = parent
        self.tenants: dict[int, int] = {}  # tenant -> clock of its last insert through here
        self.id = node_id


class PrefixTree:
    """Token-id radix tree with per-node tenants. `insert` and `evict`/`remove_tenant` mutate;
    `match` and `size` only read."""

    def __init__(self) -> None:
        self._ids = itertools.count()
        self._clock = 0
        self.root = _Node((), None, next(self._ids))
        self._size: dict[int, int] = {}
        self._nodes_of: dict[int, set[_Node]] = {}

    def insert(self, tokens: Sequence[int], tenant: int) -> None:
        """Record that `tenant` holds `tokens` (and so every prefix of it)."""
        self._clock += 1
        tokens = tuple(tokens)
        node, pos = self.root, 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                child = _Node(tokens[pos:], node, next(self._ids))
                node.children[tokens[pos]] = child
                self._touch(child, tenant)
                return
            n = _common_len(child.key, tokens, pos)
            if n < len(child.key):
                child = self._split(child, n)
            self._touch(child, tenant)
            node, pos = child, pos + n

    def match(self, tokens: Sequence[int]) -> dict[int, int]:
        """For each tenant holding a prefix of `tokens`: the length of its longest one."""
        out: dict[int, int] = {}
        node, pos = self.root, 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            n = _common_len(child.key, tokens, pos)
            for tenant in child.tenants:
                out[tenant] = pos + n
            if n < len(child.key):
                break
            node, pos = child, pos + n
        return out

    def size(self, tenant: int) -> int:
        """Tokens the tree attributes to `tenant`."""
        return self._size.get(tenant, 0)

    def evict(self, tenant: int, max_tokens: int) -> int:
        """Drop `tenant` from its least recently routed leaf-most nodes until it holds at most
        `max_tokens`; nodes no tenant holds any more are removed. Returns tokens dropped."""
        if self.size(tenant) <= max_tokens:
            return 0
        heap = [
            (n.tenants[tenant], n.id, n)
            for n in self._nodes_of.get(tenant, ())
            if self._is_tenant_leaf(n, tenant)
        ]
        heapq.heapify(heap)
        dropped = 0
        while heap and self.size(tenant) > max_tokens:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            dropped += self._drop(node, tenant)
            if parent is not None and parent is not self.root:
                if tenant in parent.tenants and self._is_tenant_leaf(parent, tenant):
                    heapq.heappush(heap, (parent.tenants[tenant], parent.id, parent))
        return dropped

    def remove_tenant(self, tenant: int) -> None:
        """Forget everything about `tenant` (a replica that died or was flushed)."""
        for node in sorted(self._nodes_of.get(tenant, ()), key=_depth, reverse=True):
            self._drop(node, tenant)
        self._nodes_of.pop(tenant, None)
        self._size.pop(tenant, None)

    def check_integrity(self) -> None:
        """Assert the tenant invariant and the per-tenant sizes (for tests)."""
        sizes: dict[int, int] = {}
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            assert node.key, f"node {node.id} has an empty key"
            assert node.tenants, f"node {node.id} has no tenant"
            assert node.parent is not None and node.parent.children[node.key[0]] is node
            if node.parent is not self.root:
                missing = set(node.tenants) - set(node.parent.tenants)
                assert not missing, f"tenants {missing} at node {node.id} but not its parent"
            for tenant in node.tenants:
                sizes[tenant] = sizes.get(tenant, 0) + len(node.key)
            stack.extend(node.children.values())
        real = {t: s for t, s in self._size.items() if s}
        assert sizes == real, f"sizes {real} != recomputed {sizes}"

    def _touch(self, node: _Node, tenant: int) -> None:
        if tenant not in node.tenants:
            self._size[tenant] = self._size.get(tenant, 0) + len(node.key)
            self._nodes_of.setdefault(tenant, set()).add(node)
        node.tenants[tenant] = self._clock

    def _split(self, child: _Node, n: int) -> _Node:
        """Cut `child` after n tokens; the upper half takes its place and its tenants."""
        parent = child.parent
        assert parent is not None
        upper = _Node(child.key[:n], parent, next(self._ids))
        upper.tenants = dict(child.tenants)
        for tenant in upper.tenants:
            self._nodes_of[tenant].add(upper)
        child.key = child.key[n:]
        child.parent = upper
        upper.children[child.key[0]] = child
        parent.children[upper.key[0]] = upper
        return upper

    def _drop(self, node: _Node, tenant: int) -> int:
        if tenant not in node.tenants:
            return 0
        del node.tenants[tenant]
        self._size[tenant] -= len(node.key)
        self._nodes_of[tenant].discard(node)
        if not node.tenants and node.parent is not None:
            assert not node.children, "a node without tenants has no children (invariant)"
            del node.parent.children[node.key[0]]
            node.parent = None
        return len(node.key)

    @staticmethod
    def _is_tenant_leaf(node: _Node, tenant: int) -> bool:
        return not any(tenant in c.tenants for c in node.children.values())


def _common_len(key: tuple[int, ...], tokens: tuple[int, ...] | Sequence[int], pos: int) -> int:
    end = pos + len(key)
    if tuple(tokens[pos:end]) == key:
        return len(key)
    i = 0
    for a, b in zip(key, itertools.islice(tokens, pos, None), strict=False):
        if a != b:
            break
        i += 1
    return i


def _depth(node: _Node) -> int:
    depth = 0
    while node.parent is not None:
        node, depth = node.parent, depth + 1
    return depth
