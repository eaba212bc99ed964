"""A request's output constraint, normalised to a hashable value (the compile cache key)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sgl_engine.errors import InvalidRequestError

ConstraintKind = Literal["regex", "json_schema", "ebnf", "choices"]
KINDS: tuple[ConstraintKind, ...] = ("regex", "json_schema", "ebnf", "choices")

ANY_JSON_OBJECT = '{"type":"object"}'


class GrammarError(InvalidRequestError):
    """A constraint that cannot be compiled (invalid regex, schema or EBNF); `field` is its kind."""


@dataclass(frozen=True)
class Constraint:
    """One output constraint. `value`: the regex or EBNF text, the JSON schema as compact JSON
    text (key order kept: it fixes the order of properties in the output), or the choices as a
    JSON list of strings."""

    kind: ConstraintKind
    value: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequestError(f"unknown constraint kind {self.kind!r}", field="constraint")
        if not isinstance(self.value, str):
            raise InvalidRequestError(f"{self.kind} must be a string", field=self.kind)

    @classmethod
    def from_request(
        cls,
        *,
        regex: str | None = None,
        json_schema: Any = None,
        ebnf: str | None = None,
        choices: Sequence[str] | None = None,
        response_format: Any = None,
    ) -> Constraint | None:
        """The request's constraint, or None. At most one field may be set (a `response_format`
        of type "text" counts as unset); two raise InvalidRequestError naming both."""
        given: list[tuple[str, Constraint]] = []
        if regex is not None:
            given.append(("regex", cls("regex", _text(regex, "regex"))))
        if json_schema is not None:
            given.append(("json_schema", cls("json_schema", schema_text(json_schema))))
        if ebnf is not None:
            given.append(("ebnf", cls("ebnf", _text(ebnf, "ebnf"))))
        if choices is not None:
            given.append(("choices", cls("choices", _choices_text(choices))))
        if response_format is not None:
            rf = _from_response_format(response_format)
            if rf is not None:
                given.append(("response_format", rf))
        if len(given) > 1:
            names = ", ".join(name for name, _ in given)
            raise InvalidRequestError(
                f"at most one constraint per request; got {names}", field=given[1][0]
            )
        return given[0][1] if given else None

    def choice_list(self) -> list[str]:
        """The choices of a `choices` constraint."""
        return json.loads(self.value)


def schema_text(schema: Any, field: str = "json_schema") -> str:
    """A JSON schema given as dict, JSON text or pydantic model class, as compact JSON text."""
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        schema = schema.model_json_schema()
    elif isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise GrammarError(f"{field} is not valid JSON: {e}", field=field) from None
    if not isinstance(schema, Mapping):
        raise GrammarError(
            f"{field} must be a JSON object (dict, JSON text or pydantic model class), "
            f"got {type(schema).__name__}",
            field=field,
        )
    try:
        return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise GrammarError(f"{field} is not JSON-serialisable: {e}", field=field) from None


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(f"{field} must be a string", field=field)
    return value


def _choices_text(choices: Any) -> str:
    if isinstance(choices, str) or not isinstance(choices, Sequence):
        raise InvalidRequestError("choices must be a list of strings", field="choices")
    if not choices:
        raise InvalidRequestError("choices must not be empty", field="choices")
    if not all(isinstance(c, str) for c in choices):
        raise InvalidRequestError("choices must be a list of strings", field="choices")
    return json.dumps(list(choices), ensure_ascii=False)


def _from_response_format(response_format: Any) -> Constraint | None:
    """OpenAI's response_format: text -> None, json_object -> any JSON object, json_schema."""
    if hasattr(response_format, "model_dump"):
        response_format = response_format.model_dump(by_alias=True, exclude_none=True)
    if not isinstance(response_format, Mapping):
        raise InvalidRequestError("response_format must be an object", field="response_format")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_schema", ANY_JSON_OBJECT)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        field = "response_format.json_schema.schema"
        if not isinstance(spec, Mapping) or spec.get("schema") is None:
            raise InvalidRequestError(
                "response_format of type json_schema needs json_schema.schema", field=field
            )
        return Constraint("json_schema", schema_text(spec["schema"], field=field))
    raise InvalidRequestError(
        f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
        field="response_format.type",
    )
