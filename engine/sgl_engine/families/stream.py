"""Streaming parse of a family's output: reasoning, content and tool calls as they arrive.

`OutputStream.feed(cumulative_text, final)` returns a `StreamDelta`. Tool calls come as
`CallDelta`s with a stable `index` per call: the first names the call, later ones append to
its arguments text. Whatever the split of the text, the deltas add up to `parse_output`'s
result on the whole text (arguments as equal JSON).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from sgl_engine.families.reasoning import ReasoningFormat, ReasoningStream
from sgl_engine.families.tool_format import ParsedCall, ToolFormat, _partial_len, _ws

_NAME = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class CallDelta:
    """A piece of tool call `index`: its name (first piece only) and arguments text."""

    index: int
    name: str | None
    arguments: str


@dataclass
class StreamDelta:
    reasoning: str = ""
    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)


@dataclass(frozen=True)
class ParsedOutput:
    reasoning: str | None
    content: str
    calls: list[ParsedCall]


def parse_output(
    text: str,
    tools: ToolFormat | None,
    reasoning: ReasoningFormat | None = None,
    opened: bool | None = None,
) -> ParsedOutput:
    """Reasoning, content and calls of a whole output (`tools` None: no call parsing)."""
    thought = None
    if reasoning is not None:
        thought, text = reasoning.separate(text, opened)
    if tools is None:
        return ParsedOutput(thought, text, [])
    content, calls = tools.parse(text)
    return ParsedOutput(thought, content, calls)


class ToolCallStream:
    """Content and `CallDelta`s from the cumulative answer text (reasoning removed)."""

    def __init__(self, fmt: ToolFormat) -> None:
        self.fmt = fmt
        self.sent = 0
        self.start: int | None = None
        self.names: list[str] = []
        self.args_sent: list[int] = []

    def feed(self, text: str, final: bool = False) -> tuple[str, list[CallDelta]]:
        if self.start is None:
            at = self.fmt.find_start(text)
            if at < 0:
                safe = len(text) if final else len(text) - _partial_len(text, self.fmt.trigger)
                if not final:
                    safe = len(text[:safe].rstrip())
                return self._content(text, safe), []
            content = self._content(text, len(text[:at].rstrip()))
            self.start = at
            return content, self._calls(text[at:], final)
        calls = self._calls(text[self.start :], final)
        if final and not self.names and not self.fmt.is_empty_list(text[self.start :]):
            return self._content(text, len(text)), calls
        return "", calls

    def _content(self, text: str, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece, self.sent = text[self.sent : upto], upto
        return piece

    def _calls(self, section: str, final: bool) -> list[CallDelta]:
        out: list[CallDelta] = []
        for index, (name, args) in enumerate(_scan(self.fmt, section)):
            if name is None:
                break
            if index == len(self.names):
                self.names.append(name)
                self.args_sent.append(0)
                out.append(CallDelta(index, name, ""))
            if len(args) > self.args_sent[index]:
                out.append(CallDelta(index, None, args[self.args_sent[index] :]))
                self.args_sent[index] = len(args)
        return out


def _scan(fmt: ToolFormat, section: str) -> list[tuple[str | None, str]]:
    """(name, arguments text so far) of each call begun in `section`."""
    decoder = json.JSONDecoder()
    pos = _ws(section, 0)
    begin = fmt.begin.strip()
    if begin:
        if not section.startswith(begin, pos):
            return []
        pos += len(begin)
    if fmt.array:
        pos = _ws(section, pos)
        if not section.startswith("[", pos):
            return []
        pos += 1
    found: list[tuple[str | None, str]] = []
    while True:
        pos = _ws(section, pos)
        opener = fmt.call_begin.strip()
        if opener and section.startswith(opener, pos):
            pos = _ws(section, pos + len(opener))
        if not section.startswith("{", pos):
            return found
        try:
            _, end = decoder.raw_decode(section, pos)
        except ValueError:
            found.append(_partial_call(fmt, section, pos))
            return found
        found.append(_whole_call(fmt, section, pos, end))
        pos = _ws(section, end)
        closer = fmt.call_end.strip()
        if closer and section.startswith(closer, pos):
            pos += len(closer)
        pos = _ws(section, pos)
        sep = fmt.sep.strip() or ("," if fmt.array else "")
        if sep and section.startswith(sep, pos):
            pos += len(sep)


def _args_start(fmt: ToolFormat, obj: str) -> int:
    m = re.search(r'"' + re.escape(fmt.args_key) + r'"\s*:\s*', obj)
    return -1 if m is None else m.end()


def _partial_call(fmt: ToolFormat, section: str, pos: int) -> tuple[str | None, str]:
    obj = section[pos:]
    name = _NAME.match(obj)
    if name is None:
        return None, ""
    at = _args_start(fmt, obj)
    return json.loads(f'"{name.group(1)}"'), "" if at < 0 else obj[at:]


def _whole_call(fmt: ToolFormat, section: str, pos: int, end: int) -> tuple[str | None, str]:
    obj = section[pos:end]
    value = json.loads(obj)
    call = fmt._call(value)
    if call is None:
        return None, ""
    at = _args_start(fmt, obj)
    if at < 0 or not _NAME.match(obj):
        return call.name, call.arguments_json
    _, stop = json.JSONDecoder().raw_decode(obj, at)
    return call.name, obj[at:stop]


class OutputStream:
    """Reasoning, content and tool calls from the cumulative output text (mutates itself)."""

    def __init__(
        self,
        tools: ToolFormat | None,
        reasoning: ReasoningFormat | None = None,
        opened: bool | None = None,
    ) -> None:
        self.reasoning = None if reasoning is None else ReasoningStream(reasoning, opened)
        self.tools = None if tools is None else ToolCallStream(tools)
        self.sent = 0
        self.called = False

    def feed(self, text: str, final: bool = False) -> StreamDelta:
        thought = ""
        if self.reasoning is not None:
            thought, text = self.reasoning.feed(text, final)
        if self.tools is None:
            delta, self.sent = text[self.sent :], max(self.sent, len(text))
            return StreamDelta(thought, delta, [])
        content, calls = self.tools.feed(text, final)
        self.called = self.called or bool(calls)
        return StreamDelta(thought, content, calls)
