"""Tool calling and reasoning for `ChatSGLang`, through the model's family (sgl_engine.families).

The prompt offers tools through the model's own chat template (or the family's tools prompt);
the answer decodes under the family's tool grammar: tool_choice None/"auto" admits text or one
or more calls, "any"/"required"/True or a tool name only calls, "none"/False only text, and
`parallel_tool_calls=False` at most one call. Every call's arguments follow its tool's JSON
schema, so `strict` is always in effect. A `response_format` replaces the plain-text
alternative by its JSON schema. Reasoning families decode a free `<think>` block first.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.messages.tool import ToolCall, ToolCallChunk, tool_call, tool_call_chunk
from langchain_core.utils.function_calling import convert_to_openai_tool
from sgl_engine.families import (
    CallDelta,
    ModelFamily,
    ParsedCall,
)
from sgl_engine.families.decoding import Decoding
from sgl_engine.families.decoding import plan_decoding as families_plan

from sgl_adapters.json_schema import cap_strings


def tool_specs(tools: Sequence[Any]) -> list[dict]:
    """OpenAI-style function specs ({"name", "description", "parameters"}) of LangChain tools,
    functions, pydantic models, TypedDicts or dicts."""
    specs = []
    for t in tools:
        fn = convert_to_openai_tool(t)["function"]
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        specs.append(
            {"name": fn["name"], "description": fn.get("description", ""), "parameters": params}
        )
    return specs


def resolve_tool_choice(tool_choice: Any, specs: Sequence[dict]) -> tuple[str, list[dict]]:
    """("auto" | "required" | "none", the specs a call may name) for a LangChain tool_choice."""
    if tool_choice in (None, "auto"):
        return "auto", list(specs)
    if tool_choice == "none" or tool_choice is False:
        return "none", list(specs)
    if tool_choice in ("any", "required", True):
        return "required", list(specs)
    name = tool_choice
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or tool_choice).get("name")
    chosen = [s for s in specs if s["name"] == name]
    if not chosen:
        raise ValueError(f"tool_choice {tool_choice!r} names no bound tool")
    return "required", chosen


def response_format_schema(response_format: Any) -> dict | None:
    """The JSON schema of an OpenAI-style `response_format` (json_schema / json_object /
    text), or of a pydantic class / JSON schema dict given directly."""
    if response_format is None:
        return None
    if isinstance(response_format, type) or (
        isinstance(response_format, Mapping) and "type" not in response_format
    ):
        from langchain_core.utils.function_calling import convert_to_json_schema

        return convert_to_json_schema(response_format)
    if hasattr(response_format, "model_dump"):
        response_format = response_format.model_dump(by_alias=True, exclude_none=True)
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema")
        if schema is None:
            raise ValueError("response_format json_schema needs json_schema.schema")
        return dict(schema)
    if kind in ("object", "array", "string", "number", "integer", "boolean"):
        return dict(response_format)
    raise ValueError(f"unsupported response_format type {kind!r}")


def plan_decoding(
    family: ModelFamily,
    prompt: str,
    params: dict,
    specs: Sequence[dict] | None,
    tool_choice: Any,
    parallel: bool,
    max_string_length: int | None,
    auto_mode: str = "auto",
) -> Decoding:
    """`sgl_engine.families.plan_decoding` for a LangChain tool_choice, with free JSON
    strings of tool arguments capped at `max_string_length`."""
    mode, allowed = resolve_tool_choice(tool_choice, specs or [])
    if mode == "auto":
        mode = auto_mode
    capped = [{**s, "parameters": cap_strings(s["parameters"], max_string_length)} for s in allowed]
    return families_plan(family, prompt, params, capped if specs else None, mode, parallel)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def lc_tool_calls(calls: Sequence[ParsedCall]) -> list[ToolCall]:
    return [tool_call(name=c.name, args=c.arguments, id=new_call_id()) for c in calls]


class ChunkIds:
    """Stable ids for streamed calls: one per call index (mutates only itself)."""

    def __init__(self) -> None:
        self.ids: dict[int, str] = {}

    def chunks(self, deltas: Sequence[CallDelta]) -> list[ToolCallChunk]:
        out: list[ToolCallChunk] = []
        for d in deltas:
            if d.name is not None:
                self.ids[d.index] = new_call_id()
                out.append(
                    tool_call_chunk(
                        name=d.name, args=d.arguments, id=self.ids[d.index], index=d.index
                    )
                )
            elif out and out[-1]["index"] == d.index:
                prev = out[-1]
                out[-1] = tool_call_chunk(
                    name=prev["name"],
                    args=(prev["args"] or "") + d.arguments,
                    id=prev["id"],
                    index=d.index,
                )
            else:
                out.append(tool_call_chunk(name=None, args=d.arguments, id=None, index=d.index))
        return out
