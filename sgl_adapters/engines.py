"""Shared engines and the seam the front doors (LangChain, DSPy) call through.

Engines come from the plugin layer's `local` backend (`sgl_plugins`), whose `EnginePool` keys
engines by (model path, engine config): every front door that goes through the same plugin
manager (by default the per-process one) shares one engine per model, so weights load once
per process and constructing `ChatSGLang` is cheap after the first. `EngineRegistry` keeps one
`LocalBackend` per (model, engine kwargs) it was asked for, so repeated calls take no new
pool references. `EngineClient` is the only place that talks to the engine.
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
    """The `local` backends (hence engines) this registry was asked for, keyed by (model,
    engine kwargs), built by `manager` (default: `sgl_plugins.manager.get_plugin_manager()`,
    shared by every front door in the process). `get`/`backend` create under the registry's
    lock; `close` releases this registry's pool references (the pool shuts an engine down when
    its last reference goes) and forgets them."""

    def __init__(self, manager: Any = None) -> None:
        self._manager = manager
        self._lock = threading.Lock()
        self._backends: dict[Any, Any] = {}

    @property
    def manager(self) -> Any:
        if self._manager is None:
            from sgl_plugins.manager import get_plugin_manager

            return get_plugin_manager()
        return self._manager

    def backend(self, model: str | None, engine_kwargs: Mapping[str, Any] | None = None) -> Any:
        """The `local` backend of (model, engine_kwargs); weights load on first use."""
        kwargs = dict(engine_kwargs or {})
        key = (model, _freeze(kwargs))
        with self._lock:
            backend = self._backends.get(key)
            if backend is None:
                backend = self.manager.get_backend("local", model_path=model, **kwargs)
                self._backends[key] = backend
            return backend

    def client(self, model: str | None, engine_kwargs: Mapping[str, Any] | None = None) -> Any:
        """An `EngineClient` over the backend of (model, engine_kwargs)."""
        return EngineClient(self.backend(model, engine_kwargs))

    def get(self, model: str | None, engine_kwargs: Mapping[str, Any] | None = None) -> Any:
        """The shared `sgl_engine.Engine` of (model, engine_kwargs)."""
        return self.backend(model, engine_kwargs).engine

    def engines(self) -> dict[Any, Any]:
        """The engines this registry holds, by (model, frozen engine kwargs)."""
        with self._lock:
            return {key: b.engine for key, b in self._backends.items()}

    @property
    def _engines(self) -> dict[Any, Any]:
        """Deprecated alias of `engines()` (tests/test_dspy.py reads it)."""
        return self.engines()

    def __len__(self) -> int:
        return len(self._backends)

    def close(self) -> None:
        with self._lock:
            backends, self._backends = list(self._backends.values()), {}
        for backend in backends:
            backend.close()


ENGINES = EngineRegistry()
"""The process-wide registry the LangChain (and DSPy) classes use unless given another."""


def shared_engine(
    model: str | None,
    engine_kwargs: Mapping[str, Any] | None,
    registry: EngineRegistry | None = None,
) -> Any:
    """The engine of (model, engine_kwargs) in `registry`, or in `ENGINES` when None."""
    return (registry if registry is not None else ENGINES).get(model, engine_kwargs)


@dataclass(frozen=True)
class Request:
    """One generation call: a rendered prompt and SGLang sampling params (constraint included)."""

    prompt: str
    params: Mapping[str, Any] = field(default_factory=dict)


class EngineClient:
    """Runs `Request`s on a plugin backend (`local`: the in-process engine). Thread-safe (the
    backend is); holds no state of its own."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.engine = backend.engine

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The prompt text; `kwargs` (tools=, enable_thinking=, ...) reach the template."""
        return self.engine.apply_chat_template(messages, add_generation_prompt, **kwargs)

    def graph(self, requests: Sequence[Request]) -> Any:
        """The shared-prefix CallGraph of `requests` (one leaf each, in order). Requests
        asking for logprobs (`return_logprob`, `top_logprobs_num` in params) must agree."""
        from sgl_adapters.graph import CallGraph

        params = [_sampling(r.params) for r in requests]
        return CallGraph.from_prompts(
            [r.prompt for r in requests], self.tokenizer, params, **_logprob_args(requests[0])
        )

    def generate(self, requests: Sequence[Request]) -> list[dict]:
        """All requests as one shared-prefix CallGraph (each shared prefix prefilled once)."""
        out: list[dict] = []
        for group in _logprob_groups(requests):
            out += [_as_dict(r) for r in self.backend.run_graph(self.graph(group))]
        return out

    async def agenerate(self, requests: Sequence[Request]) -> list[dict]:
        out: list[dict] = []
        for group in _logprob_groups(requests):
            out += [_as_dict(r) for r in await self.backend.arun_graph(self.graph(group))]
        return out

    def stream(self, request: Request) -> Iterator[dict]:
        return self.engine.generate(
            request.prompt, _sampling(request.params), stream=True, **_logprob_args(request)
        )

    async def astream(self, request: Request) -> AsyncIterator[dict]:
        chunks = await self.engine.async_generate(
            request.prompt, _sampling(request.params), stream=True, **_logprob_args(request)
        )
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


_LOGPROB_KEYS = ("return_logprob", "top_logprobs_num")


def _sampling(params: Mapping[str, Any]) -> dict:
    return {k: v for k, v in params.items() if k not in _LOGPROB_KEYS}


def _logprob_args(request: Request) -> dict:
    if not request.params.get("return_logprob"):
        return {}
    return {
        "return_logprob": True,
        "top_logprobs_num": int(request.params.get("top_logprobs_num") or 0),
    }


def _logprob_groups(requests: Sequence[Request]) -> list[list[Request]]:
    """Consecutive runs of requests with equal logprob settings (one graph each)."""
    groups: list[list[Request]] = []
    for r in requests:
        if groups and _logprob_args(groups[-1][0]) == _logprob_args(r):
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def _probe_request(input_ids: list[int], start: int, top: int) -> dict:
    return {
        "input_ids": list(input_ids),
        "sampling_params": {"max_new_tokens": 0},
        "return_logprob": True,
        "logprob_start_len": start,
        "top_logprobs_num": top,
    }


def _as_dict(result: Any) -> dict:
    """A graph `LeafResult` back in the engine's result shape."""
    return {
        "text": result.text,
        "output_ids": list(result.output_ids),
        "meta_info": dict(result.meta_info),
    }
