"""Per-request sampling parameters: SGLang's field names and defaults, validated on construction."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import regex

from .errors import InvalidRequestError

GREEDY_TEMPERATURE = 1e-5
MAX_N = 128
"""The most samples one request may ask for (OpenAI's cap on `n`)."""
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1
_CONSTRAINTS = ("regex", "json_schema", "ebnf", "choices")


def _field(name: str) -> str:
    return f"sampling_params.{name}"


def _fail(name: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"invalid sampling parameter '{name}': {message}", _field(name))


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(name, f"expected an integer, got {type(value).__name__}")
    return value


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(name, f"expected a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise _fail(name, f"expected a finite number, got {value}")
    return float(value)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(name, f"expected a boolean, got {type(value).__name__}")
    return value


def _check_optional_str(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _fail(name, f"expected a string, got {type(value).__name__}")
    return value


def _check_stop_regex(patterns: tuple[str, ...]) -> None:
    for pattern in patterns:
        if not pattern:
            raise _fail("stop_regex", "stop regexes must not be empty")
        try:
            regex.compile(pattern)
        except regex.error as exc:
            raise _fail("stop_regex", f"invalid regex {pattern!r}: {exc}") from exc


def _check_unicode(name: str, value: Any) -> None:
    """Strings must be valid Unicode (a lone surrogate cannot be tokenised or compiled)."""
    texts = [value] if isinstance(value, str) else value if isinstance(value, tuple) else ()
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _fail(name, f"not valid Unicode text ({exc.reason})") from None


def _check_range(name: str, value: float, lo: float, hi: float, lo_open: bool = False) -> None:
    if value < lo or value > hi or (lo_open and value == lo):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise _fail(name, f"must be in {interval}, got {value}")


def _as_str_tuple(name: str, value: Any, allow_single: bool) -> tuple[str, ...]:
    if allow_single and isinstance(value, str):
        value = (value,)
    if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
        raise _fail(name, f"expected a list of strings, got {type(value).__name__}")
    if not all(isinstance(item, str) for item in value):
        raise _fail(name, "expected a list of strings")
    return tuple(value)


def _as_int_tuple(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, list | tuple | set | frozenset):
        raise _fail(name, f"expected a list of integers, got {type(value).__name__}")
    items = tuple(value)
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in items):
        raise _fail(name, "expected a list of non-negative integers")
    return items


def _canonical_json_schema(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, Mapping | bool):
        try:
            return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise _fail("json_schema", f"not JSON-serialisable: {exc}") from None
    if not isinstance(value, str):
        raise _fail("json_schema", f"expected a JSON object or string, got {type(value).__name__}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise _fail("json_schema", f"not valid JSON: {exc}") from None
    if not isinstance(parsed, dict | bool):
        raise _fail("json_schema", "a JSON schema must be an object or a boolean")
    return value


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request's continuation (SGLang's names, defaults and ranges).

    Construction normalises container fields (`stop` may be a str or a list, `json_schema` a
    dict) and validates every field, raising `InvalidRequestError` naming the field.
    `temperature < 1e-5` or `top_k == 1` means greedy decoding.
    """

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    stop_regex: tuple[str, ...] = ()
    ignore_eos: bool = False
    no_stop_trim: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    seed: int | None = None
    n: int = 1
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    choices: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "stop", _as_str_tuple("stop", self.stop, allow_single=True))
        if any(s == "" for s in self.stop):
            raise _fail("stop", "stop strings must not be empty")
        set_(self, "stop_token_ids", _as_int_tuple("stop_token_ids", self.stop_token_ids))
        set_(self, "stop_regex", _as_str_tuple("stop_regex", self.stop_regex, allow_single=True))
        _check_stop_regex(self.stop_regex)
        set_(self, "json_schema", _canonical_json_schema(self.json_schema))
        if self.choices is not None:
            set_(self, "choices", _as_str_tuple("choices", self.choices, allow_single=False))
            if not self.choices:
                raise _fail("choices", "needs at least one choice")
        for name in ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty"):
            set_(self, name, _check_float(name, getattr(self, name)))
        set_(
            self, "repetition_penalty", _check_float("repetition_penalty", self.repetition_penalty)
        )
        self._validate_ints()
        self._validate_ranges()
        for name in ("ignore_eos", "no_stop_trim", "skip_special_tokens"):
            _check_bool(name, getattr(self, name))
        _check_bool("spaces_between_special_tokens", self.spaces_between_special_tokens)
        _check_optional_str("regex", self.regex)
        _check_optional_str("ebnf", self.ebnf)
        for name in ("stop", "stop_regex", "choices", "regex", "ebnf", "json_schema"):
            _check_unicode(name, getattr(self, name))
        given = [name for name in _CONSTRAINTS if getattr(self, name) is not None]
        if len(given) > 1:
            raise InvalidRequestError(
                f"only one of regex, json_schema, ebnf, choices may be given, got {given}",
                "sampling_params",
            )

    def _validate_ints(self) -> None:
        for name in ("max_new_tokens", "min_new_tokens", "top_k", "n"):
            _check_int(name, getattr(self, name))
        if self.max_new_tokens < 0:
            raise _fail("max_new_tokens", f"must be >= 0, got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            raise _fail("min_new_tokens", f"must be >= 0, got {self.min_new_tokens}")
        if self.min_new_tokens > self.max_new_tokens:
            raise _fail(
                "min_new_tokens",
                f"must be <= max_new_tokens ({self.max_new_tokens}), got {self.min_new_tokens}",
            )
        if self.top_k == 0 or self.top_k < -1:
            raise _fail("top_k", f"must be -1 (disabled) or >= 1, got {self.top_k}")
        if not 1 <= self.n <= MAX_N:
            raise _fail("n", f"must be in [1, {MAX_N}], got {self.n}")
        if self.seed is not None:
            _check_int("seed", self.seed)
            if not _SEED_MIN <= self.seed <= _SEED_MAX:
                raise _fail("seed", "must fit in 64 bits")

    def _validate_ranges(self) -> None:
        if self.temperature < 0:
            raise _fail("temperature", f"must be >= 0, got {self.temperature}")
        _check_range("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _check_range("min_p", self.min_p, 0.0, 1.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("repetition_penalty", self.repetition_penalty, 0.0, 2.0, lo_open=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> SamplingParams:
        """Build from a JSON-like mapping (an SGLang `sampling_params` object).

        A key whose value is None takes the default. Unknown keys and invalid values raise
        `InvalidRequestError` naming the field.
        """
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise InvalidRequestError(
                f"sampling_params must be an object, got {type(d).__name__}", "sampling_params"
            )
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise InvalidRequestError(f"unknown sampling parameter '{key}'", _field(str(key)))
        return cls(**{k: v for k, v in d.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that `from_dict` turns back into an equal `SamplingParams`."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (
            self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    @property
    def constraint(self) -> tuple[str, str | tuple[str, ...]] | None:
        """The single structured-output constraint as (kind, spec), or None."""
        for name in _CONSTRAINTS:
            value = getattr(self, name)
            if value is not None:
                return name, value
        return None

    def validate_vocab(self, vocab_size: int) -> None:
        """Raise `InvalidRequestError` if a stop token id is outside [0, vocab_size)."""
        bad = [i for i in self.stop_token_ids if not 0 <= i < vocab_size]
        if bad:
            raise _fail("stop_token_ids", f"ids {bad} are outside the vocabulary [0, {vocab_size})")
