"""Reasoning markers (`<think>...</think>`): separating the reasoning from the answer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReasoningFormat:
    """A family's reasoning markers. Qwen3 writes `<think>` itself; DeepSeek-R1's template
    opens it in the prompt, so the answer holds only `...</think>`."""

    name: str
    start: str = "<think>"
    end: str = "</think>"

    def opened_by(self, prompt: str) -> bool | None:
        """True when `prompt` leaves a reasoning block open (the answer starts inside it),
        False when it already closed one (thinking switched off), None when it did neither."""
        tail = prompt.rstrip()
        if tail.endswith(self.start):
            return True
        if tail.endswith(self.end):
            return False
        return None

    def separate(self, text: str, opened: bool | None = None) -> tuple[str | None, str]:
        """(reasoning or None, answer) of a whole output. `opened` as from `opened_by`."""
        if opened is False:
            return None, text
        body = text
        if not opened:
            stripped = text.lstrip()
            if not stripped.startswith(self.start):
                return None, text
            body = stripped[len(self.start) :]
        cut = body.find(self.end)
        if cut < 0:
            return body.strip(), ""
        return body[:cut].strip(), body[cut + len(self.end) :].lstrip()


class ReasoningStream:
    """`ReasoningFormat.separate` for cumulative text: `feed` returns the new reasoning text
    and the answer so far. The concatenated reasoning deltas equal `separate`'s reasoning and
    the final answer equals its answer, however the text is split. Mutates only itself."""

    def __init__(self, fmt: ReasoningFormat, opened: bool | None = None) -> None:
        self.fmt = fmt
        self.mode = "answer" if opened is False else ("think" if opened else "start")
        self.done = 0
        self.sent_any = False
        self.answer_at: int | None = 0 if opened is False else None

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        if self.mode == "start":
            stripped = text.lstrip()
            if stripped.startswith(self.fmt.start):
                self.mode, self.done = "think", len(text) - len(stripped) + len(self.fmt.start)
            elif final or not self.fmt.start.startswith(stripped):
                self.mode, self.answer_at = "answer", 0
            else:
                return "", ""
        reasoning = self._think(text, final) if self.mode == "think" else ""
        if self.answer_at is None:
            return reasoning, ""
        answer = text[self.answer_at :]
        return reasoning, answer.lstrip() if self.answer_at else answer

    def _think(self, text: str, final: bool) -> str:
        start = self.done
        if not self.sent_any:
            while start < len(text) and text[start].isspace():
                start += 1
        cut = text.find(self.fmt.end, start)
        if cut >= 0:
            piece = text[start:cut].rstrip()
            self.mode, self.answer_at = "answer", cut + len(self.fmt.end)
        else:
            safe = len(text) if final else len(text) - _partial(text, self.fmt.end, start)
            piece = text[start:safe].rstrip()
        self.done = start + len(piece)
        self.sent_any = self.sent_any or bool(piece)
        return piece


def _partial(text: str, marker: str, lo: int) -> int:
    """The length of the longest end of text[lo:] that is a proper prefix of `marker`."""
    for k in range(min(len(marker) - 1, len(text) - lo), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


THINK = ReasoningFormat("think")
