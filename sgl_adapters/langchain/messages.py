"""LangChain messages -> OpenAI-shaped chat messages -> one prompt string.

`to_openai_dicts` keeps tool traffic structured (assistant `tool_calls`, `tool` turns); the
model family (`sgl_engine.families.prepare_chat`) then hands it to the chat template, or writes
it as text in the family's format when the template cannot render it. A template that refuses
a message list (two turns of one role in a row, a system turn where none is allowed, strict
alternation) gets the list merged: consecutive turns of one role are joined, then system text
is folded into the first user turn.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


def content_text(content: str | list) -> str:
    """The text of a message's content; non-text blocks (images, files) are rejected."""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif block.get("type") == "text":
            parts.append(block.get("text", ""))
        elif block.get("type") in ("tool_use", "tool_call", "thinking", "reasoning"):
            continue
        else:
            raise ValueError(f"content blocks of type {block.get('type')!r} are not supported")
    return "".join(parts)


def format_tool_calls(calls: Sequence[dict]) -> str:
    """The text form of tool calls, as the tool grammar generates it (compact JSON)."""
    items = [{"name": c["name"], "arguments": c.get("args", {})} for c in calls]
    return TOOL_CALL_OPEN + json.dumps(items, ensure_ascii=False) + TOOL_CALL_CLOSE


def to_openai_dicts(messages: Sequence[BaseMessage]) -> list[dict]:
    """OpenAI-shaped messages: assistant tool calls as `tool_calls` (arguments as objects),
    tool results as `tool` turns with their call id and name."""
    out: list[dict] = []
    for m in messages:
        if isinstance(m, AIMessage) and m.tool_calls:
            calls = [
                {
                    "id": c.get("id") or "",
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c.get("args", {})},
                }
                for c in m.tool_calls
            ]
            out.append(
                {"role": "assistant", "content": content_text(m.content), "tool_calls": calls}
            )
        elif isinstance(m, ToolMessage):
            out.append(
                {
                    "role": "tool",
                    "content": content_text(m.content),
                    "tool_call_id": m.tool_call_id,
                    **({"name": m.name} if m.name else {}),
                }
            )
        else:
            out.append(_to_dict(m))
    return out


def to_chat_dicts(messages: Sequence[BaseMessage], tool_prompt: str | None = None) -> list[dict]:
    """Template messages ({"role", "content"}) for `messages`; `tool_prompt` joins the system
    turn (one is added first if there is none)."""
    out: list[dict] = []
    for m in messages:
        out.append(_to_dict(m))
    if tool_prompt:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + tool_prompt}
        else:
            out.insert(0, {"role": "system", "content": tool_prompt})
    return out


def _to_dict(m: BaseMessage) -> dict:
    text = content_text(m.content)
    if isinstance(m, SystemMessage):
        return {"role": "system", "content": text}
    if isinstance(m, HumanMessage):
        return {"role": "user", "content": _named(text, m.name)}
    if isinstance(m, AIMessage):
        if m.tool_calls:
            text = (text + "\n" if text else "") + format_tool_calls(m.tool_calls)
        return {"role": "assistant", "content": text}
    if isinstance(m, (ToolMessage, FunctionMessage)):
        name = getattr(m, "name", None)
        payload = {"name": name, "content": text} if name else {"content": text}
        if getattr(m, "status", "success") == "error":
            payload["error"] = True
        body = json.dumps(payload, ensure_ascii=False)
        return {"role": "user", "content": f"<tool_response>{body}</tool_response>"}
    if isinstance(m, ChatMessage):
        return {"role": m.role, "content": text}
    raise ValueError(f"unsupported message type {type(m).__name__}")


def _named(text: str, name: str | None) -> str:
    return text if not name else f"{name}: {text}"


def merge_consecutive(messages: list[dict]) -> list[dict]:
    """Join turns of one role in a row; system turns move to one leading system turn."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    out: list[dict] = [{"role": "system", "content": "\n\n".join(system)}] if system else []
    for m in messages:
        if m["role"] == "system":
            continue
        if out and out[-1]["role"] == m["role"]:
            out[-1] = {"role": m["role"], "content": out[-1]["content"] + "\n\n" + m["content"]}
        else:
            out.append(dict(m))
    return out


def fold_system(messages: list[dict]) -> list[dict]:
    """Move a leading system turn into the first user turn (for templates without system)."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], messages[1:]
    if rest and rest[0]["role"] == "user":
        return [{"role": "user", "content": system + "\n\n" + rest[0]["content"]}, *rest[1:]]
    return [{"role": "user", "content": system}, *rest]


def render(messages: list[dict], apply_template: Callable[[list[dict]], str]) -> str:
    """The prompt from the first of: the messages as given, merged, merged with system folded,
    that the template accepts; the last error is raised if none is."""
    attempts = [messages, merge_consecutive(messages)]
    attempts.append(fold_system(attempts[-1]))
    error: Exception | None = None
    for attempt in attempts:
        try:
            return apply_template(attempt)
        except Exception as exc:  # noqa: BLE001 -- templates raise anything (jinja, ValueError)
            error = exc
    assert error is not None
    raise error
