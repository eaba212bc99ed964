from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sgl_engine.allocator import SlotAllocator


def test_hands_out_every_usable_slot_once_and_never_zero() -> None:
    alloc = SlotAllocator(8)
    got = alloc.alloc(3) + alloc.alloc(5)
    assert sorted(got) == list(range(1, 9))
    assert alloc.available() == 0
    assert alloc.alloc(1) is None
    assert alloc.alloc(0) == []


def test_failed_alloc_changes_nothing() -> None:
    alloc = SlotAllocator(4)
    first = alloc.alloc(3)
    assert alloc.alloc(2) is None
    assert alloc.available() == 1
    assert alloc.alloc(1) is not None
    assert first is not None and len(set(first)) == 3


def test_free_returns_slots_and_they_are_reused() -> None:
    alloc = SlotAllocator(4)
    slots = alloc.alloc(4)
    assert slots is not None
    alloc.free(slots[1:3])
    assert alloc.available() == 2
    assert sorted(alloc.alloc(2) or []) == sorted(slots[1:3])


@pytest.mark.parametrize("bad", [[0], [5], [-1], [2, 2]])
def test_free_rejects_bad_slots_atomically(bad: list[int]) -> None:
    alloc = SlotAllocator(4)
    alloc.alloc(4)
    alloc.free([3])
    with pytest.raises(ValueError):
        alloc.free([1, *bad])
    assert alloc.available() == 1
    assert not alloc.is_free(1)


def test_double_free_raises() -> None:
    alloc = SlotAllocator(4)
    slots = alloc.alloc(2)
    assert slots is not None
    alloc.free(slots)
    with pytest.raises(ValueError, match="double free"):
        alloc.free(slots[:1])
    with pytest.raises(ValueError):
        alloc.free([4])


def test_negative_alloc_raises() -> None:
    with pytest.raises(ValueError):
        SlotAllocator(4).alloc(-1)


def test_reset_frees_everything() -> None:
    alloc = SlotAllocator(5)
    alloc.alloc(4)
    alloc.reset()
    assert alloc.available() == 5
    assert sorted(alloc.alloc(5) or []) == [1, 2, 3, 4, 5]


@settings(max_examples=100, deadline=None)
@given(
    size=st.integers(0, 20),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 25)), max_size=40),
)
def test_matches_a_set_model(size: int, ops: list[tuple[bool, int]]) -> None:
    alloc = SlotAllocator(size)
    held: list[int] = []
    for is_alloc, n in ops:
        if is_alloc:
            got = alloc.alloc(n)
            free_before = size - len(held)
            if n > free_before:
                assert got is None
            else:
                assert got is not None and len(got) == n
                assert not set(got) & set(held)
                assert all(1 <= s <= size for s in got)
                held.extend(got)
        else:
            k = min(n, len(held))
            alloc.free(held[:k])
            del held[:k]
        assert alloc.available() == size - len(held)
        assert len(set(held)) == len(held)
