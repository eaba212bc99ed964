"""`ChatAdapter` whose completions are decoded under a regex of DSPy's field-marker format.

DSPy's ChatAdapter asks for `[[ ## field ## ]]` sections and parses them back; small models
miss the markers (`[[## answer ## ]]`). This adapter computes a regex of the exact format from
the signature and hands it to the engine for the calls it makes, through a context variable
(one per thread / task, so concurrent `module.batch` calls never see each other's): both the
3.4 engine and the 3.3 LM read it in `constraint_params()`.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import dspy

_CONSTRAINT: ContextVar[dict[str, Any] | None] = ContextVar("sgl_dspy_constraint", default=None)
_SPECIAL = set("\\.^$*+?{}[]|()")
_TEXT = r"[^\[\s][^\[]*"
_SCALARS = {
    int: r"-?[0-9]{1,9}",
    float: r"-?[0-9]{1,9}(\.[0-9]{1,6})?",
    bool: r"(True|False)",
}


@contextmanager
def constrained(**params: Any) -> Iterator[None]:
    """Engine calls made inside (this thread / task) decode under `params` (SGLang constraint
    keys: regex, ebnf, json_schema, choices) unless the call brings a constraint of its own."""
    token = _CONSTRAINT.set(dict(params))
    try:
        yield
    finally:
        _CONSTRAINT.reset(token)


def constraint_params() -> dict[str, Any]:
    """The constraint set by the innermost `constrained(...)` around this call, if any."""
    return dict(_CONSTRAINT.get() or {})


def _escape(text: str) -> str:
    return "".join("\\" + c if c in _SPECIAL else c for c in text)


def value_regex(annotation: Any) -> str | None:
    """A regex for one field value as ChatAdapter writes it; None for types left free."""
    if annotation is str:
        return _TEXT
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    if typing.get_origin(annotation) is typing.Literal:
        options = typing.get_args(annotation)
        if all(isinstance(o, str) for o in options):
            return "(" + "|".join(_escape(o) for o in options) + ")"
    return None


def field_format_regex(signature: type[dspy.Signature]) -> str | None:
    """The regex of a whole ChatAdapter completion for `signature`, or None when an output
    field has a type this regex does not describe (the call then runs unconstrained)."""
    parts = []
    for name, field in signature.output_fields.items():
        value = value_regex(field.annotation)
        if value is None:
            return None
        parts.append(rf"\[\[ ## {_escape(name)} ## \]\]\n{value}\n\n")
    return "".join(parts) + r"\[\[ ## completed ## \]\]"


class ChatAdapter(dspy.ChatAdapter):
    """`dspy.ChatAdapter` whose calls are decoded under `field_format_regex(signature)`."""

    def __call__(self, lm, lm_kwargs, signature, demos, inputs):
        regex = field_format_regex(signature)
        if regex is None:
            return super().__call__(lm, lm_kwargs, signature, demos, inputs)
        with constrained(regex=regex):
            return super().__call__(lm, lm_kwargs, signature, demos, inputs)

    async def acall(self, lm, lm_kwargs, signature, demos, inputs):
        regex = field_format_regex(signature)
        if regex is None:
            return await super().acall(lm, lm_kwargs, signature, demos, inputs)
        with constrained(regex=regex):
            return await super().acall(lm, lm_kwargs, signature, demos, inputs)
