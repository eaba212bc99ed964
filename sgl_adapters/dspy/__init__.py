"""DSPy front door: run DSPy programs on `sgl_engine` or any sgl-adapters backend.

```python
import dspy
from sgl_adapters.dspy import LM

dspy.configure(lm=LM())            # the embedded SmolLM2-135M-Instruct; or LM("/path/to/hf")
```
`LM(...)` returns a `dspy.LM` on our engine contract (`SGLangEngine`) for DSPy 3.4 and newer,
and an `SGLangLM` (`dspy.BaseLM`, forward/aforward) for DSPy 3.3. Structured outputs
(JSONAdapter's `response_format`) are decoded under their schema, so they always parse;
`ChatAdapter` here is DSPy's ChatAdapter with its field-marker format decoded under a grammar (bounded fields, valid tool names and arguments).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dspy

from sgl_adapters.dspy.chat_adapter import ChatAdapter, constrained
from sgl_adapters.dspy.field_grammar import field_format
from sgl_adapters.engines import EngineRegistry, model_display_name


def has_engine_contract() -> bool:
    """Whether the installed DSPy takes custom engines (`dspy.LM(engine=...)`, 3.4+)."""
    try:
        import dspy.clients.engines.base  # noqa: F401
        import dspy.lm15  # noqa: F401
    except ImportError:
        return False
    return True


def LM(  # noqa: N802 - a factory that stands in for a class, like dspy.LM
    model: str | None = None,
    *,
    engine_kwargs: Mapping[str, Any] | None = None,
    max_string_length: int | None = None,
    default_max_tokens: int = 512,
    registry: EngineRegistry | None = None,
    backend: Any = "local",
    backend_kwargs: Mapping[str, Any] | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    **kwargs: Any,
) -> dspy.BaseLM:
    """A DSPy LM on the shared engine of `model` (a local HF folder; None: the embedded
    SmolLM2-135M-Instruct). `engine_kwargs` are `sgl_engine.EngineConfig` fields (default
    `{"device": "cpu"}`); `max_string_length` caps free JSON strings in structured outputs
    (opt-in, for small models); `default_max_tokens` applies when no max_tokens is given;
    other `kwargs` go to `dspy.LM` / `dspy.BaseLM` (temperature, max_tokens, cache, ...).

    `backend` is "local" (the in-process engine), any registered plugin name ("http",
    "openai", a third party's) built with `backend_kwargs` plus `base_url`/`api_key` when
    given, or a `Backend` instance."""
    plugin_kwargs = dict(backend_kwargs or {})
    if base_url is not None:
        plugin_kwargs.setdefault("base_url", base_url)
    if api_key is not None:
        plugin_kwargs.setdefault("api_key", api_key)
    if has_engine_contract():
        from sgl_adapters.dspy.engine import AsyncSGLangEngine, SGLangEngine

        engine = SGLangEngine(
            model,
            engine_kwargs=engine_kwargs,
            default_max_tokens=default_max_tokens,
            max_string_length=max_string_length,
            registry=registry,
            backend=backend,
            backend_kwargs=plugin_kwargs,
        )
        kwargs.setdefault("num_retries", 0)
        return dspy.LM(
            f"sglang/{model_display_name(model)}",
            engine=engine,
            async_engine=AsyncSGLangEngine(engine),
            **kwargs,
        )
    if backend != "local":
        raise NotImplementedError(
            f"backend {backend!r}: DSPy < 3.4 runs on the local backend only (upgrade DSPy)"
        )
    from sgl_adapters.dspy.legacy_lm import SGLangLM

    return SGLangLM(
        model,
        engine_kwargs=engine_kwargs,
        default_max_tokens=default_max_tokens,
        max_string_length=max_string_length,
        registry=registry,
        **kwargs,
    )


__all__ = ["LM", "ChatAdapter", "constrained", "field_format", "has_engine_contract"]
