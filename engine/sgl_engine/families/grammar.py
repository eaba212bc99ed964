"""EBNF for tool calling and reasoning, composed from xgrammar's JSON-schema grammars.

`tool_grammar` gives the answer grammar of a `tool_choice`: "auto" admits plain text (never
containing the format's trigger) optionally followed by one or more well-formed calls,
"required" only calls, "none" only such text. Every call's arguments follow its tool's JSON
schema (compact JSON). `with_reasoning` puts a free reasoning block before any answer grammar,
so a constraint applies after `</think>`. The result goes to the engine as an `ebnf` constraint.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from sgl_engine.families.reasoning import ReasoningFormat
from sgl_engine.families.tool_format import ToolFormat

Choice = Literal["auto", "required", "none", "list"]

_LITERAL_RE = re.compile(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]')
_ROOT_RE = re.compile(r"(?<![\w-])root(?![\w-])")


def lit(text: str) -> str:
    """An EBNF string literal."""
    return json.dumps(text, ensure_ascii=False)


def rename_root(ebnf: str, new: str) -> str:
    """`ebnf` with its rule `root` (and references to it, outside literals) renamed."""
    return _outside_literals(ebnf, lambda text: _ROOT_RE.sub(new, text))


def _outside_literals(ebnf: str, edit: Callable[[str], str]) -> str:
    """`ebnf` with `edit` applied to every stretch between its string literals."""
    out, pos = [], 0
    for m in _LITERAL_RE.finditer(ebnf):
        out.append(edit(ebnf[pos : m.start()]))
        out.append(m.group(0))
        pos = m.end()
    out.append(edit(ebnf[pos:]))
    return "".join(out)


_RULE_RE = re.compile(r"^([A-Za-z_][\w-]*) ::=", re.MULTILINE)


def namespaced(ebnf: str, rule: str) -> str:
    """`ebnf` with its root named `rule` and its other rules prefixed by `rule_`, except the
    shared `basic_*` JSON rules (identical in every compact-JSON grammar), so two grammars
    can sit in one file; `merge` then drops the repeated shared rules."""
    names = {n for n in _RULE_RE.findall(ebnf) if not n.startswith("basic_")}
    if not names:
        return ebnf
    pattern = re.compile(
        r"(?<![\w-])("
        + "|".join(sorted(map(re.escape, names), key=len, reverse=True))
        + r")(?![\w-])"
    )

    def rename(m: re.Match) -> str:
        return rule if m.group(1) == "root" else f"{rule}_{m.group(1)}"

    return _outside_literals(ebnf, lambda text: pattern.sub(rename, text))


def merge(*parts: str) -> str:
    """EBNF texts joined, keeping the first of repeated identical lines of shared rules."""
    seen: set[str] = set()
    lines = []
    for part in parts:
        for line in part.splitlines():
            if line.startswith("basic_"):
                if line in seen:
                    continue
                seen.add(line)
            lines.append(line)
    return "\n".join(lines) + "\n"


def json_schema_ebnf(schema: Mapping[str, Any] | str, rule: str = "root") -> str:
    """xgrammar's compact-JSON grammar of `schema`, its root rule named `rule` (other rules
    prefixed by `rule_`, see `namespaced`)."""
    import xgrammar as xgr

    from sgl_engine.grammar.schema_compat import compat_schema_text

    text = schema if isinstance(schema, str) else json.dumps(schema, ensure_ascii=False)
    ebnf = str(xgr.Grammar.from_json_schema(compat_schema_text(text), any_whitespace=False))
    return ebnf if rule == "root" else namespaced(ebnf, rule)


def text_rule(name: str, excluded: str) -> str:
    return f"{name} ::= TagDispatch(loop_after_dispatch=false, excludes=({lit(excluded)}))"


def tool_grammar(
    fmt: ToolFormat,
    specs: Sequence[Mapping[str, Any]],
    choice: Choice = "auto",
    parallel: bool = True,
    max_calls: int | None = None,
) -> str:
    """The answer grammar (root rule `root`) for tools `specs` ({"name", "parameters"}).
    "list" (array formats): only the call list, which may be empty (the model declines)."""
    text = text_rule("plain_text", fmt.trigger)
    if choice == "none" or not specs:
        return f"root ::= plain_text\n{text}\n"
    most = 1 if not parallel else max_calls
    if fmt.array:
        least = 0 if choice == "list" else 1
        schema: dict[str, Any] = {"type": "array", "items": fmt.call_schema(specs)}
        schema["minItems"] = least
        if most is not None:
            schema["maxItems"] = most
        calls = f"tool_calls ::= {lit(fmt.begin)} tool_call_json {lit(fmt.end)}"
        body = json_schema_ebnf(schema, "tool_call_json")
    else:
        one = f"tool_call ::= {lit(fmt.call_begin)} tool_call_json {lit(fmt.call_end)}"
        more = f"({lit(fmt.sep)} tool_call)" + ("*" if most is None else f"{{0, {most - 1}}}")
        repeat = "" if most == 1 else " " + more
        calls = f"tool_calls ::= {lit(fmt.begin)} tool_call{repeat} {lit(fmt.end)}\n{one}"
        body = json_schema_ebnf(fmt.call_schema(specs), "tool_call_json")
    only_calls = choice == "required" or (choice == "list" and fmt.array)
    root = "root ::= tool_calls" if only_calls else "root ::= plain_text tool_calls?"
    extra = "" if only_calls else f"\n{text}"
    return f"{root}\n{calls}{extra}\n{body}\n"


def constraint_ebnf(params: Mapping[str, Any]) -> str | None:
    """The EBNF of a request's constraint (`regex`, `json_schema`, `ebnf`, `choices`), or None."""
    import xgrammar as xgr

    if params.get("ebnf") is not None:
        return params["ebnf"]
    if params.get("json_schema") is not None:
        return json_schema_ebnf(params["json_schema"])
    if params.get("regex") is not None:
        return str(xgr.Grammar.from_regex(params["regex"]))
    if params.get("choices") is not None:
        return "root ::= " + " | ".join(lit(c) for c in params["choices"]) + "\n"
    return None


def with_reasoning(answer: str, fmt: ReasoningFormat, opened: bool | None) -> str:
    """`answer` (EBNF with root `root`) after a free reasoning block: the block is required
    when the prompt opened it (`opened` True), absent when the prompt closed it (False), and
    optional otherwise."""
    if opened is False:
        return answer
    body = rename_root(answer, "answer_root")
    think = f"{lit(fmt.start)} reasoning_text {lit(fmt.end)}"
    if opened:
        root = f"root ::= reasoning_text {lit(fmt.end)} reasoning_gap answer_root"
    else:
        root = f"root ::= ({think} reasoning_gap)? answer_root"
    gap = "reasoning_gap ::= [ \\n\\t]*"
    return f"{root}\n{text_rule('reasoning_text', fmt.end)}\n{gap}\n{body}"
