"""OpenAI-shaped chat messages made ready for a model's own chat template.

A template that renders tools (`tools` in its source) gets them through
`apply_chat_template(messages, tools=...)`; one that does not gets the family's tools prompt in
the system turn. Past tool calls go to the template as `tool_calls` (arguments as objects) when
it renders them, else as text in the family's format; tool results go as `tool` turns when the
template knows that role, else as user turns holding `<tool_response>{...}</tool_response>`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sgl_engine.families.registry import ModelFamily
from sgl_engine.families.tool_format import ParsedCall


def tool_specs(tools: Sequence[dict]) -> list[dict]:
    """`{"name", "description", "parameters"}` of OpenAI tools (or of such specs already)."""
    out = []
    for tool in tools:
        fn = tool.get("function", tool)
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        out.append(
            {"name": fn["name"], "description": fn.get("description") or "", "parameters": params}
        )
    return out


def prepare_chat(
    family: ModelFamily,
    template: str | None,
    messages: Sequence[dict],
    tools: Sequence[dict] | None = None,
) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) to pass to `apply_chat_template` for this template and family.
    `tools` are OpenAI tool dicts (None or empty: no tools offered)."""
    template = template or ""
    renders_calls = "tool_calls" in template
    renders_tool_role = "tool" in template and ("'tool'" in template or '"tool"' in template)
    out = [_message(family, m, renders_calls, renders_tool_role) for m in messages]
    if not tools:
        return out, None
    full = [t if "function" in t else {"type": "function", "function": t} for t in tools]
    if "tools" in template:
        return out, full
    prompt = family.tools_system_prompt(tool_specs(full))
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + prompt}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out, None


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(
        p.get("text", "") if isinstance(p, dict) else str(p)
        for p in content
        if not isinstance(p, dict) or p.get("type", "text") == "text"
    )


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError:
            return raw
    return raw if raw is not None else {}


def _message(family: ModelFamily, m: dict, renders_calls: bool, renders_tool_role: bool) -> dict:
    role = m.get("role", "user")
    text = _text(m.get("content"))
    if role == "developer":
        role = "system"
    if role == "assistant" and m.get("tool_calls"):
        calls = [
            {
                **c,
                "function": {
                    **c.get("function", {}),
                    "arguments": _arguments(c.get("function", {}).get("arguments")),
                },
            }
            for c in m["tool_calls"]
        ]
        if renders_calls:
            return {"role": "assistant", "content": text, "tool_calls": calls}
        parsed = [
            ParsedCall(c["function"]["name"], _as_dict(c["function"]["arguments"])) for c in calls
        ]
        body = family.tool_format.render(parsed)
        return {"role": "assistant", "content": (text + "\n" if text else "") + body}
    if role in ("tool", "function"):
        if renders_tool_role and role == "tool":
            out = {"role": "tool", "content": text}
            for key in ("tool_call_id", "name"):
                if m.get(key):
                    out[key] = m[key]
            return out
        payload = {"name": m["name"], "content": text} if m.get("name") else {"content": text}
        body = json.dumps(payload, ensure_ascii=False)
        return {"role": "user", "content": f"<tool_response>{body}</tool_response>"}
    out = {"role": role, "content": text}
    if m.get("name"):
        out["name"] = m["name"]
    return out


def _as_dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {"value": value}
