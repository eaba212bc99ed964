"""Shared engines and the seam the LangChain classes call through.

`EngineRegistry` loads each (model, engine config) once and hands the same `Engine` to every
chat model or LLM that asks for it, so constructing `ChatSGLang` is cheap after the first.
`EngineClient` is the only place that talks to the engine: switching the adapters to the
CallGraph/plugin backend means replacing this one class.
"""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"


def model_display_name(model: str | None) -> str:
    """The `model_name` reported in response metadata."""
    if model is None:
        return EMBEDDED_MODEL_NAME
    return os.path.basename(os.path.normpath(model)) or model


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


class EngineRegistry:
    """Engines keyed by (model, engine kwargs). `get` creates one under the registry's lock the
    first time a key is asked for; `close` shuts every engine down and forgets it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._engines: dict[Any, Any] = {}

    def get(self, model: str | None, engine_kwargs: Mapping[str, Any] | None = None) -> Any:
        kwargs = dict(engine_kwargs or {})
        key = (model, _freeze(kwargs))
        with self._lock:
            engine = self._engines.get(key)
            if engine is None:
                from sgl_engine import Engine

                engine = Engine(model, **kwargs)
                self._engines[key] = engine
            return engine

    def __len__(self) -> int:
        return len(self._engines)

    def close(self) -> None:
        with self._lock:
            engines, self._engines = list(self._engines.values()), {}
        for engine in engines:
            engine.shutdown()


ENGINES = EngineRegistry()
"""The process-wide registry the LangChain classes use unless given another."""


@dataclass(frozen=True)
class Request:
    """One generation call: a rendered prompt and SGLang sampling params (constraint included)."""

    prompt: str
    params: Mapping[str, Any] = field(default_factory=dict)


class EngineClient:
    """Runs `Request`s on an engine. Thread-safe (the engine is); holds no state of its own."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.engine.apply_chat_template(messages, add_generation_prompt)

    def generate(self, requests: Sequence[Request]) -> list[dict]:
        """All requests in one engine submission (shared prefixes are prefilled once)."""
        if not requests:
            return []
        prompts = [r.prompt for r in requests]
        return self.engine.generate(prompts, [dict(r.params) for r in requests])

    async def agenerate(self, requests: Sequence[Request]) -> list[dict]:
        if not requests:
            return []
        prompts = [r.prompt for r in requests]
        return await self.engine.async_generate(prompts, [dict(r.params) for r in requests])

    def stream(self, request: Request) -> Iterator[dict]:
        return self.engine.generate(request.prompt, dict(request.params), stream=True)

    async def astream(self, request: Request) -> AsyncIterator[dict]:
        chunks = await self.engine.async_generate(request.prompt, dict(request.params), stream=True)
        async for chunk in chunks:
            yield chunk

    def probe(self, input_ids: list[int], start: int, top: int = 10) -> dict:
        """meta_info of scoring `input_ids` from position `start` (prompt logprobs and the top
        `top` alternatives there); generates nothing."""
        return self.engine.generate(**_probe_request(input_ids, start, top))["meta_info"]

    async def aprobe(self, input_ids: list[int], start: int, top: int = 10) -> dict:
        return (await self.engine.async_generate(**_probe_request(input_ids, start, top)))[
            "meta_info"
        ]

    def metrics(self) -> dict:
        return self.engine.metrics()


def _probe_request(input_ids: list[int], start: int, top: int) -> dict:
    return {
        "input_ids": list(input_ids),
        "sampling_params": {"max_new_tokens": 0},
        "return_logprob": True,
        "logprob_start_len": start,
        "top_logprobs_num": top,
    }
