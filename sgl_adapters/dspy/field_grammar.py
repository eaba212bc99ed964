"""The grammar of DSPy ChatAdapter's field-marker format, sized to the call's token budget.

A ChatAdapter answer is `[[ ## field ## ]]\\nvalue\\n\\n` per output field, then
`[[ ## completed ## ]]`. `field_format(signature, tools)` describes that answer: free text for
`str` fields (never a `[`, so no line can pass for a marker), the exact spellings of numbers,
booleans and string `Literal`s, and any other type by its JSON schema (xgrammar's JSON).
When the signature picks a tool by name and then gives its arguments (`dspy.ReAct`:
`next_tool_name: Literal[...]`, `next_tool_args: dict`), and the tools are known, the two
fields are decoded together: each name is followed by arguments valid against that tool's
JSON schema.

`FieldFormat.params(max_new_tokens)` then bounds each free-text field so the whole answer fits
the budget in the worst case (one token per byte: 4 bytes a character, 6 for a JSON string's
`\\uXXXX` escape), raising the budget to the grammar's shortest worst case if it is smaller.
So every answer ends with all its fields, whatever the model prefers; only JSON values with no
bound of their own (numbers, arrays without `maxItems`) make the size an estimate, and the
answer can then still run past the budget.
"""

from __future__ import annotations

import enum
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter
from sgl_engine.families.grammar import json_schema_ebnf, lit, merge

from sgl_adapters.json_schema import cap_strings

TEXT_MIN_CHARS = 16
TEXT_MAX_CHARS = 2000
BYTES_PER_CHAR = 4
ESCAPED_CHAR_BYTES = 6
STOP_SLACK = 2
"""Tokens after the answer: the stop token (and one spare)."""
UNBOUNDED_ALLOWANCE = 24
"""Bytes counted for a JSON value with no bound (a number, an open array or object) when
sizing the free text; the answer is then no longer guaranteed to fit."""

_SCALARS: dict[Any, tuple[str, int]] = {
    int: ('"-"? [0-9]{1,9}', 10),
    float: ('"-"? [0-9]{1,9} ("." [0-9]{1,6})?', 17),
    bool: ('("True" | "False")', 5),
}


@dataclass(frozen=True)
class Value:
    """One field value: an EBNF expression over `rules` and its longest spelling in bytes
    (`bounded` False: an estimate, some part has no bound), or free text (`text`: sized later)."""

    expr: str = ""
    rules: str = ""
    max_bytes: int = 0
    bounded: bool = True
    text: bool = False
    literal: str | None = None


@dataclass(frozen=True)
class FieldFormat:
    """The answer grammar of one signature: literals, values and free-text slots in order."""

    items: tuple[Value, ...]

    @property
    def text_fields(self) -> int:
        return sum(v.text for v in self.items)

    @property
    def fixed_bytes(self) -> int:
        """Longest spelling of everything but the free text (an estimate unless `bounded`)."""
        return sum(v.max_bytes for v in self.items if not v.text)

    @property
    def bounded(self) -> bool:
        return all(v.bounded for v in self.items)

    def text_chars(self, max_new_tokens: int) -> int:
        """Characters each free-text field may take so the answer fits `max_new_tokens`."""
        if not self.text_fields:
            return 0
        room = max_new_tokens - STOP_SLACK - self.fixed_bytes
        chars = room // (BYTES_PER_CHAR * self.text_fields)
        return max(TEXT_MIN_CHARS, min(TEXT_MAX_CHARS, chars))

    def worst_case_tokens(self, text_chars: int) -> int | None:
        """The most tokens an answer can take (one per byte), or None when unbounded."""
        if not self.bounded:
            return None
        return self.fixed_bytes + BYTES_PER_CHAR * text_chars * self.text_fields + STOP_SLACK

    def ebnf(self, text_chars: int) -> str:
        parts, rules = [], []
        for v in self.items:
            parts.append("text" if v.text else v.expr)
            if v.rules:
                rules.append(v.rules)
        head = "root ::= " + " ".join(parts)
        if self.text_fields:
            head += f"\ntext ::= [^\\[ \\t\\r\\n] [^\\[]{{0,{text_chars - 1}}}"
        return merge(head, *rules)

    def params(self, max_new_tokens: int) -> dict[str, Any]:
        """SGLang params for a call of budget `max_new_tokens`: the `ebnf`, and the budget
        raised to the grammar's worst case when that is larger."""
        chars = self.text_chars(max_new_tokens)
        out: dict[str, Any] = {"ebnf": self.ebnf(chars)}
        worst = self.worst_case_tokens(chars)
        if worst is not None and worst > max_new_tokens:
            out["max_new_tokens"] = worst
        return out


def field_format(
    signature: Any,
    tools: Mapping[str, Mapping[str, Any]] | None = None,
    max_string_length: int | None = 32,
) -> FieldFormat | None:
    """The answer format of `signature` (a dspy.Signature class), or None when an output
    field's type has no grammar here (DSPy's own types, unions with `str`, enums): the call
    then runs unconstrained. `tools` maps tool names to their argument JSON schemas; JSON
    strings are capped at `max_string_length` characters."""
    fields = list(signature.output_fields.items())
    items: list[Value] = []
    i = 0
    while i < len(fields):
        name, field = fields[i]
        items.append(_literal(f"[[ ## {name} ## ]]\n"))
        pair = fields[i + 1] if i + 1 < len(fields) else None
        call = _tool_call(field.annotation, pair, tools, max_string_length, f"f{i}")
        if call is not None:
            items.append(call)
            i += 2
        else:
            value = value_of(field.annotation, f"f{i}", max_string_length)
            if value is None:
                return None
            items.append(value)
            i += 1
        items.append(_literal("\n\n"))
    items.append(_literal("[[ ## completed ## ]]"))
    return FieldFormat(tuple(_joined(items)))


