"""Pure translation between DSPy-side requests and `sgl_engine` calls, shared by both paths.

Nothing here reads DSPy's types: the 3.4 engine contract (`engine.py`) and the 3.3 `BaseLM` path
(`legacy_lm.py`) both reduce a call to chat messages plus OpenAI-style options, then to one
SGLang sampling-params dict and a logprobs request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sgl_adapters.dspy.chat_adapter import constraint_params
from sgl_adapters.json_schema import cap_strings

SUPPORTED_PARAMS = frozenset(
    {
        "temperature",
        "max_tokens",
        "max_completion_tokens",
        "top_p",
        "top_k",
        "stop",
        "seed",
        "n",
        "logprobs",
        "top_logprobs",
        "frequency_penalty",
        "presence_penalty",
        "response_format",
        "stream",
    }
)
"""The OpenAI-style options both paths honour; DSPy's adapters read this as a capability."""

SGLANG_KEYS = frozenset(
    {
        "top_k",
        "min_p",
        "repetition_penalty",
        "min_new_tokens",
        "stop_token_ids",
        "ignore_eos",
        "regex",
        "ebnf",
        "choices",
        "json_schema",
        "no_stop_trim",
    }
)
"""SGLang sampling keys passed through verbatim (3.4: `Config.extensions`; 3.3: call kwargs)."""

_CONSTRAINT_KEYS = frozenset({"regex", "json_schema", "ebnf", "choices"})
_DIRECT = ("temperature", "top_p", "top_k", "seed", "frequency_penalty", "presence_penalty")


def engine_kwargs_or_default(engine_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The engine options of a DSPy-facing engine: as given, else the CPU."""
    return dict({"device": "cpu"} if engine_kwargs is None else engine_kwargs)


@dataclass(frozen=True)
class GenerationDefaults:
    """Settings of one DSPy-facing engine: the default output budget, and an opt-in cap
    (characters) on free JSON strings so small models close their strings within budget."""

    max_tokens: int = 512
    max_string_length: int | None = None


@dataclass(frozen=True)
class EngineCall:
    """One engine submission: the rendered prompt, SGLang sampling params, and how many top
    alternatives to return per output token (None: no logprobs at all)."""

    prompt: str | None
    params: dict[str, Any]
    logprobs: int | None = None
    messages: tuple[Mapping[str, Any], ...] | None = None
    """The chat itself, for backends that apply their own template (`prompt` is then None)."""
    family: Any = None
    """The model's `sgl_engine.families.ModelFamily` (reads tool calls and reasoning back)."""
    decoding: Any = None
    """Its `sgl_engine.families.decoding.Decoding` (what the answer holds)."""

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"sampling_params": dict(self.params)}
        if self.logprobs is not None:
            kwargs.update(return_logprob=True, top_logprobs_num=self.logprobs)
        return kwargs


def response_format_schema(fmt: Any) -> dict | bool | None:
    """The JSON schema to decode under for an OpenAI/lm15/pydantic `response_format`."""
    if fmt is None:
        return None
    if isinstance(fmt, type) and hasattr(fmt, "model_json_schema"):
        return fmt.model_json_schema()
    if not isinstance(fmt, Mapping):
        raise ValueError(f"response_format must be a mapping or a pydantic model, got {fmt!r}")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        if "schema" in fmt:
            return fmt["schema"]
        inner = fmt.get("json_schema") or {}
        if "schema" in inner:
            return inner["schema"]
        return {"type": "object"}
    raise ValueError(f"unsupported response_format type {kind!r}")


def options_to_params(
    options: Mapping[str, Any], defaults: GenerationDefaults
) -> tuple[dict, int | None]:
    """SGLang sampling params and the logprobs request from OpenAI-style `options`
    (max_tokens, temperature, top_p, stop, n, response_format, logprobs/top_logprobs, ...)."""
    params: dict[str, Any] = {}
    budget = options.get("max_tokens") or options.get("max_completion_tokens")
    params["max_new_tokens"] = int(budget) if budget else defaults.max_tokens
    for key in _DIRECT:
        if options.get(key) is not None:
            params[key] = options[key]
    stop = options.get("stop")
    if stop:
        params["stop"] = [stop] if isinstance(stop, str) else list(stop)
    n = options.get("n")
    if n is not None and n != 1:
        params["n"] = int(n)
    for key in SGLANG_KEYS & set(options):
        if options[key] is not None:
            params[key] = options[key]
    schema = response_format_schema(options.get("response_format"))
    if schema is not None and "json_schema" not in params:
        params["json_schema"] = cap_strings(schema, defaults.max_string_length)
    if not _CONSTRAINT_KEYS & set(params):
        params.update(constraint_params(params["max_new_tokens"]))
    logprobs = None
    if options.get("logprobs"):
        logprobs = int(options.get("top_logprobs") or 0)
    return params, logprobs


def usage_counts(results: list[dict]) -> dict[str, int]:
    """Prompt/completion/cached token counts of one call's results (n choices count their
    shared prompt once, as OpenAI does)."""
    first = results[0]["meta_info"]
    completion = sum(r["meta_info"]["completion_tokens"] for r in results)
    return {
        "prompt_tokens": first["prompt_tokens"],
        "completion_tokens": completion,
        "total_tokens": first["prompt_tokens"] + completion,
        "cached_tokens": max(r["meta_info"].get("cached_tokens", 0) for r in results),
    }


class EngineAbort(RuntimeError):
    """The engine aborted a request (its message says why)."""


def finish_reason(meta: Mapping[str, Any]) -> str:
    """'stop' or 'length'; an aborted request raises `EngineAbort`."""
    reason = meta.get("finish_reason") or {}
    kind = reason.get("type")
    if kind == "abort":
        raise EngineAbort(reason.get("message") or "the engine aborted the request")
    return "length" if kind == "length" else "stop"


def token_logprobs(result: Mapping[str, Any], tokenizer: Any) -> list[dict[str, Any]]:
    """OpenAI-shaped `logprobs.content` entries for a result generated with return_logprob."""
    meta = result["meta_info"]
    chosen = meta.get("output_token_logprobs") or []
    tops = meta.get("output_top_logprobs") or [None] * len(chosen)
    out = []
    for (lp, tid, _), top in zip(chosen, tops, strict=False):
        alternatives = [
            {"token": tokenizer.decode([t]), "logprob": float(tlp), "token_id": t}
            for tlp, t, _ in (top or [])
        ]
        out.append(
            {
                "token": tokenizer.decode([tid]),
                "logprob": float(lp),
                "token_id": tid,
                "top_logprobs": alternatives,
            }
        )
    return out


def chat_messages(messages: list[Mapping[str, Any]]) -> list[dict[str, str]]:
    """OpenAI-style chat messages as plain {role, content: str} for the chat template; text
    content parts are joined, any other part is refused (ValueError)."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not (isinstance(part, Mapping) and part.get("type") == "text"):
                    raise ValueError(f"only text content is supported, got {part!r}")
                texts.append(part.get("text", ""))
            content = "".join(texts)
        out.append({"role": message["role"], "content": content or ""})
    return out
