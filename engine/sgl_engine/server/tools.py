"""OpenAI tool calling: grammars that force a call, prompts that offer tools, parsing calls out.

`tool_choice` "required" or a named function decodes the answer under a JSON schema over the
tools (so the call always parses and its arguments validate); "auto" lets the model answer
freely and picks `<tool_call>{...}</tool_call>` blocks (Hermes/Qwen style) out of the text.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from sgl_engine.errors import InvalidRequestError
from sgl_engine.server.protocol import Tool, ToolChoice

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


def parse_auto(text: str, tools: list[Tool]) -> tuple[str | None, list[dict[str, Any]]]:
    """(remaining content, calls) from a free answer: `<tool_call>` blocks naming known tools."""
    names = {t.function.name for t in tools}
    calls = []
    for block in _TOOL_CALL.findall(text):
        try:
            value = json.loads(block)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and value.get("name") in names:
            calls.append(_call(value["name"], value.get("arguments", {})))
    if not calls:
        return text, []
    content = _TOOL_CALL.sub("", text).strip()
    return content or None, calls


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
