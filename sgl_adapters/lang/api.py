"""The public functions of the language: `function`, `gen`, `select`, roles, backends.

`set_default_backend` writes the one process-wide setting (as in SGLang):
`global_config.default_backend`, read by `run`, `run_batch` and `trace` when no backend is
passed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sgl_adapters.lang import ir
from sgl_adapters.lang.choices import ChoicesSamplingMethod, token_length_normalized
from sgl_adapters.lang.function import SglFunction
from sgl_adapters.lang.global_config import global_config


def set_default_backend(backend: Any) -> None:
    """Use `backend` for programs run without `backend=` (`global_config.default_backend`)."""
    global_config.default_backend = backend


def get_default_backend() -> Any:
    return global_config.default_backend


def _backend_or_default(backend: Any) -> Any:
    backend = backend or global_config.default_backend
    return getattr(backend, "endpoint", backend)


def flush_cache(backend: Any = None, empty_cache: bool = True) -> bool:
    """Drop the backend's prefix cache; False when there is no backend or it refused.
    `empty_cache` (SGLang: also release cached GPU memory) is accepted; the engine keeps its
    KV pool allocated either way."""
    backend = _backend_or_default(backend)
    return False if backend is None else bool(backend.flush_cache())


def get_server_info(backend: Any = None) -> dict[str, Any] | None:
    """The backend's server information (SGLang's /get_server_info shape); None without a
    backend."""
    backend = _backend_or_default(backend)
    return None if backend is None else backend.get_server_info()


def function(func: Callable[..., Any] | None = None, num_api_spec_tokens: int | None = None) -> Any:
    """Decorator: `@sgl.function` or `@sgl.function(...)` makes an `SglFunction`.
    `num_api_spec_tokens` (SGLang's speculative execution for paid chat APIs) is accepted and
    has no effect: every `gen` here is its own call that extends the cached prefix."""
    if func is not None:
        return SglFunction(func)
    return SglFunction


def Engine(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 -- SGLang's name
    """SGLang's offline engine: here `sgl_engine.Engine` (same generate/async_generate shape)."""
    from sgl_engine import Engine as _Engine

    return _Engine(*args, **kwargs)


def gen(
    name: str | None = None,
    max_tokens: int | None = None,
    min_tokens: int | None = None,
    n: int | None = None,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    stop_regex: str | Sequence[str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    return_logprob: bool | None = None,
    logprob_start_len: int | None = None,
    top_logprobs_num: int | None = None,
    return_text_in_logprobs: bool | None = None,
    dtype: type | str | None = None,
    choices: Sequence[str] | None = None,
    choices_method: ChoicesSamplingMethod | None = None,
    regex: str | None = None,
    json_schema: str | Mapping[str, Any] | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
) -> ir.Expr:
    """Generate into variable `name`. With `choices` this is `select`. At most one of
    `dtype`, `regex` and `json_schema`; a bad argument raises ValueError here."""
    if choices:
        return select(
            name,
            choices,
            0.0 if temperature is None else temperature,
            choices_method or token_length_normalized,
        )
    ir.check_regex(regex)
    stop_regex = ir.as_str_tuple(stop_regex)
    for pattern in (stop_regex,) if isinstance(stop_regex, str) else stop_regex or ():
        ir.check_regex(pattern)
    given = [
        k
        for k, v in (("dtype", dtype), ("regex", regex), ("json_schema", json_schema))
        if v is not None
    ]
    if len(given) > 1:
        raise ValueError(f"gen takes at most one of dtype, regex, json_schema; got {given}")
    if n is not None and n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    params = ir.GenParams(
        max_new_tokens=max_tokens,
        min_new_tokens=min_tokens,
        n=n,
        stop=stop if stop is None or isinstance(stop, str) else tuple(stop),
        stop_token_ids=None if stop_token_ids is None else tuple(stop_token_ids),
        stop_regex=stop_regex,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        repetition_penalty=repetition_penalty,
        ignore_eos=ignore_eos,
        seed=seed,
        return_logprob=return_logprob,
        logprob_start_len=logprob_start_len,
        top_logprobs_num=top_logprobs_num,
        return_text_in_logprobs=return_text_in_logprobs,
        dtype=ir.normalize_dtype(dtype),
        regex=regex,
        json_schema=json_schema,
    )
    return ir.Gen(name, params)


def separate_reasoning(expr: Any = None, model_type: str | None = None) -> ir.Expr:
    """As SGLang's `sgl.separate_reasoning(sgl.gen("x"), model_type="qwen3")`: after `expr`
    runs, `s["x"]` holds the answer and `s["x_reasoning_content"]` the reasoning (the
    program text keeps both). `model_type` names a model family (e.g. "qwen3",
    "deepseek-r1"); its reasoning markers are used (`<think>...</think>` by default)."""
    inner = ir.as_expr(expr) if expr is not None else ir.ExprList()
    name = getattr(inner, "name", None)
    return ir.ExprList([inner, ir.SeparateReasoning(name, model_type)])


def gen_int(
    name: str | None = None,
    max_tokens: int | None = None,
    n: int | None = None,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    stop_regex: str | Sequence[str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    return_logprob: bool | None = None,
    logprob_start_len: int | None = None,
    top_logprobs_num: int | None = None,
    return_text_in_logprobs: bool | None = None,
    **kwargs: Any,
) -> ir.Expr:
    """`gen` of an integer (regex-constrained; the value is the digits as a string). SGLang's
    positional order; other `gen` keywords (e.g. `min_tokens`) pass through."""
    args = dict(locals())
    return gen(args.pop("name"), dtype=int, **args.pop("kwargs"), **args)


def gen_string(
    name: str | None = None,
    max_tokens: int | None = None,
    n: int | None = None,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    stop_regex: str | Sequence[str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    return_logprob: bool | None = None,
    logprob_start_len: int | None = None,
    top_logprobs_num: int | None = None,
    return_text_in_logprobs: bool | None = None,
    **kwargs: Any,
) -> ir.Expr:
    """`gen` of a double-quoted string (SGLang's positional order, like `gen_int`)."""
    args = dict(locals())
    return gen(args.pop("name"), dtype=str, **args.pop("kwargs"), **args)


def select(
    name: str | None = None,
    choices: Sequence[str] | None = None,
    temperature: float = 0.0,
    choices_method: ChoicesSamplingMethod = token_length_normalized,
) -> ir.Expr:
    """Append the most likely of `choices` (scored by `choices_method`) and store it."""
    if not choices:
        raise ValueError("select needs a non-empty list of choices")
    if any(not isinstance(c, str) for c in choices):
        raise ValueError("select choices must be strings")
    return ir.Select(name, tuple(choices), temperature, choices_method)


def _role(role: str, expr: Any = None) -> ir.Expr:
    items = [ir.RoleBegin(role)] + ([] if expr is None else [ir.as_expr(expr)])
    return ir.ExprList([*items, ir.RoleEnd(role)])


def system(expr: Any = None) -> ir.Expr:
    return _role("system", expr)


def user(expr: Any = None) -> ir.Expr:
    return _role("user", expr)


def assistant(expr: Any = None) -> ir.Expr:
    return _role("assistant", expr)


def system_begin() -> ir.Expr:
    return ir.RoleBegin("system")


def system_end() -> ir.Expr:
    return ir.RoleEnd("system")


def user_begin() -> ir.Expr:
    return ir.RoleBegin("user")


def user_end() -> ir.Expr:
    return ir.RoleEnd("user")


def assistant_begin() -> ir.Expr:
    return ir.RoleBegin("assistant")


def assistant_end() -> ir.Expr:
    return ir.RoleEnd("assistant")
