"""`ChatAdapter` whose completions are decoded under a grammar of DSPy's field-marker format.

DSPy's ChatAdapter asks for `[[ ## field ## ]]` sections and parses them back; small models
miss the markers (`[[## answer ## ]]`), run a free-text field past `max_tokens`, or pick a tool
that does not exist. This adapter builds the grammar of the exact format from the signature
(`field_grammar.field_format`: bounded free text, typed values, and for `dspy.ReAct` a tool
name followed by arguments valid for that tool) and hands it to the engine for the calls it
makes, through a context variable (one per thread / task, so concurrent `module.batch` calls
never see each other's): both the 3.4 engine and the 3.3 LM read it in `constraint_params()`,
which sizes the grammar to the call's token budget.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import dspy

from sgl_adapters.dspy.field_grammar import FieldFormat, field_format, tool_schema

_CONSTRAINT: ContextVar[dict[str, Any] | FieldFormat | None] = ContextVar(
    "sgl_dspy_constraint", default=None
)


@contextmanager
def constrained(format: FieldFormat | None = None, **params: Any) -> Iterator[None]:  # noqa: A002
    """Engine calls made inside (this thread / task) decode under `params` (SGLang constraint
    keys: regex, ebnf, json_schema, choices), or under `format` sized to each call's budget,
    unless the call brings a constraint of its own."""
    token = _CONSTRAINT.set(format if format is not None else dict(params))
    try:
        yield
    finally:
        _CONSTRAINT.reset(token)


def constraint_params(max_new_tokens: int) -> dict[str, Any]:
    """The constraint set by the innermost `constrained(...)` around this call, if any, for
    a call of budget `max_new_tokens` (a field format may raise it: key `max_new_tokens`)."""
    current = _CONSTRAINT.get()
    if isinstance(current, FieldFormat):
        return current.params(max_new_tokens)
    return dict(current or {})


def tools_in_scope() -> dict[str, dict[str, Any]]:
    """Argument schemas of the tools of the innermost calling module that has `dspy.Tool`s
    (`dspy.ReAct.tools`), by name; empty when none does."""
    for module in reversed(dspy.settings.caller_modules or []):
        tools = getattr(module, "tools", None)
        if (
            isinstance(tools, dict)
            and tools
            and all(isinstance(t, dspy.Tool) for t in tools.values())
        ):
            return {name: tool_schema(tool.args or {}) for name, tool in tools.items()}
    return {}


class ChatAdapter(dspy.ChatAdapter):
    """`dspy.ChatAdapter` whose calls are decoded under the signature's field format.
    `max_string_length` caps JSON strings in structured fields and tool arguments."""

    def __init__(self, *args: Any, max_string_length: int | None = 32, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_string_length = max_string_length

    def field_format(self, signature: type[dspy.Signature]) -> FieldFormat | None:
        return field_format(signature, tools_in_scope(), self.max_string_length)

    def __call__(self, lm, lm_kwargs, signature, demos, inputs):
        fmt = self.field_format(signature)
        if fmt is None:
            return super().__call__(lm, lm_kwargs, signature, demos, inputs)
        with constrained(fmt):
            return super().__call__(lm, lm_kwargs, signature, demos, inputs)

    async def acall(self, lm, lm_kwargs, signature, demos, inputs):
        fmt = self.field_format(signature)
        if fmt is None:
            return await super().acall(lm, lm_kwargs, signature, demos, inputs)
        with constrained(fmt):
            return await super().acall(lm, lm_kwargs, signature, demos, inputs)
