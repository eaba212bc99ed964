"""Construction-time settings shared by `ChatSGLang` and `SGLang`, and per-call overrides."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from sgl_adapters.engines import (
    ENGINES,
    EngineClient,
    EngineRegistry,
    backend_model_name,
    factory_takes,
    model_display_name,
)

BASE_URL_ENV = "SGL_ADAPTERS_BASE_URL"
API_KEY_ENV = "SGL_ADAPTERS_API_KEY"

PER_CALL_KEYS = {"temperature", "max_tokens", "top_p", "stop", "model"}
SAMPLING_KEYS = {
    "top_k",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "min_new_tokens",
    "seed",
    "stop_token_ids",
    "ignore_eos",
    "regex",
    "json_schema",
    "ebnf",
    "choices",
}


class SGLangParams(BaseModel):
    """Model, backend and sampling settings.

    `backend` is "local" (the in-process engine, default), any registered plugin name
    ("http", "openai", a third party's) or a `Backend` instance. For `local`, `model` is a
    local HF folder (or hub id), None the embedded SmolLM2-135M-Instruct, and `engine_kwargs`
    are `sgl_engine.EngineConfig` fields; the engine of one (model, engine_kwargs) is loaded
    once per registry and shared. For a named plugin, `backend_kwargs` go to its factory, as
    do `base_url`/`api_key` (defaults: $SGL_ADAPTERS_BASE_URL, $SGL_ADAPTERS_API_KEY) and any
    keyword argument that is not a field here; `model` goes too when the factory takes one."""

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    backend: Any = "local"
    backend_kwargs: dict[str, Any] = Field(default_factory=dict)
    base_url: str | None = None
    api_key: SecretStr | None = None
    timeout: float | None = None
    """Seconds per request, for plugin backends that take `timeout` (http, openai)."""
    max_retries: int | None = None
    """Retries, for plugin backends that take `max_retries` (openai); others do not retry."""
    model: str | None = None
    temperature: float = 0.0
    max_tokens: int = 256
    top_p: float = 1.0
    stop: list[str] | None = None
    engine_kwargs: dict[str, Any] = Field(default_factory=lambda: {"device": "cpu"})
    max_string_length: int | None = None
    """Opt-in cap (characters) on free JSON strings in structured output and tool arguments:
    added as `maxLength` where the schema sets none, so small models finish within
    `max_tokens` (the output still validates against the caller's schema)."""
    registry: EngineRegistry = Field(default=ENGINES, exclude=True, repr=False)

    @model_validator(mode="before")
    @classmethod
    def _plugin_kwargs(cls, data: Any) -> Any:
        """For a non-local backend: unknown keywords go to `backend_kwargs`, and `base_url`/
        `api_key` default to their environment variables."""
        if not isinstance(data, dict) or data.get("backend", "local") == "local":
            return data
        data = dict(data)
        extra = {k: data.pop(k) for k in list(data) if k not in cls.model_fields}
        if extra:
            data["backend_kwargs"] = {**extra, **dict(data.get("backend_kwargs") or {})}
        if isinstance(data.get("backend"), str):
            data.setdefault("base_url", os.environ.get(BASE_URL_ENV))
            data.setdefault("api_key", os.environ.get(API_KEY_ENV))
        return data

    @property
    def model_name(self) -> str:
        """The model's name without any I/O: a plugin backend given no `model` is named by
        its backend (responses carry the served model's name, see `served_model_name`)."""
        if self.model is None and self.backend != "local":
            return self.backend if isinstance(self.backend, str) else str(self.backend.name)
        return model_display_name(self.model)

    def served_model_name(self, client: EngineClient, model: str | None) -> str:
        """The name reported in response metadata for a call on `client` with `model`."""
        if model is None and self.backend != "local":
            return backend_model_name(client.backend)
        return model_display_name(model) if model != self.model else self.model_name

    def plugin_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of a named plugin backend's factory."""
        kwargs = dict(self.backend_kwargs)
        if self.base_url is not None:
            kwargs.setdefault("base_url", self.base_url)
        if self.api_key is not None:
            kwargs.setdefault("api_key", self.api_key.get_secret_value())
        optional = {"timeout": self.timeout, "max_retries": self.max_retries}
        for key, value in optional.items():
            if value is not None and key not in kwargs and self._factory_takes(key):
                kwargs[key] = value
        return kwargs

    def _factory_takes(self, key: str) -> bool:
        if not isinstance(self.backend, str):
            return False
        return factory_takes(self.registry.manager, self.backend, key)

    def client(self, model: str | None = None) -> EngineClient:
        """The client of the shared backend (for `local`: of the engine of `model`, default
        this instance's model)."""
        chosen = self.model if model is None else model
        if self.backend == "local":
            return self.registry.client(chosen, self.engine_kwargs)
        return self.registry.client(chosen, None, self.backend, self.plugin_kwargs())

    def sampling_params(self, stop: list[str] | None, kwargs: Mapping[str, Any]) -> dict:
        """SGLang sampling params from the settings, `stop` and per-call `kwargs` (which may
        override temperature, max_tokens, top_p, stop and pass SGLang sampling keys)."""
        unknown = set(kwargs) - PER_CALL_KEYS - SAMPLING_KEYS
        unknown = {k for k in unknown if not k.startswith("ls_")}
        if unknown:
            raise ValueError(f"unsupported call arguments: {sorted(unknown)}")
        stops = stop if stop is not None else kwargs.get("stop", self.stop)
        params: dict[str, Any] = {
            "max_new_tokens": kwargs.get("max_tokens", self.max_tokens),
            "temperature": kwargs.get("temperature", self.temperature),
            "top_p": kwargs.get("top_p", self.top_p),
        }
        if stops:
            params["stop"] = list(stops)
        params.update({k: v for k, v in kwargs.items() if k in SAMPLING_KEYS and v is not None})
        return params


def usage_metadata(meta: Mapping[str, Any]) -> dict:
    """LangChain usage metadata from an engine result's meta_info."""
    prompt, completion = int(meta["prompt_tokens"]), int(meta["completion_tokens"])
    return {
        "input_tokens": prompt,
        "output_tokens": completion,
        "total_tokens": prompt + completion,
        "input_token_details": {"cache_read": int(meta.get("cached_tokens", 0))},
    }


def finish_reason(meta: Mapping[str, Any]) -> str:
    """The finish reason type; an aborted request raises with the engine's message."""
    reason = meta.get("finish_reason") or {}
    kind = reason.get("type", "stop")
    if kind == "abort":
        raise RuntimeError(f"generation aborted: {reason.get('message', 'no reason given')}")
    return kind
