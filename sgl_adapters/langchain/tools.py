"""Tool calls decoded under a grammar, and parsed back (whole or streamed).

The model writes a call as `<tool_call>[{"name": "<tool>", "arguments": {...}}]</tool_call>`
(the format SmolLM2 was tuned on). The grammar is EBNF built from xgrammar's JSON-schema
grammar for `{"name": const, "arguments": <tool parameters>}` (anyOf over the allowed tools):
a call is exactly one such block. tool_choice "auto" is settled before decoding: the model's
log-probability of starting with `<tool_call>` (plus a bias) against its best plain-text first
token (`prefers_call`); a text answer is decoded under `TEXT_GRAMMAR` (never starts with "<").
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages.tool import (
    ToolCall,
    ToolCallChunk,
    invalid_tool_call,
    tool_call,
    tool_call_chunk,
)
from langchain_core.utils.function_calling import convert_to_openai_tool

from sgl_adapters.langchain.messages import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

_TAIL = "}]" + TOOL_CALL_CLOSE
_ARGS_KEY = '"arguments": '
_NAME_RE = re.compile(r'^\[\{"name": "((?:[^"\\]|\\.)*)"')
_LITERAL_RE = re.compile(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]')
_ROOT_RE = re.compile(r"(?<![\w-])root(?![\w-])")


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


def resolve_tool_choice(tool_choice: Any, specs: Sequence[dict]) -> tuple[bool, list[dict]]:
    """(forced, allowed specs) for a LangChain `tool_choice`: None/"auto" lets the model choose,
    "any"/"required"/True forces one of all tools, a name or {"function": {"name"}} forces that
    tool, "none" allows no call."""
    if tool_choice in (None, "auto"):
        return False, list(specs)
    if tool_choice == "none" or tool_choice is False:
        return False, []
    if tool_choice in ("any", "required", True):
        return True, list(specs)
    name = tool_choice
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or tool_choice).get("name")
    chosen = [s for s in specs if s["name"] == name]
    if not chosen:
        raise ValueError(f"tool_choice {tool_choice!r} names no bound tool")
    return True, chosen


def tool_system_prompt(specs: Sequence[dict]) -> str:
    """The system text SmolLM2-Instruct was tuned on for function calling: the task, the tools
    in `<tools>`, and the `<tool_call>[...]</tool_call>` output format."""
    listing = json.dumps(list(specs), ensure_ascii=False)
    example = '{"name": "func_name1", "arguments": {"argument1": "value1", "argument2": "value2"}}'
    return (
        "You are an expert in composing functions. You are given a question and a set of "
        "possible functions. \nBased on the question, you will need to make one or more "
        "function/tool calls to achieve the purpose. \nIf none of the functions can be used, "
        "point it out and refuse to answer. \nIf the given question lacks the parameters "
        "required by the function, also point it out.\n\nYou have access to the following "
        f"tools:\n<tools>{listing}</tools>\n\nThe output MUST strictly adhere to the "
        "following format, and NO other text MUST be included.\nThe example format is as "
        "follows. Please make sure the parameter type is correct. If no function call is "
        "needed, please make the tool calls an empty list '[]'.\n"
        f"{TOOL_CALL_OPEN}[\n{example},\n... (more tool calls as required)\n]{TOOL_CALL_CLOSE}"
    )


TEXT_GRAMMAR = "root ::= [^<] [^\\0]*"
"""A plain-text answer: non-empty and not starting with "<" (so never a tool-call tag)."""


def probe_ids(tokenizer: Any, prompt: str) -> tuple[list[int], int]:
    """Token ids of `prompt` followed by the tool-call tag, and where the tag's tokens start."""
    base = tokenizer.encode(prompt)
    full = tokenizer.encode(prompt + TOOL_CALL_OPEN)
    start = 0
    while start < min(len(base), len(full)) and base[start] == full[start]:
        start += 1
    return full, start


def prefers_call(meta: Mapping[str, Any], tokenizer: Any, bias: float) -> bool:
    """tool_choice "auto": whether the model's log-probability of starting its answer with the
    tool-call tag, plus `bias` (nats), is at least that of its best plain-text first token.

    `meta` is the engine's meta_info for `probe_ids` scored from the tag's start (input token
    logprobs and top logprobs). A text start is a top token that is not special and does not
    begin with "<"; when none is in the top list, the call wins."""
    call = sum(e[0] for e in meta["input_token_logprobs"])
    special = set(getattr(tokenizer, "all_special_ids", ()))
    text = [
        lp
        for lp, tid, _ in meta["input_top_logprobs"][0] or ()
        if tid not in special and not tokenizer.decode([tid]).lstrip().startswith("<")
    ]
    return not text or call + bias >= max(text)


