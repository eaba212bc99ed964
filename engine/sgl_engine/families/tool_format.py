"""How one model family writes tool calls: the text around each call, and parsing it back.

A `ToolFormat` describes the calls section of an answer as
`begin (call_begin CALL call_end) (sep call_begin CALL call_end)* end`, where CALL is a JSON
object `{"name": ..., "<args_key>": {...}}`; with `array=True` the calls are one JSON array
`begin [CALL, CALL, ...] end` instead. That covers Hermes/Qwen (`<tool_call>\\n{...}\\n
</tool_call>` per call), Llama-3.1/3.2 (`{"name": ..., "parameters": ...}` joined by `; `),
Mistral (`[TOOL_CALLS][...]`) and SmolLM2 (`<tool_call>[...]</tool_call>`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ParsedCall:
    """One tool call read from model output; `arguments` is the decoded JSON object."""

    name: str
    arguments: dict[str, Any]

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass(frozen=True)
class ToolFormat:
    """The text shape of a family's tool calls (see the module docstring)."""

    name: str
    begin: str = ""
    call_begin: str = ""
    call_end: str = ""
    sep: str = ""
    end: str = ""
    array: bool = False
    args_key: str = "arguments"

    @property
    def trigger(self) -> str:
        """The text that opens the calls section (plain text never contains it)."""
        return (self.begin + self.call_begin).strip() or '{"name"'

    def call_schema(self, specs: Sequence[dict]) -> dict:
        """JSON schema of one call to any of `specs` (`{"name", "parameters"}` dicts)."""
        options = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": s["name"]},
                    self.args_key: s.get("parameters") or {"type": "object", "properties": {}},
                },
                "required": ["name", self.args_key],
                "additionalProperties": False,
            }
            for s in specs
        ]
        return options[0] if len(options) == 1 else {"anyOf": options}

    def render(self, calls: Sequence[ParsedCall]) -> str:
        """The calls as this format writes them (for templates that cannot render calls)."""
        objs = [{"name": c.name, self.args_key: c.arguments} for c in calls]
        if self.array:
            return self.begin + json.dumps(objs, ensure_ascii=False) + self.end
        body = self.sep.join(
            self.call_begin + json.dumps(o, ensure_ascii=False) + self.call_end for o in objs
        )
        return self.begin + body + self.end

    def find_start(self, text: str) -> int:
        """Where the calls section starts in `text`, or -1."""
        return text.find(self.trigger)

    def parse(self, text: str, names: set[str] | None = None) -> tuple[str, list[ParsedCall]]:
        """(content before the calls, calls) of a whole answer. Calls to names outside `names`
        (when given) and a section that does not parse leave the text as content."""
        start = self.find_start(text)
        if start < 0:
            return text, []
        calls = self.parse_section(text[start:])
        if not calls and self.is_empty_list(text[start:]):
            return text[:start].rstrip(), []
        if not calls or (names is not None and any(c.name not in names for c in calls)):
            return text, []
        return text[:start].rstrip(), calls

    def is_empty_list(self, section: str) -> bool:
        """Whether `section` is this format's empty call list (a declined call)."""
        return self.array and "".join(section.split()) == "".join(self.render([]).split())

    def parse_section(self, section: str) -> list[ParsedCall]:
        """The calls of a calls section (text starting at `trigger`); [] if it is malformed."""
        pos = _skip(section, 0, self.begin.strip())
        decoder = json.JSONDecoder()
        calls: list[ParsedCall] = []
        try:
            if self.array:
                value, _ = decoder.raw_decode(section, _ws(section, pos))
                items = value if isinstance(value, list) else [value]
                return [c for c in map(self._call, items) if c is not None]
            while True:
                pos = _skip(section, pos, self.call_begin.strip())
                value, pos = decoder.raw_decode(section, _ws(section, pos))
                call = self._call(value)
                if call is None:
                    return []
                calls.append(call)
                pos = _skip(section, pos, self.call_end.strip())
                after = _skip(section, pos, self.sep.strip())
                nxt = _ws(section, after)
                if nxt >= len(section) or not section.startswith(
                    self.call_begin.strip() or "{", nxt
                ):
                    return calls
                pos = after
        except ValueError:
            return calls

    def _call(self, value: Any) -> ParsedCall | None:
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return None
        args = value.get(self.args_key, value.get("arguments", value.get("parameters", {})))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
        return ParsedCall(value["name"], args) if isinstance(args, dict) else None


def _ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _partial_len(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is a proper prefix of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def _skip(text: str, pos: int, literal: str) -> int:
    """Past `literal` (after whitespace) if it is there, else `pos` unchanged."""
    if not literal:
        return pos
    at = _ws(text, pos)
    return at + len(literal) if text.startswith(literal, at) else pos


HERMES = ToolFormat("hermes", call_begin="<tool_call>\n", call_end="\n</tool_call>", sep="\n")
LLAMA3_JSON = ToolFormat("llama3_json", sep="; ", args_key="parameters")
MISTRAL = ToolFormat("mistral", begin="[TOOL_CALLS]", array=True)
SMOLLM2 = ToolFormat("smollm2", begin="<tool_call>", end="</tool_call>", array=True)
