"""KV-pool slot allocator: plain ints, no tensors."""

from __future__ import annotations

from collections.abc import Sequence


class SlotAllocator:
    """Hands out KV-pool slot indices (ints).

    Slot 0 is reserved as a padding dummy and never handed out; usable slots are 1..size.
    Not thread-safe: the scheduler thread owns it. ``alloc`` and ``free`` are all-or-nothing:
    on failure or error the free set is unchanged.
    """

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"allocator size must be >= 0, got {size}")
        self.size = size
        self._free: list[int] = []
        self._is_free = bytearray(size + 1)
        self.reset()

    def alloc(self, n: int) -> list[int] | None:
        """Take ``n`` free slots. Returns None (and changes nothing) if fewer than ``n`` are free."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of slots ({n})")
        if n > len(self._free):
            return None
        if n == 0:
            return []
        out = self._free[-n:]
        del self._free[-n:]
        out.reverse()
        for slot in out:
            self._is_free[slot] = 0
        return out

    def free(self, slots: Sequence[int]) -> None:
        """Return ``slots`` to the pool.

        Raises ValueError (changing nothing) on slot 0, an out-of-range slot, a slot that is
        already free, or a slot repeated within ``slots``. O(len(slots)).
        """
        marked: list[int] = []
        try:
            for slot in slots:
                if not 1 <= slot <= self.size:
                    raise ValueError(f"slot {slot} out of range 1..{self.size}")
                if self._is_free[slot]:
                    raise ValueError(f"double free of slot {slot}")
                self._is_free[slot] = 1
                marked.append(slot)
        except ValueError:
            for slot in marked:
                self._is_free[slot] = 0
            raise
        self._free.extend(reversed(marked))

    def available(self) -> int:
        """Number of free slots."""
        return len(self._free)

    def is_free(self, slot: int) -> bool:
        """Whether ``slot`` (in 1..size) is currently free."""
        return 1 <= slot <= self.size and bool(self._is_free[slot])

    def reset(self) -> None:
        """Mark every usable slot free again (forgetting all outstanding allocations)."""
        self._free = list(range(self.size, 0, -1))
        self._is_free = bytearray(b"\x00") + bytearray(b"\x01") * self.size
