"""The built-in `local` backend: the in-process `sgl_engine.Engine`.

Engine sharing (weights load once per process): the plugin registers a `LocalBackendFactory`,
a callable owning one `EnginePool`. The pool keys engines by (model path, engine config) and
counts references; `LocalBackend`s built by the same factory with equal arguments share one
engine. Each `PluginManager` calls `register_backends` once, so each manager owns one pool; the
front doors use the per-process `get_plugin_manager()`, hence one pool per process. A backend's
`close()` drops its reference and the last one shuts the engine down; `PluginManager.close()`
shuts down the whole pool. No module-level state.
"""

from __future__ import annotations

import inspect
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

from sgl_plugins.backend import (
    CAPABILITIES,
    BackendBase,
    ContinuationScore,
    StreamChunk,
    continuation_score,
    leaf_result_from_sglang,
    single_leaf_graph,
    stream_chunk_from_sglang,
)
from sgl_plugins.graph import CallGraph, Leaf, LeafResult
from sgl_plugins.hookspecs import hookimpl

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

EngineKey = tuple[str | None, tuple[tuple[str, Any], ...]]


def _default_engine(model_path: str | None, **config: Any) -> Any:
    from sgl_engine import Engine

    return Engine(model_path=model_path, **config)


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple | set | frozenset):
        return tuple(_freeze(v) for v in value)
    return value


def engine_key(model_path: str | os.PathLike | None, config: Mapping[str, Any]) -> EngineKey:
    path = None if model_path is None else os.fspath(model_path)
    if path is not None and os.path.exists(path):
        path = os.path.realpath(path)
    return path, _freeze(config)


class EnginePool:
    """Reference-counted engines keyed by (model path, config). `acquire`/`release`/`close`
    mutate the pool under its lock; an engine loads under the lock, so two threads asking for
    the same model get one engine."""

    def __init__(self, engine_factory: Callable[..., Any] = _default_engine) -> None:
        self._engine_factory = engine_factory
        self._lock = threading.Lock()
        self._entries: dict[EngineKey, list[Any]] = {}

    def acquire(self, model_path: Any, config: Mapping[str, Any]) -> tuple[EngineKey, Any]:
        key = engine_key(model_path, config)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = [self._engine_factory(key[0], **config), 0]
                self._entries[key] = entry
            entry[1] += 1
            return key, entry[0]

    def release(self, key: EngineKey) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del self._entries[key]
        entry[0].shutdown()

    def close(self) -> None:
        with self._lock:
            engines = [e[0] for e in self._entries.values()]
            self._entries.clear()
        for engine in engines:
            engine.shutdown()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


