"""Incremental detokenisation of streamed output tokens, and stop-string matching over the text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import regex

REPLACEMENT_CHAR = "\ufffd"
CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text.

    Never emits a partial UTF-8 character: text ending in U+FFFD is held back until it resolves
    (or until `flush`). Decodes only a short window of ids per call: the ids since the last
    stable point plus the previous stable piece as context (SGLang's surrogate/read offsets), so
    a leading space or a multi-byte character is decoded as it is in the full sequence.
    Mutates only itself.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._decode_kwargs = {
            "skip_special_tokens": skip_special_tokens,
            "spaces_between_special_tokens": spaces_between_special_tokens,
        }
        context = list(prompt_ids[-CONTEXT_TOKENS:]) if CONTEXT_TOKENS else []
        self._ids: list[int] = context
        self._read = len(context)
        self._surr_text = self._decode(context)
        self._text = ""

    @property
    def text(self) -> str:
        """All stable text emitted so far."""
        return self._text

    def add(self, token_ids: Sequence[int]) -> str:
        """Append output token ids; returns the text that became stable (may be empty)."""
        self._ids.extend(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """End of stream: returns whatever text is still held back (a dangling U+FFFD too)."""
        return self._advance(final=True)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), **self._decode_kwargs)

    def _advance(self, final: bool) -> str:
        if len(self._ids) == self._read:
            return ""
        new_text = self._decode(self._ids)
        if len(new_text) <= len(self._surr_text):
            return ""
        if not final and new_text.endswith(REPLACEMENT_CHAR):
            return ""
        delta = new_text[len(self._surr_text) :]
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        self._surr_text = self._decode(self._ids)
        self._text += delta
        return delta


class StopMatcher:
    """Stop-string and stop-regex detection over streamed text. Immutable after construction.

    A stop regex (SGLang's `stop_regex`) ends generation where the text first matches it; the
    match is trimmed like a stop string. Partial matches (the `regex` module's `partial=True`)
    hold back streamed text that may still become a match.
    """

    def __init__(self, stops: Sequence[str], stop_regex: Sequence[str] = ()) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self.stops = tuple(dict.fromkeys(stops))
        self.max_len = max((len(s) for s in self.stops), default=0)
        self.patterns = tuple(regex.compile(p) for p in dict.fromkeys(stop_regex))

    def __bool__(self) -> bool:
        return bool(self.stops or self.patterns)

    def find(self, text: str, start: int = 0) -> tuple[int, str] | None:
        """The earliest stop occurring at or after `start - max_len + 1` as (index, stop).

        Pass as `start` the length of text already searched: a stop that began before it and
        ends after it is still found. Of stops at the same index the shortest wins (it ends
        first). Stop regexes are searched over the whole text (the matched text is the stop).
        None if there is none.
        """
        lo = max(0, start - self.max_len + 1)
        best: tuple[int, str] | None = None
        for stop in self.stops:
            index = text.find(stop, lo)
            if index < 0:
                continue
            if best is None or (index, len(stop)) < (best[0], len(best[1])):
                best = (index, stop)
        for pattern in self.patterns:
            m = pattern.search(text)
            if m is not None and (
                best is None or (m.start(), len(m.group())) < (best[0], len(best[1]))
            ):
                best = (m.start(), m.group())
        return best

    def safe_len(self, text: str) -> int:
        """How much of `text` can be streamed without cutting into a stop that may yet complete.

        That is the smallest i where text[i:] starts with a stop or is a prefix of one: the
        earlier of the first whole stop and the longest suffix that is a proper prefix of a stop
        (for a stop regex: where a partial match at the end of the text begins).
        """
        found = self.find(text)
        held = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:k]):
                    held = k
                    break
        safe = min(len(text) - held, found[0] if found is not None else len(text))
        for pattern in self.patterns:
            m = pattern.search(text, partial=True)
            if m is not None and m.partial:
                safe = min(safe, m.start())
        return safe
