"""OpenAI tool calling: grammars that force a call, prompts that offer tools, parsing calls out.

`tool_choice` "required" or a named function decodes the answer under a JSON schema over the
tools (so the call always parses and its arguments validate); "auto" lets the model answer
freely and picks `<tool_call>{...}</tool_call>` blocks (Hermes/Qwen style) out of the text;
`AutoToolStream` does that while the answer streams.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from sgl_engine.errors import InvalidRequestError
from sgl_engine.server.protocol import Tool, ToolChoice

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def _call_schema(tool: Tool) -> dict[str, Any]:
    params = tool.function.parameters or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def forced_call_schema(
    tools: list[Tool], choice: str | ToolChoice | None, parallel: bool | None
) -> dict[str, Any] | None:
    """The JSON schema the answer must follow, or None when the model may answer freely."""
    if not tools or choice in (None, "none", "auto"):
        return None
    if isinstance(choice, ToolChoice):
        named = [t for t in tools if t.function.name == choice.function.name]
        if not named:
            known = ", ".join(t.function.name for t in tools)
            raise InvalidRequestError(
                f"tool_choice names {choice.function.name!r}, which is not in tools ({known})",
                "tool_choice",
            )
        return _call_schema(named[0])
    schema: dict[str, Any] = {
        "type": "array",
        "items": {"anyOf": [_call_schema(t) for t in tools]},
        "minItems": 1,
    }
    if parallel is False:
        schema["maxItems"] = 1
    return schema


def tools_for_template(tools: list[Tool] | None, choice: Any) -> list[dict] | None:
    if not tools or choice == "none":
        return None
    return [t.model_dump(exclude_none=True) for t in tools]


def tools_system_prompt(tools: list[dict]) -> str:
    """Offer tools to a model whose chat template cannot render them."""
    lines = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    return (
        "You may call functions. Available functions:\n"
        f"{lines}\n"
        "To call one, answer with <tool_call>"
        '{"name": <function name>, "arguments": <JSON object>}</tool_call>.'
    )


def _call(name: str, arguments: Any) -> dict[str, Any]:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {
        "id": f"call_{secrets.token_hex(12)}",
        "type": "function",
        "function": {"name": name, "arguments": args},
    }


def parse_forced(text: str) -> list[dict[str, Any]]:
    """Calls from an answer decoded under `forced_call_schema` (an object or an array)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return []
    items = value if isinstance(value, list) else [value]
    return [
        _call(v["name"], v.get("arguments", {}))
        for v in items
        if isinstance(v, dict) and "name" in v
    ]


def _block_call(block: str, names: set[str]) -> dict[str, Any] | None:
    try:
        value = json.loads(block)
    except json.JSONDecodeError:
        return None
    if isinstance(value, dict) and value.get("name") in names:
        return _call(value["name"], value.get("arguments", {}))
    return None


def parse_auto(text: str, tools: list[Tool]) -> tuple[str | None, list[dict[str, Any]]]:
    """(remaining content, calls) from a free answer: `<tool_call>` blocks naming known tools."""
    names = {t.function.name for t in tools}
    found = (_block_call(block, names) for block in _TOOL_CALL.findall(text))
    calls = [call for call in found if call is not None]
    if not calls:
        return text, []
    content = _TOOL_CALL.sub("", text).strip()
    return content or None, calls


class AutoToolStream:
    """`parse_auto` for a streamed answer: fed the cumulative text, returns the content that is
    safe to show and the calls whose blocks have closed. Text that may be the start of
    `<tool_call>` and whitespace that may end up at a block's edge are held back; a block that
    names no known tool is shown as content. Mutates only itself.

    Feeding the text in any pieces gives the same content and calls as feeding it whole. The
    calls are `parse_auto`'s; the content is too, except that whitespace before the first
    content is kept and an unknown block next to a known one stays in the content.
    """

    def __init__(self, tools: list[Tool]) -> None:
        self.names = {t.function.name for t in tools}
        self.done = 0
        self.inside = False
        self.held = ""
        self.calls = 0

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict[str, Any]]]:
        content, calls = [], []
        while True:
            if self.inside:
                end = text.find(CLOSE, self.done)
                if end < 0 and not final:
                    break
                stop = len(text) if end < 0 else end
                block, self.done = text[self.done : stop], stop + (0 if end < 0 else len(CLOSE))
                self.inside = False
                call = _block_call(block.strip(), self.names)
                if call is None:
                    content.append(self._show(OPEN + block + ("" if end < 0 else CLOSE)))
                else:
                    calls.append(call)
                continue
            start = text.find(OPEN, self.done)
            if start >= 0:
                content.append(self._show(text[self.done : start], hold=True))
                self.done, self.inside = start + len(OPEN), True
                continue
            safe = len(text) if final else len(text) - _partial_tag(text, self.done)
            content.append(self._show(text[self.done : safe], hold=not final))
            self.done = safe
            break
        if final and not self.calls + len(calls):
            content.append(self.held)
        self.calls += len(calls)
        return "".join(content), calls

    def _show(self, piece: str, hold: bool = False) -> str:
        """`piece` after the held whitespace; its own trailing whitespace is held if `hold`."""
        if not piece.strip():
            self.held += piece
            return ""
        body = piece.rstrip() if hold else piece
        out, self.held = self.held + body, piece[len(body) :]
        return out


def _partial_tag(text: str, lo: int) -> int:
    """The length of the longest end of text[lo:] that is a proper prefix of `<tool_call>`."""
    for k in range(min(len(OPEN) - 1, len(text) - lo), 0, -1):
        if text.endswith(OPEN[:k]):
            return k
    return 0


def message_for_template(message: dict[str, Any]) -> dict[str, Any]:
    """A chat message as HF templates expect: text content, tool-call arguments as dicts."""
    out = dict(message)
    content = out.get("content")
    if isinstance(content, list):
        out["content"] = "".join(
            part.get("text", "") for part in content if part.get("type", "text") == "text"
        )
    elif content is None:
        out["content"] = ""
    calls = []
    for call in out.get("tool_calls") or []:
        fn = dict(call.get("function", {}))
        if isinstance(fn.get("arguments"), str):
            try:
                fn["arguments"] = json.loads(fn["arguments"])
            except json.JSONDecodeError:
                pass
        calls.append({**call, "function": fn})
    if calls:
        out["tool_calls"] = calls
    return out
