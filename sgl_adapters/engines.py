"""Shared backends and the seam the front doors (LangChain, DSPy, lang) call through.

A front door names its backend (`backend="local"` by default, any registered plugin name, or a
`Backend` instance) and `EngineRegistry.resolve` turns that into one shared `Backend`: the
`local` backend comes from the plugin layer's `EnginePool`, which keys engines by (model path,
engine config), so weights load once per process; other named backends are built once per
(name, keyword arguments) by the plugin manager. `EngineClient` is the only place that talks
to a backend, and it uses the `Backend` protocol only (`sgl_plugins.backend`): a capability a
call needs and the backend lacks is a `BackendCapabilityError` naming both.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sgl_plugins.backend import (
    BackendCapabilityError,
    has_capability,
    iterate_in_thread,
    require,
)
from sgl_plugins.graph import CONSTRAINT_KEYS, CallGraph, LeafResult

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"


def model_display_name(model: str | None) -> str:
    """The `model_name` reported in response metadata."""
    if model is None:
        return EMBEDDED_MODEL_NAME
    return os.path.basename(os.path.normpath(model)) or model


def backend_model_name(backend: Any) -> str:
    """The model a backend serves, for response metadata (its `model_name`, else its name)."""
    name = getattr(backend, "model_name", None)
    if name:
        return model_display_name(str(name))
    return str(getattr(backend, "name", "unknown"))


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def factory_takes(manager: Any, name: str, parameter: str) -> bool:
    """Whether backend `name`'s factory has a parameter called `parameter`."""
    spec = manager.backends().get(name)
    if spec is None:
        return False
    try:
        return parameter in inspect.signature(spec.factory).parameters
    except (TypeError, ValueError):
        return False


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

    def resolve(
        self,
        backend: Any = None,
        model: str | None = None,
        engine_kwargs: Mapping[str, Any] | None = None,
        backend_kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        """The shared Backend a front door asked for: an instance is used as it is; None or
        "local" is the in-process engine of (model, engine_kwargs); another name is built by
        the plugin manager with `backend_kwargs` (plus `model=` when the factory takes one and
        it was not given) once per (name, kwargs)."""
        if backend is not None and not isinstance(backend, str):
            return backend
        if backend in (None, "local"):
            return self.backend(model, {**dict(engine_kwargs or {}), **dict(backend_kwargs or {})})
        kwargs = dict(backend_kwargs or {})
        if model is not None and "model" not in kwargs:
            if not factory_takes(self.manager, backend, "model"):
                raise ValueError(
                    f"backend {backend!r} serves the model its factory was given; "
                    f"model={model!r} cannot be chosen per call"
                )
            kwargs["model"] = model
        key = (backend, _freeze(kwargs))
        with self._lock:
            found = self._backends.get(key)
            if found is None:
                found = self.manager.get_backend(backend, **kwargs)
                self._backends[key] = found
            return found

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

    def client(
        self,
        model: str | None,
        engine_kwargs: Mapping[str, Any] | None = None,
        backend: Any = None,
        backend_kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        """An `EngineClient` over `resolve(backend, model, engine_kwargs, backend_kwargs)`."""
        return EngineClient(self.resolve(backend, model, engine_kwargs, backend_kwargs))

    def get(self, model: str | None, engine_kwargs: Mapping[str, Any] | None = None) -> Any:
        """The shared `sgl_engine.Engine` of (model, engine_kwargs)."""
        return self.backend(model, engine_kwargs).engine

    def engines(self) -> dict[Any, Any]:
        """The engines this registry holds, by (model, frozen engine kwargs)."""
        with self._lock:
            return {k: b.engine for k, b in self._backends.items() if hasattr(b, "engine")}

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
    """One generation call: a rendered prompt and SGLang sampling params (constraint included).
    `messages` is the chat itself, sent instead of `prompt` to backends that apply their own
    template (capability "chat" without "chat_template"; `prompt` is then None)."""

    prompt: str | None
    params: Mapping[str, Any] = field(default_factory=dict)
    messages: tuple[Mapping[str, Any], ...] | None = None


class EngineClient:
    """Runs `Request`s on a `Backend` through its protocol only. Thread-safe (the backend is);
    holds no state of its own."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    @property
    def name(self) -> str:
        return str(getattr(self.backend, "name", type(self.backend).__name__))

    @property
    def tokenizer(self) -> Any:
        return self.backend.tokenizer

    @property
    def renders_chat(self) -> bool:
        """Whether prompts are rendered here (else chats go to the backend as messages)."""
        caps = self.backend.capabilities
        return "chat_template" in caps or "chat" not in caps

    def require(self, capability: str, needed_for: str = "") -> None:
        require(self.backend, capability, needed_for)

    def require_tokenizer(self, needed_for: str) -> Any:
        if self.tokenizer is None:
            raise BackendCapabilityError(self.name, "tokenizer", needed_for)
        return self.tokenizer

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: Any = None,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text; `template_kwargs` (e.g. enable_thinking) go to the tokenizer's
        chat template, rendered here through the backend's `tokenizer`."""
        if template_kwargs:
            tok = self.require_tokenizer("chat template variables")
            return tok.apply_chat_template(
                messages,
                tools=tools,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **template_kwargs,
            )
        try:
            return self.backend.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tools=tools
            )
        except NotImplementedError as exc:
            raise BackendCapabilityError(self.name, "chat_template", "rendering a chat") from exc

    def check(self, request: Request) -> None:
        """Refuse a request whose constraint or form the backend cannot honour."""
        for key in CONSTRAINT_KEYS:
            if request.params.get(key) is not None:
                self.require(key, f"decoding under {key}")
        if request.prompt is None:
            self.require("chat", "sending a chat as messages")

    def graph(self, requests: Sequence[Request]) -> CallGraph:
        """The shared-prefix CallGraph of `requests` (one leaf each, in order)."""
        params = [dict(r.params) for r in requests]
        return CallGraph.from_prompts([r.prompt for r in requests], self.tokenizer, params)

    def generate(self, requests: Sequence[Request]) -> list[dict]:
        """All requests as one shared-prefix CallGraph (each shared prefix prefilled once
        where the backend declares "prefix_dedup"); chats sent as messages go one by one."""
        if not requests:
            return []
        for r in requests:
            self.check(r)
        if any(r.prompt is None for r in requests):
            return self._chats(requests)
        return [as_dict(r) for r in self.backend.run_graph(self.graph(requests))]

    async def agenerate(self, requests: Sequence[Request]) -> list[dict]:
        if not requests:
            return []
        for r in requests:
            self.check(r)
        if any(r.prompt is None for r in requests):
            return list(await asyncio.gather(*(asyncio.to_thread(self._chat, r) for r in requests)))
        return [as_dict(r) for r in await self.backend.arun_graph(self.graph(requests))]

    def _chats(self, requests: Sequence[Request]) -> list[dict]:
        """Requests sent one by one, concurrently (so the server batches them), in order."""
        if len(requests) == 1:
            return [self._chat(requests[0])]
        with ThreadPoolExecutor(min(len(requests), 32), thread_name_prefix="sgl-chat") as pool:
            return list(pool.map(self._chat, requests))

    def call(self, request: Request, **leaf: Any) -> dict:
        """One request alone; `leaf` takes `CallGraph.add_leaf` options (return_logprob,
        top_logprobs_num, ...)."""
        self.check(request)
        if leaf.get("return_logprob"):
            self.require("logprobs", "returning logprobs")
        return self._chat(request, **leaf)

    async def acall(self, request: Request, **leaf: Any) -> dict:
        return await asyncio.to_thread(self.call, request, **leaf)

    def _chat(self, request: Request, **leaf: Any) -> dict:
        if request.prompt is not None:
            return as_dict(self.backend.generate(request.prompt, dict(request.params), **leaf))
        messages = [dict(m) for m in request.messages or ()]
        return as_dict(self.backend.chat(messages, dict(request.params), **leaf))

    def stream(self, request: Request, **leaf: Any) -> Iterator[dict]:
        """Chunks with cumulative `text`, `delta` and SGLang-style `meta_info` (the last one
        has `finish_reason` and the token counts). `leaf` takes `CallGraph.add_leaf` options;
        with `return_logprob` each chunk's `delta_logprobs` holds its new tokens' SGLang-style
        `output_token_logprobs`/`output_top_logprobs`."""
        self.check(request)
        if leaf.get("return_logprob"):
            self.require("logprobs", "streaming logprobs")
        if request.prompt is None:
            messages = [dict(m) for m in request.messages or ()]
            chunks = self.backend.stream_chat(messages, dict(request.params), **leaf)
        else:
            chunks = self.backend.stream(request.prompt, dict(request.params), **leaf)
        for chunk in chunks:
            yield chunk_dict(chunk)

    async def astream(self, request: Request, **leaf: Any) -> AsyncIterator[dict]:
        self.check(request)
        if leaf.get("return_logprob"):
            self.require("logprobs", "streaming logprobs")
        if request.prompt is None:
            async for chunk in iterate_in_thread(lambda: self.stream(request, **leaf)):
                yield chunk
            return
        async for chunk in self.backend.astream(request.prompt, dict(request.params), **leaf):
            yield chunk_dict(chunk)

    def probe(self, input_ids: list[int], start: int, top: int = 10) -> dict:
        """meta_info of scoring `input_ids` from position `start` (prompt logprobs and the top
        `top` alternatives there); generates nothing."""
        self._require_probe()
        return dict(self.backend.generate(input_ids, **_probe_args(start, top)).meta_info)

    async def aprobe(self, input_ids: list[int], start: int, top: int = 10) -> dict:
        self._require_probe()
        graph = CallGraph()
        node = graph.add_node(graph.root, token_ids=input_ids)
        graph.add_leaf(node, **_probe_args(start, top))
        (result,) = await self.backend.arun_graph(graph)
        return dict(result.meta_info)

    def _require_probe(self) -> None:
        self.require("token_ids", "scoring a prompt continuation")
        self.require("logprobs", "scoring a prompt continuation")

    def metrics(self) -> dict:
        return dict(self.backend.metrics())


def _probe_args(start: int, top: int) -> dict:
    return {
        "sampling_params": {"max_new_tokens": 0},
        "return_logprob": True,
        "logprob_start_len": start,
        "top_logprobs_num": top,
    }


def _meta(meta: Mapping[str, Any], reason: str | None, usage: Any, error: str | None) -> dict:
    """SGLang-style meta_info, filled from the protocol's fields where the backend left it
    sparse (a plugin need not return SGLang meta)."""
    out = dict(meta)
    if reason is not None and not out.get("finish_reason"):
        out["finish_reason"] = {"type": reason, **({"message": error} if error else {})}
    if usage is not None:
        out.setdefault("prompt_tokens", usage.prompt_tokens)
        out.setdefault("completion_tokens", usage.completion_tokens)
        out.setdefault("cached_tokens", usage.cached_tokens)
    out.setdefault("id", uuid.uuid4().hex)
    return out


def as_dict(result: LeafResult) -> dict:
    """A `LeafResult` in the engine's result shape ({"text", "output_ids", "meta_info"})."""
    return {
        "text": result.text,
        "output_ids": list(result.output_ids),
        "meta_info": _meta(result.meta_info, result.finish_reason, result.usage, result.error),
    }


def chunk_dict(chunk: Any) -> dict:
    """A `StreamChunk` in the engine's stream shape (cumulative `text`, `delta`; the new
    tokens' logprobs in `delta_logprobs`)."""
    return {
        "text": chunk.text,
        "delta": chunk.delta,
        "output_ids": list(chunk.output_ids),
        "meta_info": _meta(chunk.meta_info, chunk.finish_reason, chunk.usage, None),
        "delta_logprobs": {
            "output_token_logprobs": list(getattr(chunk, "output_token_logprobs", ())),
            "output_top_logprobs": list(getattr(chunk, "output_top_logprobs", ())),
        },
    }


__all__ = [
    "ENGINES",
    "BackendCapabilityError",
    "EngineClient",
    "EngineRegistry",
    "Request",
    "has_capability",
]
