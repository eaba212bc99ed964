"""How one request decodes: the grammar for its tool choice, constraint and reasoning, and
what to parse back. Shared by the front doors (LangChain, DSPy) that render their own prompts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sgl_engine.families.grammar import (
    constraint_ebnf,
    merge,
    namespaced,
    tool_grammar,
    with_reasoning,
)
from sgl_engine.families.registry import ModelFamily

CONSTRAINT_KEYS = ("regex", "json_schema", "ebnf", "choices")


@dataclass(frozen=True)
class Decoding:
    """How one call decodes and reads back: the grammar (None: free) and what to parse."""

    ebnf: str | None
    parse_tools: bool
    reasoning: bool
    opened: bool | None


def plan_decoding(
    family: ModelFamily,
    prompt: str,
    params: dict,
    specs: Sequence[dict] | None,
    mode: str = "auto",
    parallel: bool = True,
) -> Decoding:
    """The decoding of a request whose prompt is `prompt`. `mode` is "auto", "required",
    "none" or "list" (see `tool_grammar`) over `specs` ({"name", "parameters"}; None: no tools
    offered). A constraint already in `params` becomes the non-call answer; when tools or
    reasoning need one grammar for everything, `params` (mutated) gets it as `ebnf`."""
    opened = family.reasoning.opened_by(prompt) if family.reasoning else None
    given = any(params.get(k) is not None for k in CONSTRAINT_KEYS)
    constraint = constraint_ebnf(params) if given else None
    ebnf = constraint
    if specs:
        ebnf = tool_grammar(family.tool_format, specs, mode, parallel)
        if constraint is not None:
            ebnf = _text_alternative(ebnf, constraint, mode)
    if ebnf is None:
        return Decoding(None, False, family.reasoning is not None, opened)
    if family.reasoning is not None:
        ebnf = with_reasoning(ebnf, family.reasoning, opened)
    if ebnf is not constraint or family.reasoning is not None:
        for key in CONSTRAINT_KEYS:
            params.pop(key, None)
        params["ebnf"] = ebnf
    return Decoding(ebnf, bool(specs) and mode != "none", family.reasoning is not None, opened)


def _text_alternative(tools_ebnf: str, answer: str, mode: str) -> str:
    """A tool grammar whose plain-text answer is replaced by the grammar `answer`."""
    if mode in ("required", "list"):
        return tools_ebnf
    body = namespaced(answer, "structured_answer")
    lines = tools_ebnf.splitlines()
    root = "root ::= structured_answer"
    if mode != "none":
        root += " | tool_calls"
    rest = [line for line in lines[1:] if not line.startswith("plain_text ::=")]
    return merge("\n".join([root, *rest]), body)
