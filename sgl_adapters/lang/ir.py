"""The expressions of an SGLang program: text, generation calls, selections, roles, scopes.

Expressions are immutable values; `s += expr` hands one to the program's executor, which
interprets it against a backend. `a + b` concatenates expressions into an `ExprList`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sgl_adapters.lang.choices import ChoicesSamplingMethod

REGEX_INT = r"[-+]?[0-9]+[ \n]*"
REGEX_FLOAT = r"[-+]?[0-9]*\.?[0-9]+[ \n]*"
REGEX_BOOL = r"(True|False)"
REGEX_STR = r"\"[\w\d\s]*\""

_DTYPE_REGEX = {"int": REGEX_INT, "float": REGEX_FLOAT, "bool": REGEX_BOOL, "str": REGEX_STR}
_PARAM_NAMES = (
    "max_new_tokens",
    "min_new_tokens",
    "n",
    "stop",
    "stop_token_ids",
    "stop_regex",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "ignore_eos",
    "seed",
    "skip_special_tokens",
    "spaces_between_special_tokens",
)


@dataclass(frozen=True)
class GenParams:
    """Sampling options of one `gen` (None: take the program's default, then the backend's).

    `dtype` is one of int, float, str, bool (the types or their names) and becomes a regex
    plus number-ending stops, as SGLang does; at most one of regex/json_schema/dtype is set.
    """

    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    n: int | None = None
    stop: str | tuple[str, ...] | None = None
    stop_token_ids: tuple[int, ...] | None = None
    stop_regex: str | tuple[str, ...] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    seed: int | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    return_logprob: bool | None = None
    logprob_start_len: int | None = None
    top_logprobs_num: int | None = None
    return_text_in_logprobs: bool | None = None
    dtype: str | None = None
    regex: str | None = None
    json_schema: str | Mapping[str, Any] | None = None

    def merged_over(self, defaults: GenParams) -> GenParams:
        """A copy where every unset field takes the value of `defaults`."""
        changes = {
            f.name: getattr(defaults, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is None
        }
        return dataclasses.replace(self, **changes)

    def sampling_params(self) -> dict[str, Any]:
        """SGLang `sampling_params` (set fields only; dtype turned into regex and stops)."""
        params = {k: getattr(self, k) for k in _PARAM_NAMES if getattr(self, k) is not None}
        if isinstance(params.get("stop"), tuple):
            params["stop"] = list(params["stop"])
        for key in ("stop_token_ids", "stop_regex"):
            if isinstance(params.get(key), tuple):
                params[key] = list(params[key])
        if self.dtype is not None:
            params["regex"] = _DTYPE_REGEX[self.dtype]
            if self.dtype in ("int", "float"):
                stop = params.get("stop") or []
                params["stop"] = [*([stop] if isinstance(stop, str) else stop), " ", "\n"]
        elif self.regex is not None:
            params["regex"] = self.regex
        elif self.json_schema is not None:
            params["json_schema"] = self.json_schema
        return params

    def logprob_options(self) -> dict[str, Any]:
        """The request-level logprob fields of SGLang's /generate that are set."""
        out: dict[str, Any] = {}
        if self.return_logprob:
            out["return_logprob"] = True
            if self.logprob_start_len is not None:
                out["logprob_start_len"] = self.logprob_start_len
            if self.top_logprobs_num is not None:
                out["top_logprobs_num"] = self.top_logprobs_num
            if self.return_text_in_logprobs:
                out["return_text_in_logprobs"] = True
        return out


def normalize_dtype(dtype: type | str | None) -> str | None:
    if dtype is None:
        return None
    name = dtype.__name__ if isinstance(dtype, type) else str(dtype)
    if name not in _DTYPE_REGEX:
        raise ValueError(f"invalid dtype {dtype!r}: use int, float, str or bool")
    return name


def as_str_tuple(value: str | Sequence[str] | None) -> str | tuple[str, ...] | None:
    """None, one string, or a tuple of them (empty: None)."""
    if value is None or isinstance(value, str):
        return value or None
    return tuple(value) or None


def check_regex(regex: str | None) -> None:
    if regex is None:
        return
    try:
        re.compile(regex)
    except re.error as exc:
        raise ValueError(f"invalid regex {regex!r}: {exc}") from exc


class Expr:
    """Base of all expressions; `+` builds an `ExprList`, strings become `Text`."""

    def __add__(self, other: Expr | str) -> ExprList:
        return ExprList([*_flat(self), *_flat(as_expr(other))])

    def __radd__(self, other: Expr | str) -> ExprList:
        return ExprList([*_flat(as_expr(other)), *_flat(self)])


def as_expr(value: Any) -> Expr:
    if isinstance(value, Expr):
        return value
    if isinstance(value, str):
        return Text(value)
    raise TypeError(f"cannot add {type(value).__name__} to a program; use str or an expression")


def _flat(expr: Expr) -> list[Expr]:
    return list(expr.items) if isinstance(expr, ExprList) else [expr]


@dataclass(frozen=True, eq=False)
class ExprList(Expr):
    items: Sequence[Expr] = ()


@dataclass(frozen=True, eq=False)
class Text(Expr):
    value: str = ""


@dataclass(frozen=True, eq=False)
class Gen(Expr):
    """Generate into variable `name` (None: anonymous, text only)."""

    name: str | None = None
    params: GenParams = field(default_factory=GenParams)


@dataclass(frozen=True, eq=False)
class SeparateReasoning(Expr):
    """Split the variable `name` (just generated) into its answer and `<name>_reasoning_content`
    with the reasoning markers of `model_type` (a model family name; None: `<think>`)."""

    name: str | None = None
    model_type: str | None = None


@dataclass(frozen=True, eq=False)
class Select(Expr):
    """Pick one of `choices` by prompt likelihood with `method`; stored under `name`."""

    name: str | None
    choices: tuple[str, ...]
    temperature: float
    method: ChoicesSamplingMethod


@dataclass(frozen=True, eq=False)
class RoleBegin(Expr):
    role: str


@dataclass(frozen=True, eq=False)
class RoleEnd(Expr):
    role: str


@dataclass(frozen=True, eq=False)
class VarScopeBegin(Expr):
    name: str


@dataclass(frozen=True, eq=False)
class VarScopeEnd(Expr):
    name: str


@dataclass(frozen=True, eq=False)
class CommitPrefix(Expr):
    """Send the text so far to the backend (prefill only) so forks reuse its cache."""


@dataclass(frozen=True, eq=False)
class ConcatAndAppend(Expr):
    """Append the text each fork added since it was forked (join mode concate_and_append)."""

    states: tuple[Any, ...] = ()


def variable_names(expr: Expr) -> list[str]:
    """Names of the variables `expr` defines (gen, select, var scopes), in order."""
    if isinstance(expr, ExprList):
        return [n for item in expr.items for n in variable_names(item)]
    if isinstance(expr, (Gen, Select)) and expr.name is not None:
        return [expr.name]
    if isinstance(expr, VarScopeBegin):
        return [expr.name]
    if isinstance(expr, SeparateReasoning) and expr.name is not None:
        return [f"{expr.name}_reasoning_content"]
    return []
