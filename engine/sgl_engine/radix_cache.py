"""RadixAttention prefix cache: a radix tree from token ids to KV slot ids (SGLang's RadixCache).

Pure Python over ints. Every node's key and value are page-aligned; a node is keyed in its
parent by its first page. Requests lock the deepest node of the prefix they use; eviction
frees least-recently-used unlocked leaves. Not thread-safe: the scheduler thread owns it.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any


class TreeNode:
    """One edge of the radix tree: ``key`` token ids stored in KV slots ``value``.

    ``lock_ref`` counts the requests using this node or one of its descendants;
    ``last_access`` is the cache's logical clock at the last match/insert through it.
    """

    __slots__ = ("key", "value", "children", "parent", "lock_ref", "last_access", "id")

    def __init__(
        self,
        key: list[int],
        value: list[int],
        parent: TreeNode | None,
        last_access: int,
        node_id: int,
        lock_ref: int = 0,
    ) -> None:
        self.key = key
        self.value = value
        self.children: dict[tuple[int, ...], TreeNode] = {}
        self.parent = parent
        self.lock_ref = lock_ref
        self.last_access = last_access
        self.id = node_id

    def __repr__(self) -> str:
        return f"TreeNode(id={self.id}, len={len(self.key)}, lock_ref={self.lock_ref})"


@dataclass
class MatchResult:
    """Result of ``RadixCache.match_prefix``.

    ``indices``: slots of the matched prefix, length a multiple of page_size.
    ``last_node``: deepest node of the match (root if none); lock it while a request uses it.
    """

    indices: list[int]
    last_node: TreeNode


class RadixCache:
    """Prefix cache over token ids. The tree owns the slots it holds; ``free_slots`` gives
    them back to the allocator on eviction (and only then)."""

    def __init__(
        self, free_slots: Callable[[list[int]], None], page_size: int = 1, disable: bool = False
    ) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.free_slots = free_slots
        self.page_size = page_size
        self.disable = disable
        self._clear()

    def reset(self) -> None:
        """Drop every node WITHOUT calling free_slots (reset the allocator too).

        Raises RuntimeError (changing nothing) if any node is locked.
        """
        if self._protected:
            raise RuntimeError(f"cannot reset: {self._protected} tokens are locked")
        self._clear()

    def aligned_len(self, n: int) -> int:
        """``n`` rounded down to a multiple of page_size (what insert stores of n tokens)."""
        return n - n % self.page_size

    def match_prefix(self, key: Sequence[int]) -> MatchResult:
        """Longest cached page-aligned prefix of ``key``.

        Mutates: splits a node if the match ends inside it; sets last_access on the path.
        Disabled -> empty match at root.
        """
        if self.disable:
            return MatchResult([], self.root)
        key = self._aligned_key(key)
        node, _, values = self._walk(key)
        return MatchResult(list(itertools.chain.from_iterable(values)), node)

    def insert(self, key: Sequence[int], value: Sequence[int]) -> int:
        """Insert key -> value; only the first ``aligned_len(len(key))`` tokens are stored.

        Returns how many leading tokens were ALREADY in the tree. The tree keeps its own slots
        for those, so the caller must free the duplicates ``value[len(own locked prefix):
        returned]``. The tree takes ownership of ``value[returned:aligned_len(len(key))]`` (as
        evictable); the unstored tail ``value[aligned_len(len(key)):]`` stays the caller's.
        Mutates: may split a node, adds at most one leaf, sets last_access on the path.
        Disabled -> no-op, returns 0 and takes nothing (all of value stays the caller's).
        """
        if len(key) != len(value):
            raise ValueError(f"key and value lengths differ: {len(key)} != {len(value)}")
        if self.disable:
            return 0
        key = self._aligned_key(key)
        node, matched, _ = self._walk(key)
        if matched < len(key):
            leaf = self._new_node(key[matched:], list(value[matched : len(key)]), node)
            node.children[self._page(leaf.key)] = leaf
            self._evictable += len(leaf.value)
        return matched

    def inc_lock_ref(self, node: TreeNode) -> None:
        """lock_ref += 1 on ``node`` and its ancestors (not root); sizes of nodes going 0 -> 1
        move from evictable to protected."""
        self._check_attached(node)
        while node is not self.root:
            if node.lock_ref == 0:
                self._evictable -= len(node.value)
                self._protected += len(node.value)
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def dec_lock_ref(self, node: TreeNode) -> None:
        """Reverse of inc_lock_ref. Raises ValueError (changing nothing) if a lock_ref on the
        path would go negative."""
        self._check_attached(node)
        n = node
        while n is not self.root:
            if n.lock_ref <= 0:
                raise ValueError(f"lock_ref of {n!r} would go negative")
            n = n.parent  # type: ignore[assignment]
        while node is not self.root:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._protected -= len(node.value)
                self._evictable += len(node.value)
            node = node.parent  # type: ignore[assignment]

    def evict(self, num_tokens: int) -> int:
        """Evict least-recently-used unlocked leaves until ``num_tokens`` are freed or nothing
        is evictable; a parent that becomes an unlocked leaf is a candidate too. Calls
        free_slots(node.value) per evicted node. Returns tokens freed (may differ from
        num_tokens: whole nodes are evicted)."""
        if self.disable or num_tokens <= 0:
            return 0
        heap = [(n.last_access, n.id, n) for n in self._nodes() if self._is_evictable_leaf(n)]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            assert parent is not None
            del parent.children[self._page(node.key)]
            node.parent = None
            self._evictable -= len(node.value)
            freed += len(node.value)
            self.free_slots(node.value)
            if self._is_evictable_leaf(parent):
                heapq.heappush(heap, (parent.last_access, parent.id, parent))
        return freed

    def evictable_size(self) -> int:
        """Tokens held by unlocked nodes."""
        return self._evictable

    def protected_size(self) -> int:
        """Tokens held by locked nodes."""
        return self._protected

    def total_size(self) -> int:
        """Tokens (== slots) held by the tree."""
        return self._evictable + self._protected

    def all_slots(self) -> list[int]:
        """Every slot the tree holds (for leak checks)."""
        return [slot for node in self._nodes() for slot in node.value]

    def check_integrity(self) -> None:
        """Raise AssertionError describing the first broken invariant, if any.

        Checked: evictable/protected counters equal the sums over unlocked/locked nodes; every
        node has equal, non-empty, page-aligned key and value, is filed under its first page,
        points back at its parent, has 0 <= sum(children's lock_ref) <= lock_ref and
        last_access <= its parent's; no slot appears twice.
        """
        root = self.root
        assert root.parent is None and not root.key and not root.value, "root is not empty"
        assert root.lock_ref == 0, f"root lock_ref is {root.lock_ref}"
        evictable = protected = 0
        seen: set[int] = set()
        for node in self._nodes():
            if node is not root:
                self._check_node(node)
                if node.lock_ref == 0:
                    evictable += len(node.value)
                else:
                    protected += len(node.value)
            for slot in node.value:
                assert slot not in seen, f"slot {slot} appears twice in the tree"
                seen.add(slot)
            for page, child in node.children.items():
                assert child.parent is node, f"{child!r} has a wrong parent"
                assert page == self._page(child.key), f"{child!r} is filed under {page}"
        assert evictable == self._evictable, f"evictable {self._evictable} != real {evictable}"
        assert protected == self._protected, f"protected {self._protected} != real {protected}"

    def pretty(self) -> str:
        """Indented dump of the tree, one node per line."""
        lines = [
            f"root evictable={self._evictable} protected={self._protected} clock={self._clock}"
        ]
        stack = [(child, 1) for child in reversed(list(self.root.children.values()))]
        while stack:
            node, depth = stack.pop()
            lines.append(
                f"{'  ' * depth}#{node.id} key={_short(node.key)} value={_short(node.value)} "
                f"lock_ref={node.lock_ref} last_access={node.last_access}"
            )
            stack.extend((c, depth + 1) for c in reversed(list(node.children.values())))
        return "\n".join(lines)

    def _clear(self) -> None:
        self._ids = itertools.count()
        self._clock = 0
        self._evictable = 0
        self._protected = 0
        self.root = TreeNode([], [], None, 0, next(self._ids))

    def _walk(self, key: list[int]) -> tuple[TreeNode, int, list[list[int]]]:
        """Follow ``key`` (page-aligned) from root, splitting the node where the match ends
        inside it and stamping the path. Returns (deepest node, matched length, values)."""
        self._clock += 1
        node, pos, values = self.root, 0, []
        node.last_access = self._clock
        while pos < len(key):
            child = node.children.get(self._page(key, pos))
            if child is None:
                break
            n = self._common_len(child.key, key, pos)
            partial = n < len(child.key)
            if partial:
                child = self._split(child, n)
            child.last_access = self._clock
            values.append(child.value)
            node, pos = child, pos + n
            if partial:
                break
        return node, pos, values

    def _common_len(self, node_key: list[int], key: list[int], pos: int) -> int:
        """Page-aligned length of the common prefix of node_key and key[pos:]."""
        end = pos + len(node_key)
        if key[pos:end] == node_key:
            return len(node_key)
        i = 0
        for a, b in zip(node_key, itertools.islice(key, pos, None), strict=False):
            if a != b:
                break
            i += 1
        return i - i % self.page_size

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut ``child`` after n tokens; the new upper node takes its place and lock_ref, and
        ``child`` (the object requests may have locked) keeps the suffix."""
        parent = child.parent
        assert parent is not None
        upper = self._new_node(child.key[:n], child.value[:n], parent, child.lock_ref)
        upper.last_access = child.last_access
        child.key, child.value = child.key[n:], child.value[n:]
        child.parent = upper
        upper.children[self._page(child.key)] = child
        parent.children[self._page(upper.key)] = upper
        return upper

    def _new_node(
        self, key: list[int], value: list[int], parent: TreeNode, lock_ref: int = 0
    ) -> TreeNode:
        return TreeNode(key, value, parent, self._clock, next(self._ids), lock_ref)

    def _check_node(self, node: TreeNode) -> None:
        parent = node.parent
        assert parent is not None
        assert node.key, f"{node!r} has an empty key"
        assert len(node.key) == len(node.value), f"{node!r} key/value lengths differ"
        assert len(node.key) % self.page_size == 0, f"{node!r} is not page-aligned"
        assert node.lock_ref >= 0, f"{node!r} has negative lock_ref"
        child_locks = sum(c.lock_ref for c in node.children.values())
        assert node.lock_ref >= child_locks, f"{node!r} lock_ref < its children's ({child_locks})"
        if parent is not self.root:
            assert parent.last_access >= node.last_access, f"{node!r} newer than its parent"

    def _is_evictable_leaf(self, node: TreeNode) -> bool:
        return node is not self.root and not node.children and node.lock_ref == 0

    def _check_attached(self, node: TreeNode) -> None:
        n = node
        while n.parent is not None:
            n = n.parent
        if n is not self.root:
            raise ValueError(f"{node!r} is not in this tree (evicted or reset?)")

    def _nodes(self) -> Iterator[TreeNode]:
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _aligned_key(self, key: Sequence[int]) -> list[int]:
        key = list(key)
        del key[self.aligned_len(len(key)) :]
        return key

    def _page(self, key: list[int], pos: int = 0) -> tuple[int, ...]:
        return tuple(key[pos : pos + self.page_size])


def common_prefix_len(a: Sequence[Any], b: Sequence[Any]) -> int:
    """How many leading items (token ids, or the call-graph segments of sgl_plugins.graph) `a`
    and `b` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _short(xs: list[int], limit: int = 8) -> str:
    return str(xs) if len(xs) <= limit else f"[{', '.join(map(str, xs[:limit]))}, ...]+{len(xs)}"
