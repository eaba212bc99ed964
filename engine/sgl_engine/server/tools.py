"""Chat requests through the model's family: prompt with tools, grammar, answer parsing.

`plan_chat` renders the prompt with the model's own chat template (tools offered through it,
or the family's tools prompt when it cannot), and picks the grammar: `tool_choice` "auto"
admits text or one or more calls, "required" or a named tool only calls, "none" only text;
`parallel_tool_calls=False` allows one call. Reasoning families get a free `<think>` block
before any grammar. `answer_message` and `ChoiceStream` turn the output into OpenAI's
message / stream deltas (`reasoning_content`, `content`, `tool_calls`).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from sgl_engine.errors import InvalidRequestError
from sgl_engine.families import (
    ModelFamily,
    OutputStream,
    parse_output,
    prepare_chat,
)
from sgl_engine.families.chat import tool_specs
from sgl_engine.families.decoding import plan_decoding
from sgl_engine.server.protocol import ChatCompletionRequest, ToolChoice


@dataclass(frozen=True)
class ChatPlan:
    """A chat request made concrete: prompt text and how to read the answer (tool calls parsed
    only when tools were offered); the answer's grammar is in the request's params."""

    family: ModelFamily
    prompt: str
    parse_tools: bool
    reasoning: bool
    opened: bool | None


def _mode(body: ChatCompletionRequest) -> tuple[str, list[dict]]:
    """("auto" | "required" | "none", the specs the answer may call)."""
    specs = tool_specs([t.model_dump(exclude_none=True) for t in body.tools or []])
    choice = body.tool_choice
    if not specs or choice == "none":
        return "none", specs
    if isinstance(choice, ToolChoice):
        named = [s for s in specs if s["name"] == choice.function.name]
        if not named:
            known = ", ".join(s["name"] for s in specs)
            raise InvalidRequestError(
                f"tool_choice names {choice.function.name!r}, which is not in tools ({known})",
                "tool_choice",
            )
        return "required", named
    return ("required" if choice == "required" else "auto"), specs


def plan_chat(eng: Any, body: ChatCompletionRequest, family: ModelFamily, params: dict) -> ChatPlan:
    """The plan of a chat request; moves the request's own constraint in `params` into the
    plan's grammar when one is needed (tools, or reasoning before a constraint). With tools,
    a `response_format` is what a text answer must follow (as LangChain's and DSPy's doors do);
    "required" or a named tool_choice leaves no text answer."""
    mode, specs = _mode(body)
    raw = [m.model_dump(exclude_none=True) for m in body.messages]
    if mode == "auto":
        mode = family.auto_mode(raw)
    template = getattr(eng.tokenizer, "chat_template", None)
    template = template if isinstance(template, str) else ""
    offered = [t.model_dump(exclude_none=True) for t in body.tools or []] if mode != "none" else []
    messages, tools = prepare_chat(family, template, raw, offered)
    try:
        prompt = eng.apply_chat_template(messages, tools=tools, **(body.chat_template_kwargs or {}))
    except Exception as exc:  # jinja errors from the model's template
        raise InvalidRequestError(
            f"the chat template rejected the messages: {exc}", "messages"
        ) from None
    decoding = plan_decoding(
        family,
        prompt,
        params,
        specs if body.tools else None,
        mode,
        parallel=body.parallel_tool_calls is not False,
    )
    reasoning = family.reasoning is not None and bool(body.separate_reasoning)
    return ChatPlan(family, prompt, mode != "none", reasoning, decoding.opened)


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def answer_message(plan: ChatPlan, text: str) -> tuple[dict, bool]:
    """The assistant message of a whole answer and whether it calls tools."""
    out = parse_output(
        text,
        plan.family.tool_format if plan.parse_tools else None,
        plan.family.reasoning if plan.reasoning else None,
        plan.opened,
    )
    message: dict[str, Any] = {"role": "assistant", "content": out.content}
    if out.reasoning is not None:
        message["reasoning_content"] = out.reasoning
    if out.calls:
        message["content"] = out.content or None
        message["tool_calls"] = [
            {
                "id": new_call_id(),
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments_json},
            }
            for c in out.calls
        ]
    return message, bool(out.calls)


class ChoiceStream:
    """One streamed choice: cumulative output text in, OpenAI delta dicts out. Each call gets
    an id and its name in its first delta, then argument pieces under the same `index`."""

    def __init__(self, plan: ChatPlan) -> None:
        self.parser = OutputStream(
            plan.family.tool_format if plan.parse_tools else None,
            plan.family.reasoning if plan.reasoning else None,
            plan.opened,
        )

    @property
    def called(self) -> bool:
        return self.parser.called

    def feed(self, text: str, final: bool) -> dict[str, Any]:
        step = self.parser.feed(text, final)
        delta: dict[str, Any] = {}
        if step.reasoning:
            delta["reasoning_content"] = step.reasoning
        if step.content:
            delta["content"] = step.content
        calls = []
        for piece in step.calls:
            if piece.name is not None:
                fn = {"name": piece.name, "arguments": piece.arguments}
                calls.append(
                    {"index": piece.index, "id": new_call_id(), "type": "function", "function": fn}
                )
            elif calls and calls[-1]["index"] == piece.index:
                calls[-1]["function"]["arguments"] += piece.arguments
            else:
                calls.append({"index": piece.index, "function": {"arguments": piece.arguments}})
        if calls:
            delta["tool_calls"] = calls
        return delta
