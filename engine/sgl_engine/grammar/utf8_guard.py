"""Keeps constrained output valid UTF-8 where xgrammar does not.

xgrammar <= 0.2.8 lets character classes match byte sequences that are not UTF-8: every path
accepts encoded surrogates (ED A0..BF xx), and JSON-schema `pattern` strings also accept
overlong forms (E0 80..9F xx, F0 80..8F xx xx). Such output decodes to U+FFFD. The guard tracks
the output's unfinished UTF-8 sequence as one of eight states (RFC 3629's table of valid
sequences) and masks the tokens whose bytes would break it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

BOUNDARY = 0
# state -> (lowest, highest) allowed next byte, continuation bytes still needed
_PENDING = {
    1: (0x80, 0xBF, 1),
    2: (0x80, 0xBF, 2),
    3: (0x80, 0xBF, 3),
    4: (0xA0, 0xBF, 2),  # after E0: no overlong forms
    5: (0x80, 0x9F, 2),  # after ED: no surrogates
    6: (0x90, 0xBF, 3),  # after F0: no overlong forms
    7: (0x80, 0x8F, 3),  # after F4: nothing above U+10FFFF
}
_NUM_STATES = 8
_LEAD_STATE = {
    **dict.fromkeys(range(0xC2, 0xE0), 1),
    **dict.fromkeys(range(0xE1, 0xF0), 2),
    **dict.fromkeys(range(0xF1, 0xF4), 3),
    0xE0: 4,
    0xED: 5,
    0xF0: 6,
    0xF4: 7,
}


class Utf8Guard:
    """Per tokenizer: which tokens keep the output valid UTF-8 from each state. Immutable,
    shared by all matchers of a compiler."""

    def __init__(self, token_bytes: Sequence[bytes], vocab_size: int) -> None:
        self._token_bytes = tb = list(token_bytes)
        words = (vocab_size + 31) // 32
        bad = [i for i, b in enumerate(tb) if not b.isascii() and scan(BOUNDARY, b) is None]
        self._keep: list[torch.Tensor | None] = [_bits(words, len(tb), bad, True) if bad else None]
        empty = [i for i, b in enumerate(tb) if not b]
        continuing = [i for i, b in enumerate(tb) if b and 0x80 <= b[0] <= 0xBF]
        for state in range(1, _NUM_STATES):
            ok = empty + [i for i in continuing if scan(state, tb[i]) is not None]
            self._keep.append(_bits(words, len(tb), ok, False))

    def restrict(self, bitmask_row: torch.Tensor, state: int) -> None:
        """Clear the bits of tokens that would make the output invalid UTF-8 (mutates the row)."""
        keep = self._keep[state]
        if keep is not None:
            bitmask_row &= keep

    def next_state(self, state: int, token_id: int) -> int | None:
        """The state after appending `token_id` in `state`; None if that is invalid UTF-8."""
        if not 0 <= token_id < len(self._token_bytes):
            return state
        return scan(state, self._token_bytes[token_id])


def scan(state: int, data: bytes) -> int | None:
    """Run the UTF-8 automaton over `data` from `state`; None on an invalid byte."""
    if state == BOUNDARY and data.isascii():
        return BOUNDARY
    for byte in data:
        if state == BOUNDARY:
            if byte < 0x80:
                continue
            state = _LEAD_STATE.get(byte)
            if state is None:
                return None
            continue
        low, high, needed = _PENDING[state]
        if not low <= byte <= high:
            return None
        state = needed - 1
    return state


def _bits(words: int, num_tokens: int, listed: Sequence[int], default: bool) -> torch.Tensor:
    """An int32 bitmask row: tokens in `listed` get `not default`, other tokenizer tokens
    `default`; ids beyond the tokenizer (model-vocab padding) stay set."""
    bits = np.full(words * 32, default, dtype=bool)
    bits[num_tokens:] = True
    bits[np.asarray(listed, dtype=np.int64)] = not default
    packed = np.packbits(bits, bitorder="little").view("<i4")
    return torch.from_numpy(packed.astype(np.int32))