def value_of(annotation: Any, rule: str, max_string_length: int | None) -> Value | None:
    """The grammar of one value as ChatAdapter writes and parses it, or None."""
    if annotation is str:
        return Value(text=True)
    if annotation in _SCALARS:
        expr, size = _SCALARS[annotation]
        return Value(expr, "", size)
    options = _string_literals(annotation)
    if options is not None:
        return _choice(options)
    if not _json_typed(annotation):
        return None
    try:
        schema = TypeAdapter(annotation).json_schema()
    except Exception:
        return None
    return _json(cap_strings(schema, max_string_length), rule)


def tool_schema(args: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON schema of a `dspy.Tool`'s arguments (`Tool.args`), as DSPy offers it."""
    return {
        "type": "object",
        "properties": dict(args),
        "required": [k for k, v in args.items() if "default" not in v],
        "additionalProperties": False,
    }


def json_size(schema: Any, defs: Mapping[str, Any] | None = None) -> tuple[int, bool]:
    """The longest spelling of a value of `schema` in xgrammar's JSON (`", "` and `": "`
    separators), and whether that is a bound (False: some part has none and counts
    `UNBOUNDED_ALLOWANCE`)."""
    if not isinstance(schema, Mapping):
        return UNBOUNDED_ALLOWANCE, False
    defs = schema.get("$defs", defs) or {}
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        target = defs.get(ref.split("/")[-1])
        return (UNBOUNDED_ALLOWANCE, False) if target is None else json_size(target, defs)
    if "const" in schema:
        return len(json.dumps(schema["const"]).encode()), True
    if "enum" in schema:
        return max(len(json.dumps(v).encode()) for v in schema["enum"]), True
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return _widest([json_size(s, defs) for s in schema[key]])
    kind = schema.get("type")
    if isinstance(kind, list):
        return _widest([json_size({**schema, "type": k}, defs) for k in kind])
    if kind == "string" and schema.get("maxLength") is not None:
        return 2 + ESCAPED_CHAR_BYTES * schema["maxLength"], True
    if kind in ("boolean", "null"):
        return 5, True
    if kind == "object" and schema.get("additionalProperties", True) is False:
        return _object_size(schema.get("properties") or {}, defs)
    if kind == "array" and schema.get("maxItems") is not None:
        item, bounded = json_size(schema.get("items", {}), defs)
        n = schema["maxItems"]
        return 2 + n * item + 2 * max(0, n - 1), bounded
    return UNBOUNDED_ALLOWANCE, False


def _widest(sizes: Sequence[tuple[int, bool]]) -> tuple[int, bool]:
    return max(n for n, _ in sizes), all(b for _, b in sizes)


def _object_size(props: Mapping[str, Any], defs: Mapping[str, Any]) -> tuple[int, bool]:
    total, bounded = 2 + 2 * max(0, len(props) - 1), True
    for key, sub in props.items():
        size, exact = json_size(sub, defs)
        total += len(json.dumps(key).encode()) + 2 + size
        bounded = bounded and exact
    return total, bounded


def _literal(text: str) -> Value:
    return Value(lit(text), "", len(text.encode()), literal=text)


def _joined(items: Sequence[Value]) -> list[Value]:
    """Adjacent literals merged (the grammar reads the same, just shorter)."""
    out: list[Value] = []
    for v in items:
        if v.literal is not None and out and out[-1].literal is not None:
            out[-1] = _literal(out[-1].literal + v.literal)
        else:
            out.append(v)
    return out


def _choice(options: Sequence[str]) -> Value:
    expr = "(" + " | ".join(lit(o) for o in options) + ")"
    return Value(expr, "", max(len(o.encode()) for o in options))


def _json(schema: Any, rule: str) -> Value:
    size, bounded = json_size(schema)
    return Value(rule, json_schema_ebnf(schema, rule), size, bounded)


def _string_literals(annotation: Any) -> tuple[str, ...] | None:
    if typing.get_origin(annotation) is not typing.Literal:
        return None
    options = typing.get_args(annotation)
    return options if options and all(isinstance(o, str) for o in options) else None


def _json_typed(annotation: Any) -> bool:
    """Whether ChatAdapter reads this type back from JSON (not DSPy's own types, enums, or
    unions with `str`, which it reads from the raw text)."""
    import dspy

    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return str not in typing.get_args(annotation)
    if origin is typing.Literal:
        return False
    if isinstance(annotation, type):
        if issubclass(annotation, enum.Enum | dspy.Type):
            return False
    return True


def _tool_call(
    annotation: Any,
    pair: tuple[str, Any] | None,
    tools: Mapping[str, Mapping[str, Any]] | None,
    max_string_length: int | None,
    rule: str,
) -> Value | None:
    """A tool-name field and the arguments field after it, decoded as one choice of tool."""
    names = _string_literals(annotation)
    if names is None or pair is None or not tools or not set(names) <= set(tools):
        return None
    args_name, args_field = pair
    args_type = args_field.annotation
    if not (args_type is dict or typing.get_origin(args_type) is dict):
        return None
    between = f"\n\n[[ ## {args_name} ## ]]\n"
    alternatives, rules, sizes = [], [], []
    for j, name in enumerate(names):
        value = _json(cap_strings(dict(tools[name]), max_string_length), f"{rule}_args{j}")
        alternatives.append(f"{lit(name)} {lit(between)} {value.expr}")
        rules.append(value.rules)
        size = len(name.encode()) + len(between.encode()) + value.max_bytes
        sizes.append((size, value.bounded))
    size, bounded = _widest(sizes)
    return Value("(" + " | ".join(alternatives) + ")", merge(*rules), size, bounded)
