from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
)
from sgl_engine.allocator import SlotAllocator
from sgl_engine.radix_cache import RadixCache, TreeNode


class Recorder:
    """free_slots callback that remembers each batch it was given."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __call__(self, slots: list[int]) -> None:
        self.batches.append(list(slots))


def make(page_size: int = 1, disable: bool = False) -> tuple[RadixCache, Recorder]:
    rec = Recorder()
    return RadixCache(rec, page_size=page_size, disable=disable), rec


def slots_for(tokens: Sequence[int], base: int) -> list[int]:
    return [base + i for i in range(len(tokens))]


def test_empty_tree_matches_nothing_at_root() -> None:
    cache, _ = make()
    m = cache.match_prefix([1, 2, 3])
    assert m.indices == [] and m.last_node is cache.root
    assert cache.match_prefix([]).indices == []
    cache.check_integrity()


def test_match_full_and_partial_prefix_splits_node() -> None:
    cache, _ = make()
    assert cache.insert([1, 2, 3, 4], [10, 11, 12, 13]) == 0
    m = cache.match_prefix([1, 2, 3, 4, 5])
    assert m.indices == [10, 11, 12, 13] and m.last_node.key == [1, 2, 3, 4]
    m = cache.match_prefix([1, 2, 9])
    assert m.indices == [10, 11]
    assert m.last_node.key == [1, 2] and m.last_node.parent is cache.root
    assert [c.key for c in m.last_node.children.values()] == [[3, 4]]
    assert list(cache.root.children) == [(1,)]
    assert cache.total_size() == 4
    cache.check_integrity()


def test_insert_returns_overlap_and_tree_keeps_its_own_slots() -> None:
    cache, _ = make()
    assert cache.insert([1, 2, 3], [10, 11, 12]) == 0
    assert cache.insert([1, 2, 4], [20, 21, 22]) == 2
    assert cache.match_prefix([1, 2, 4]).indices == [10, 11, 22]
    assert cache.insert([1, 2, 4], [30, 31, 32]) == 3
    assert cache.insert([1, 2], [40, 41]) == 2
    assert sorted(cache.all_slots()) == [10, 11, 12, 22]
    assert cache.total_size() == cache.evictable_size() == 4
    cache.check_integrity()


def test_insert_shorter_key_splits_without_adding_slots() -> None:
    cache, _ = make()
    cache.insert([1, 2, 3, 4], [10, 11, 12, 13])
    assert cache.insert([1, 2], [50, 51]) == 2
    (upper,) = cache.root.children.values()
    assert upper.key == [1, 2] and upper.value == [10, 11]
    assert cache.total_size() == 4
    cache.check_integrity()


def test_insert_rejects_mismatched_lengths() -> None:
    cache, _ = make()
    with pytest.raises(ValueError):
        cache.insert([1, 2], [10])


def test_lock_moves_path_between_evictable_and_protected() -> None:
    cache, _ = make()
    cache.insert([1, 2, 3], [10, 11, 12])
    cache.insert([1, 2, 4, 5], [10, 11, 20, 21])
    node = cache.match_prefix([1, 2, 4, 5]).last_node
    cache.inc_lock_ref(node)
    assert cache.protected_size() == 4 and cache.evictable_size() == 1
    assert node.lock_ref == 1 and node.parent is not None and node.parent.lock_ref == 1
    cache.inc_lock_ref(node)
    assert cache.protected_size() == 4 and node.lock_ref == 2
    cache.check_integrity()
    cache.dec_lock_ref(node)
    cache.dec_lock_ref(node)
    assert cache.protected_size() == 0 and cache.evictable_size() == 5
    with pytest.raises(ValueError):
        cache.dec_lock_ref(node)
    assert node.lock_ref == 0
    cache.check_integrity()


def test_locking_root_is_a_noop_and_evicted_nodes_are_rejected() -> None:
    cache, _ = make()
    cache.inc_lock_ref(cache.root)
    cache.dec_lock_ref(cache.root)
    assert cache.root.lock_ref == 0
    cache.insert([1], [10])
    node = cache.match_prefix([1]).last_node
    cache.evict(1)
    with pytest.raises(ValueError):
        cache.inc_lock_ref(node)
    cache.check_integrity()


def test_split_keeps_lock_on_the_deeper_node() -> None:
    cache, _ = make()
    cache.insert([1, 2, 3, 4], [10, 11, 12, 13])
    locked = cache.match_prefix([1, 2, 3, 4]).last_node
    cache.inc_lock_ref(locked)
    upper = cache.match_prefix([1, 2, 7]).last_node
    assert locked.key == [3, 4] and locked.parent is upper and upper.lock_ref == 1
    cache.check_integrity()
    cache.dec_lock_ref(locked)
    assert upper.lock_ref == 0 and cache.protected_size() == 0
    cache.check_integrity()


def test_evicts_least_recently_used_leaf_first() -> None:
    cache, rec = make()
    cache.insert([1, 1], [10, 11])
    cache.insert([2, 2], [20, 21])
    cache.insert([3, 3], [30, 31])
    cache.match_prefix([1, 1])
    assert cache.evict(1) == 2
    assert rec.batches == [[20, 21]]
    assert cache.evict(2) == 2
    assert rec.batches == [[20, 21], [30, 31]]
    assert cache.evict(3) == 2
    assert rec.batches == [[20, 21], [30, 31], [10, 11]]
    assert cache.total_size() == 0
    cache.check_integrity()


def test_parent_that_becomes_a_leaf_is_evicted_in_lru_order() -> None:
    cache, rec = make()
    cache.insert([1, 2, 3], [10, 11, 12])
    cache.insert([9], [90])
    cache.match_prefix([1, 2])  # splits; [1, 2] is now newer than [9], [3] stays oldest
    assert cache.evict(1) == 1
    assert cache.evict(1) == 1
    assert cache.evict(1) == 2
    assert rec.batches == [[12], [90], [10, 11]]
    assert cache.evict(1) == 0
    cache.check_integrity()


def test_locked_nodes_are_never_evicted() -> None:
    cache, rec = make()
    cache.insert([1, 2, 3], [10, 11, 12])
    cache.insert([4, 5], [40, 41])
    node = cache.match_prefix([1, 2, 3]).last_node
    cache.inc_lock_ref(node)
    cache.insert([1, 2, 3, 6], [10, 11, 12, 60])  # unlocked leaf under a locked node
    assert cache.evict(100) == 3
    assert sorted(s for b in rec.batches for s in b) == [40, 41, 60]
    assert cache.match_prefix([1, 2, 3]).indices == [10, 11, 12]
    cache.check_integrity()
    cache.dec_lock_ref(node)
    assert cache.evict(1) == 3
    assert cache.total_size() == 0
    cache.check_integrity()


def test_page_size_four_aligns_everything() -> None:
    cache, _ = make(page_size=4)
    toks = list(range(10))
    assert cache.insert(toks, slots_for(toks, 100)) == 0
    assert cache.total_size() == 8
    assert cache.match_prefix(toks).indices == slots_for(range(8), 100)
    assert cache.match_prefix(toks[:7]).indices == slots_for(range(4), 100)
    m = cache.match_prefix([0, 1, 2, 3, 4, 99, 6, 7])
    assert m.indices == slots_for(range(4), 100) and m.last_node.key == [0, 1, 2, 3]
    assert list(cache.root.children) == [(0, 1, 2, 3)]
    assert list(m.last_node.children) == [(4, 5, 6, 7)]
    assert cache.match_prefix([0, 1, 2]).indices == []
    assert cache.insert([0, 1, 2], [7, 8, 9]) == 0
    assert cache.insert([0, 1, 2, 3, 9, 9, 9, 9], [100, 101, 102, 103, 5, 6, 7, 8]) == 4
    assert cache.total_size() == 12
    assert cache.aligned_len(7) == 4
    cache.check_integrity()


def test_disabled_cache_stores_and_matches_nothing() -> None:
    cache, rec = make(disable=True)
    assert cache.insert([1, 2, 3], [10, 11, 12]) == 0
    m = cache.match_prefix([1, 2, 3])
    assert m.indices == [] and m.last_node is cache.root
    assert cache.evict(10) == 0 and rec.batches == []
    assert cache.total_size() == 0 and cache.all_slots() == []
    cache.check_integrity()


def test_reset_drops_without_freeing_and_refuses_while_locked() -> None:
    cache, rec = make()
    cache.insert([1, 2], [10, 11])
    node = cache.match_prefix([1, 2]).last_node
    cache.inc_lock_ref(node)
    with pytest.raises(RuntimeError):
        cache.reset()
    assert cache.total_size() == 2
    cache.dec_lock_ref(node)
    cache.reset()
    assert cache.total_size() == 0 and cache.all_slots() == [] and rec.batches == []
    assert cache.match_prefix([1, 2]).indices == []
    with pytest.raises(ValueError):
        cache.inc_lock_ref(node)
    cache.check_integrity()


def test_pretty_lists_every_node() -> None:
    cache, _ = make()
    cache.insert([1, 2, 3], [10, 11, 12])
    cache.insert([1, 2, 4], [10, 11, 13])
    text = cache.pretty()
    assert len(text.splitlines()) == 4
    assert "key=[1, 2]" in text and "key=[3]" in text and "key=[4]" in text


def _corrupt_sizes(cache: RadixCache, node: TreeNode) -> None:
    cache._evictable += 1


def _corrupt_lock(cache: RadixCache, node: TreeNode) -> None:
    node.lock_ref = -1


def _corrupt_child_lock(cache: RadixCache, node: TreeNode) -> None:
    child = next(iter(node.children.values()))
    child.lock_ref = 1
    cache._evictable -= len(child.value)
    cache._protected += len(child.value)


def _corrupt_duplicate_slot(cache: RadixCache, node: TreeNode) -> None:
    next(iter(node.children.values())).value[0] = node.value[0]


def _corrupt_filing(cache: RadixCache, node: TreeNode) -> None:
    node.children[(42,)] = node.children.pop(next(iter(node.children)))


def _corrupt_value_length(cache: RadixCache, node: TreeNode) -> None:
    node.value.append(99)


@pytest.mark.parametrize(
    "corrupt",
    [
        _corrupt_sizes,
        _corrupt_lock,
        _corrupt_child_lock,
        _corrupt_duplicate_slot,
        _corrupt_filing,
        _corrupt_value_length,
    ],
)
def test_check_integrity_catches_corruption(corrupt) -> None:
    cache, _ = make()
    cache.insert([1, 2, 3], [10, 11, 12])
    cache.insert([1, 2, 4], [10, 11, 13])
    cache.check_integrity()
    node = cache.match_prefix([1, 2]).last_node
    corrupt(cache, node)
    with pytest.raises(AssertionError):
        cache.check_integrity()


class CountingKey(Sequence[int]):
    """A token sequence that counts how many elements are read from it."""

    def __init__(self, data: list[int]) -> None:
        self.data = data
        self.reads = 0

    def __len__(self) -> int:
        return len(self.data)

    @overload
    def __getitem__(self, i: int) -> int: ...
    @overload
    def __getitem__(self, i: slice) -> list[int]: ...
    def __getitem__(self, i: int | slice) -> int | list[int]:
        out = self.data[i]
        self.reads += len(out) if isinstance(out, list) else 1
        return out

    def __iter__(self) -> Iterator[int]:
        for x in self.data:
            self.reads += 1
            yield x


def test_long_key_match_is_linear_in_key_reads_and_deep_chains_work() -> None:
    n, step = 10_000, 100
    cache, rec = make()
    toks = [(i * 7919) % 50_000 for i in range(n)]
    for end in range(step, n + 1, step):
        assert cache.insert(toks[:end], slots_for(toks[:end], 1)) == end - step
    key = CountingKey(toks + [123_456])
    m = cache.match_prefix(key)
    assert m.indices == slots_for(toks, 1)
    assert key.reads <= 2 * len(key)
    cache.check_integrity()
    assert len(cache.pretty().splitlines()) == n // step + 1
    assert cache.evict(n) == n
    assert [len(b) for b in rec.batches] == [step] * (n // step)
    cache.check_integrity()


Prefix = tuple[int, ...]


class RefCache:
    """Naive reference: one entry per cached page, keyed by the whole token prefix ending with it
    (its slots, last-access stamp and lock count)."""

    def __init__(self, page_size: int) -> None:
        self.ps = page_size
        self.pages: dict[Prefix, list[int]] = {}
        self.stamp: dict[Prefix, int] = {}
        self.locks: dict[Prefix, int] = {}
        self.owner: dict[int, Prefix] = {}
        self.clock = 0

    def prefixes(self, key: Sequence[int], n: int | None = None) -> list[Prefix]:
        """Page prefixes of key[:n] (n defaults to len(key)), shortest first."""
        n = len(key) if n is None else n
        return [tuple(key[:end]) for end in range(self.ps, n + 1, self.ps)]

    def match(self, key: Sequence[int]) -> list[int]:
        self.clock += 1
        out: list[int] = []
        for p in self.prefixes(key):
            if p not in self.pages:
                break
            self.stamp[p] = self.clock
            out += self.pages[p]
        return out

    def insert(self, key: Sequence[int], value: Sequence[int]) -> int:
        self.clock += 1
        present = 0
        for p in self.prefixes(key):
            if p in self.pages:
                present += self.ps
            else:
                self.pages[p], self.locks[p] = list(value[len(p) - self.ps : len(p)]), 0
                self.owner[self.pages[p][0]] = p
            self.stamp[p] = self.clock
        return present

    def lock(self, key: Sequence[int], n: int, delta: int) -> None:
        for p in self.prefixes(key, n):
            self.locks[p] += delta
            assert self.locks[p] >= 0

    def slots(self, key: Sequence[int], n: int) -> list[int]:
        return [s for p in self.prefixes(key, n) for s in self.pages[p]]

    def unlocked_leaves(self) -> list[Prefix]:
        inner = {p[: -self.ps] for p in self.pages}
        return [p for p in self.pages if p not in inner and self.locks[p] == 0]

    def remove_evicted(self, batch: list[int]) -> None:
        """Check that one free_slots batch is a chain ending at the LRU unlocked leaf; drop it."""
        chain = [self.owner[s] for s in batch[:: self.ps]]
        deepest = chain[-1]
        assert chain == self.prefixes(deepest)[-len(chain) :], "evicted pages are not a chain"
        assert batch == [s for p in chain for s in self.pages[p]]
        leaves = self.unlocked_leaves()
        assert deepest in leaves, f"evicted {deepest}, which is locked or not a leaf"
        assert self.stamp[deepest] == min(self.stamp[p] for p in leaves), "eviction is not LRU"
        for p in chain:
            del self.owner[self.pages.pop(p)[0]], self.stamp[p], self.locks[p]


@dataclass(eq=False)
class Request:
    tokens: list[int]
    prefix: list[int]  # tree slots of tokens[: len(prefix)], locked through node
    node: TreeNode
    own: list[int]  # slots the request owns, for tokens[len(prefix):]


TOKENS = st.builds(
    lambda head, tail: [*head, *tail],
    st.sampled_from([(), (0, 1, 2, 3, 0, 1), (0, 1, 2, 3, 2)]),
    st.lists(st.integers(0, 3), max_size=8),
)


class RadixMachine(RuleBasedStateMachine):
    """Requests as the scheduler runs them: match + lock, allocate the suffix (evicting when
    the pool is short), decode, cache unfinished/finished sequences, free duplicates, unlock."""

    requests = Bundle("requests")

    @initialize(page_size=st.sampled_from([1, 2, 4]), size=st.integers(4, 40))
    def setup(self, page_size: int, size: int) -> None:
        self.alloc = SlotAllocator(size)
        self.batches: list[list[int]] = []
        self.cache = RadixCache(self._free, page_size)
        self.ref = RefCache(page_size)
        self.live: list[Request] = []

    def _free(self, slots: list[int]) -> None:
        self.batches.append(list(slots))
        self.alloc.free(slots)

    def _evict(self, n: int) -> None:
        self.batches.clear()
        freed = self.cache.evict(n)
        for batch in self.batches:
            self.ref.remove_evicted(batch)
        assert freed == sum(map(len, self.batches))
        if self.batches:
            assert freed - len(self.batches[-1]) < n, "evicted more nodes than needed"
        if freed < n:
            assert not self.ref.unlocked_leaves(), "stopped while something was evictable"

    def _alloc(self, n: int) -> list[int] | None:
        slots = self.alloc.alloc(n)
        if slots is None:
            self._evict(n - self.alloc.available())
            slots = self.alloc.alloc(n)
        return slots

    def _match(self, tokens: list[int]) -> list[int]:
        m = self.cache.match_prefix(tokens)
        assert m.indices == self.ref.match(tokens)
        self.last_node = m.last_node
        return m.indices

    def _lock(self, tokens: list[int], prefix: list[int], node: TreeNode, delta: int) -> None:
        (self.cache.inc_lock_ref if delta > 0 else self.cache.dec_lock_ref)(node)
        self.ref.lock(tokens, len(prefix), delta)

    def _insert(self, req: Request) -> tuple[list[int], int, int]:
        value = req.prefix + req.own
        matched = self.cache.insert(req.tokens, value)
        assert matched == self.ref.insert(req.tokens, value)
        assert matched >= len(req.prefix)
        self.alloc.free(value[len(req.prefix) : matched])
        return value, matched, self.cache.aligned_len(len(req.tokens))

    @rule(target=requests, tokens=TOKENS)
    def start(self, tokens: list[int]):
        prefix = self._match(tokens)
        node = self.last_node
        self._lock(tokens, prefix, node, +1)
        own = self._alloc(len(tokens) - len(prefix))
        if own is None:
            self._lock(tokens, prefix, node, -1)
            return multiple()
        req = Request(tokens, prefix, node, own)
        self.live.append(req)
        return req

    @rule(req=requests, more=st.lists(st.integers(0, 3), min_size=1, max_size=4))
    def decode(self, req: Request, more: list[int]) -> None:
        slots = self._alloc(len(more))
        if slots is not None:
            req.tokens = req.tokens + more
            req.own = req.own + slots

    @rule(req=requests)
    def cache_unfinished(self, req: Request) -> None:
        value, matched, aligned = self._insert(req)
        prefix = self._match(req.tokens)
        assert len(prefix) == aligned
        assert (
            prefix[: len(req.prefix)] == req.prefix and prefix[matched:] == value[matched:aligned]
        )
        node = self.last_node
        self._lock(req.tokens, prefix, node, +1)
        self._lock(req.tokens, req.prefix, req.node, -1)
        req.prefix, req.node, req.own = prefix, node, value[aligned:]

    @rule(req=consumes(requests))
    def cache_finished(self, req: Request) -> None:
        value, _, aligned = self._insert(req)
        self.alloc.free(value[aligned:])
        self._lock(req.tokens, req.prefix, req.node, -1)
        self.live.remove(req)

    @rule(req=consumes(requests))
    def abort(self, req: Request) -> None:
        self.alloc.free(req.own)
        self._lock(req.tokens, req.prefix, req.node, -1)
        self.live.remove(req)

    @rule(tokens=TOKENS)
    def match(self, tokens: list[int]) -> None:
        self._match(tokens)

    @rule(n=st.integers(1, 24))
    def evict(self, n: int) -> None:
        self._evict(n)

    @rule()
    def flush(self) -> None:
        if self.cache.protected_size():
            with pytest.raises(RuntimeError):
                self.cache.reset()
        elif not self.live:
            self.cache.reset()
            self.alloc.reset()
            self.ref = RefCache(self.cache.page_size)

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "cache"):
            return
        self.cache.check_integrity()
        tree = self.cache.all_slots()
        own = [s for r in self.live for s in r.own]
        assert self.alloc.available() + self.cache.total_size() + len(own) == self.alloc.size
        assert len(set(tree + own)) == len(tree) + len(own)
        assert not any(self.alloc.is_free(s) for s in tree + own)
        assert sorted(tree) == sorted(s for page in self.ref.pages.values() for s in page)
        locked_pages = sum(1 for n in self.ref.locks.values() if n)
        assert self.cache.protected_size() == locked_pages * self.ref.ps
        self._check_nodes_against_reference()
        for r in self.live:
            assert len(r.prefix) + len(r.own) == len(r.tokens)
            assert r.prefix == self.ref.slots(r.tokens, len(r.prefix))

    def _check_nodes_against_reference(self) -> None:
        stack: list[tuple[TreeNode, Prefix]] = [(self.cache.root, ())]
        while stack:
            node, above = stack.pop()
            full = above + tuple(node.key)
            for p in self.ref.prefixes(full)[len(above) // self.ref.ps :]:
                assert (
                    self.ref.pages[p]
                    == node.value[len(p) - len(above) - self.ref.ps : len(p) - len(above)]
                )
                assert self.ref.stamp[p] == node.last_access
                assert self.ref.locks[p] == node.lock_ref
            stack.extend((child, full) for child in node.children.values())


RadixMachine.TestCase.settings = settings(max_examples=250, stateful_step_count=50, deadline=None)
TestRadixMachine = RadixMachine.TestCase