class LocalBackend(BackendBase):
    """A Backend over an in-process engine: graphs are submitted as one batch, so the engine
    prefills each shared node once. Thread-safe (the engine is)."""

    capabilities = CAPABILITIES

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        *,
        engine: Any = None,
        pool: EnginePool | None = None,
        chat_template: str | None = None,
        name: str = "local",
        **engine_config: Any,
    ) -> None:
        """Wrap `engine` (not owned), or get one for (model_path, engine_config) from `pool`
        (a private pool when None)."""
        self.name = name
        self.chat_template = chat_template
        self._pool: EnginePool | None = None
        self._key: EngineKey | None = None
        self._closed = False
        if engine is not None:
            if model_path is not None or engine_config:
                raise ValueError("give either engine= or model_path/engine config, not both")
            self.engine = engine
        else:
            self._pool = pool if pool is not None else EnginePool()
            self._key, self.engine = self._pool.acquire(model_path, engine_config)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        if self.chat_template is None:
            return self.engine.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tools=tools
            )
        return super().apply_chat_template(messages, add_generation_prompt, tools)

    def run_graph(self, graph: CallGraph) -> list[LeafResult]:
        if not len(graph):
            return []
        outs = self.engine.generate(**self._batch_request(graph))
        return self._results(graph.leaves, self._with_texts(graph.leaves, outs))

    async def arun_graph(self, graph: CallGraph) -> list[LeafResult]:
        if not len(graph):
            return []
        outs = await self.engine.async_generate(**self._batch_request(graph))
        return self._results(graph.leaves, self._with_texts(graph.leaves, outs))

    def stream(
        self, prompt: str | Sequence[int], sampling_params: Mapping[str, Any] | None = None, **leaf
    ) -> Iterator[StreamChunk]:
        request = self._batch_request(single_leaf_graph(prompt, sampling_params, **leaf), 0)
        text, sent = "", 0
        for chunk in self.engine.generate(stream=True, **request):
            out = stream_chunk_from_sglang(chunk, text, sent)
            text, sent = out.text, sent + len(out.output_token_logprobs)
            yield out

    async def astream(
        self, prompt: str | Sequence[int], sampling_params: Mapping[str, Any] | None = None, **leaf
    ) -> AsyncIterator[StreamChunk]:
        request = self._batch_request(single_leaf_graph(prompt, sampling_params, **leaf), 0)
        chunks = self.engine.async_generate(stream=True, **request)
        if inspect.isawaitable(chunks):
            chunks = await chunks
        text, sent = "", 0
        async for chunk in chunks:
            out = stream_chunk_from_sglang(chunk, text, sent)
            text, sent = out.text, sent + len(out.output_token_logprobs)
            yield out

    def score(self, prefix: str, continuations: Sequence[str]) -> list[ContinuationScore]:
        """`Engine.score`: one batch with max_new_tokens=0 (the prefix is prefilled once); a
        continuation's tokens are those of tokenize(prefix + continuation) past its common
        prefix with tokenize(prefix). Bad input raises the engine's `InvalidRequestError`."""
        if not continuations:
            return []
        return [
            continuation_score(s.text, s.token_ids, s.token_logprobs)
            for s in self.engine.score(prefix, list(continuations))
        ]

    def metrics(self) -> dict[str, Any]:
        return dict(self.engine.metrics())

    def flush_cache(self) -> bool:
        return bool(self.engine.flush_cache())

    @property
    def model_name(self) -> str:
        return str(getattr(self.engine, "model_path", None) or "")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pool is not None and self._key is not None:
            self._pool.release(self._key)

    def _batch_request(self, graph: CallGraph, index: int | None = None) -> dict[str, Any]:
        """Engine generate() kwargs for all leaves (lists), or for leaf `index` alone."""
        kind, prompts = graph.leaf_inputs(self.tokenizer)
        leaves = graph.leaves
        request = {
            "input_ids" if kind == "ids" else "prompt": prompts,
            "sampling_params": [leaf.request_params() for leaf in leaves],
            "return_logprob": [leaf.return_logprob for leaf in leaves],
            "logprob_start_len": [leaf.logprob_start_len for leaf in leaves],
            "top_logprobs_num": [leaf.top_logprobs_num for leaf in leaves],
        }
        if index is not None:
            request = {k: v[index] for k, v in request.items()}
        return request

    def _with_texts(self, leaves: Sequence[Leaf], outs: Any) -> Any:
        """Fill each logprob entry's text for leaves that asked (return_text_in_logprobs)."""
        for leaf, out in zip(leaves, outs, strict=False):
            if not leaf.return_text_in_logprobs:
                continue
            meta = out.get("meta_info", {})
            for key in ("input_token_logprobs", "output_token_logprobs"):
                if meta.get(key):
                    meta[key] = [[e[0], e[1], self.tokenizer.decode([e[1]])] for e in meta[key]]
        return outs

    @staticmethod
    def _results(leaves: Sequence[Leaf], outs: Any) -> list[LeafResult]:
        if len(outs) != len(leaves):
            raise RuntimeError(f"engine returned {len(outs)} results for {len(leaves)} leaves")
        return [leaf_result_from_sglang(leaf, out) for leaf, out in zip(leaves, outs, strict=True)]


class LocalBackendFactory:
    """The `local` factory: `factory(model_path=None, **engine_config)` -> LocalBackend, all
    sharing this factory's EnginePool; `close()` shuts the pool down."""

    def __init__(self, pool: EnginePool | None = None) -> None:
        self.pool = pool if pool is not None else EnginePool()

    def __call__(self, model_path: str | os.PathLike | None = None, **kwargs: Any) -> LocalBackend:
        if kwargs.get("engine") is not None:
            return LocalBackend(model_path, **kwargs)
        return LocalBackend(model_path, pool=self.pool, **kwargs)

    def close(self) -> None:
        self.pool.close()


@hookimpl
def register_backends(register: Any) -> None:
    register(
        "local",
        LocalBackendFactory(),
        CAPABILITIES,
        description="in-process sgl_engine (RadixAttention, constrained decoding)",
    )


@hookimpl
def register_chat_templates(register: Any) -> None:
    register("chatml", CHATML_TEMPLATE, description="ChatML, for models without a template")