def call_schema(specs: Sequence[dict]) -> dict:
    """JSON schema of one call to any of `specs`."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": s["name"]}, "arguments": s["parameters"]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for s in specs
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def tool_grammar(specs: Sequence[dict], forced: bool) -> str:
    """EBNF (root rule `root`) for one tool call, or (not forced) a call or plain text."""
    import xgrammar as xgr

    schema = json.dumps(call_schema(specs), ensure_ascii=False)
    ebnf = str(xgr.Grammar.from_json_schema(schema, any_whitespace=False))
    call_rules = _rename_root(ebnf, "tool_call_object")
    block = f'tool_call_block ::= "{TOOL_CALL_OPEN}[" tool_call_object "]{TOOL_CALL_CLOSE}"'
    root = "root ::= tool_call_block" if forced else "root ::= tool_call_block | text_answer"
    text = "" if forced else "\ntext_answer" + TEXT_GRAMMAR.removeprefix("root")
    return f"{root}\n{block}{text}\n{call_rules}\n"


def _rename_root(ebnf: str, new: str) -> str:
    out, pos = [], 0
    for m in _LITERAL_RE.finditer(ebnf):
        out.append(_ROOT_RE.sub(new, ebnf[pos : m.start()]))
        out.append(m.group(0))
        pos = m.end()
    out.append(_ROOT_RE.sub(new, ebnf[pos:]))
    return "".join(out)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def parse_output(text: str) -> tuple[str, list[ToolCall], list]:
    """(content, tool calls, invalid tool calls) of a completion."""
    stripped = text.lstrip()
    if not stripped.startswith(TOOL_CALL_OPEN):
        return text, [], []
    body = stripped[len(TOOL_CALL_OPEN) :]
    end = body.rfind(TOOL_CALL_CLOSE)
    raw = body[:end] if end >= 0 else body
    try:
        items = json.JSONDecoder().raw_decode(raw)[0]
        if isinstance(items, dict):
            items = [items]
        calls = [tool_call(name=i["name"], args=i["arguments"], id=new_call_id()) for i in items]
        return "", calls, []
    except (ValueError, KeyError, TypeError) as exc:
        bad = invalid_tool_call(name=None, args=raw, id=new_call_id(), error=str(exc))
        return "", [], [bad]


@dataclass
class ToolStreamParser:
    """Turns cumulative completion text into content deltas or `tool_call_chunks`.

    Mutates only itself. Until the first character decides, nothing is emitted; in a call,
    the name is emitted once known, then the arguments text, holding back the length of the
    closing `}]</tool_call>` until `finish`.
    """

    call_id: str = field(default_factory=new_call_id)
    mode: str = ""
    sent: int = 0
    name_sent: bool = False

    def feed(self, text: str) -> tuple[str, list[ToolCallChunk]]:
        if not self.mode:
            self.mode = _decide(text)
        if self.mode == "call":
            return "", self._call_chunks(text, final=False)
        if self.mode == "text":
            delta, self.sent = text[self.sent :], len(text)
            return delta, []
        return "", []

    def finish(self, text: str) -> tuple[str, list[ToolCallChunk]]:
        self.mode = self.mode or _decide(text) or "text"
        if self.mode == "call":
            return "", self._call_chunks(text, final=True)
        delta, self.sent = text[self.sent :], len(text)
        return delta, []

    def _call_chunks(self, text: str, final: bool) -> list[ToolCallChunk]:
        body = text.lstrip()[len(TOOL_CALL_OPEN) :]
        chunks: list[ToolCallChunk] = []
        if not self.name_sent:
            m = _NAME_RE.match(body)
            if m is None:
                return chunks
            name = json.loads(f'"{m.group(1)}"')
            chunks.append(tool_call_chunk(name=name, args="", id=self.call_id, index=0))
            self.name_sent = True
        start = body.find(_ARGS_KEY)
        if start < 0:
            return chunks
        args = body[start + len(_ARGS_KEY) :]
        if final:
            args = args[: -len(_TAIL)] if args.endswith(_TAIL) else args
        else:
            args = args[: max(0, len(args) - len(_TAIL))]
        if len(args) > self.sent:
            delta, self.sent = args[self.sent :], len(args)
            if chunks:  # one chunk per step: the name's chunk carries the first arguments
                chunks[0] = tool_call_chunk(
                    name=chunks[0]["name"], args=delta, id=self.call_id, index=0
                )
            else:
                chunks.append(tool_call_chunk(name=None, args=delta, id=None, index=0))
        return chunks


def _decide(text: str) -> str:
    """ "call" or "text" once the start of `text` tells, else ""."""
    stripped = text.lstrip()
    head = stripped[: len(TOOL_CALL_OPEN)]
    if not TOOL_CALL_OPEN.startswith(head):
        return "text"
    return "call" if len(head) == len(TOOL_CALL_OPEN) else ""
