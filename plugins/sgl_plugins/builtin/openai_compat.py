"""The built-in `openai` backend: any OpenAI-compatible server (vLLM, Ollama, LM Studio, our
own `sgl-adapters serve`, OpenAI itself) through the official `openai` client.

Leaves go out as /v1/completions calls (chats, through `chat`/`stream_chat`, as
/v1/chat/completions, the server applying its template), concurrently, in the graph's leaf
order so a server with a prefix cache sees shared prefixes back to back. Honest capabilities:
no tokenizer, no token-level scoring or logprobs, no prefix dedup; the only constraint is
`json_schema`, sent as `response_format`. SGLang sampling keys without an OpenAI name (top_k,
min_p, ...) go in the request's extra body, which SGLang-style servers and vLLM read.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from sgl_plugins.backend import BackendBase, BackendCapabilityError, StreamChunk
from sgl_plugins.graph import CallGraph, Leaf, LeafResult, Usage
from sgl_plugins.hookspecs import hookimpl

CAPABILITIES = frozenset({"generate", "stream", "chat", "json_schema", "async"})
_DIRECT = {
    "max_new_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "stop": "stop",
    "seed": "seed",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
}
_FINISH = {"stop": "stop", "length": "length", "tool_calls": "stop", "content_filter": "abort"}


def _request_args(leaf: Leaf, backend: str, sglang: bool = False) -> dict[str, Any]:
    """OpenAI create() keyword arguments for `leaf` (constraint included); with `sglang`
    every constraint goes in the extra body under SGLang's name."""
    kind = leaf.constraint[0] if leaf.constraint else None
    if sglang and kind is not None:
        args = _request_args(replace(leaf, **{kind: None}), backend)
        value = list(leaf.constraint[1]) if kind == "choices" else leaf.constraint[1]
        args["extra_body"] = {**args.get("extra_body", {}), kind: value}
        return args
    if kind not in (None, "json_schema"):
        raise BackendCapabilityError(backend, kind, f"decoding under {kind}")
    if leaf.return_logprob:
        raise BackendCapabilityError(backend, "logprobs", "return_logprob")
    args: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in leaf.sampling_params.items():
        if value is None:
            continue
        if key in _DIRECT:
            args[_DIRECT[key]] = value
        else:
            extra[key] = value
    if kind == "json_schema":
        schema = leaf.json_schema
        if isinstance(schema, str):
            schema = json.loads(schema)
        args["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": dict(schema), "strict": True},
        }
    if extra:
        args["extra_body"] = extra
    return args


def _completion_args(args: dict[str, Any]) -> dict[str, Any]:
    """/v1/completions has no `response_format` parameter in the client: it goes in the body
    (servers that constrain completions -- ours, vLLM, SGLang -- read it there)."""
    if "response_format" not in args:
        return args
    args = dict(args)
    args["extra_body"] = {
        **args.get("extra_body", {}),
        "response_format": args.pop("response_format"),
    }
    return args


def _usage(usage: Any) -> Usage:
    if usage is None:
        return Usage()
    details = getattr(usage, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", None) or 0
    return Usage(int(usage.prompt_tokens or 0), int(usage.completion_tokens or 0), int(cached))


def _meta(rid: str | None, reason: str, usage: Usage) -> dict[str, Any]:
    return {
        "id": rid,
        "finish_reason": {"type": reason},
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_tokens": usage.cached_tokens,
    }


def _result(leaf: Leaf, rid: str | None, text: str, reason: str | None, usage: Any) -> LeafResult:
    kind = _FINISH.get(reason or "stop", "stop")
    counts = _usage(usage)
    return LeafResult(
        leaf_id=leaf.id,
        text=text or "",
        finish_reason=kind,
        usage=counts,
        meta_info=_meta(rid, kind, counts),
        metadata=leaf.metadata,
    )


class OpenAIBackend(BackendBase):
    """A Backend over an OpenAI-compatible server. Thread-safe (the `openai` clients are).
    `model` None takes the first model the server lists."""

    capabilities = CAPABILITIES
    tokenizer = None

    def __init__(
        self,
        model: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 600.0,
        max_retries: int = 2,
        max_concurrency: int = 32,
        name: str = "openai",
        sglang_constraints: bool = False,
        **client_kwargs: Any,
    ) -> None:
        """`sglang_constraints`: the server reads SGLang's regex/ebnf/choices/json_schema
        keys from the body (ours and SGLang's do), so every constraint is available."""
        import openai

        self.name = name
        self._sglang = sglang_constraints
        if sglang_constraints:
            self.capabilities = CAPABILITIES | {"constrained"}
        key = api_key or "EMPTY"
        options = {"timeout": timeout, "max_retries": max_retries, **client_kwargs}
        self.client = openai.OpenAI(base_url=base_url, api_key=key, **options)
        self.aclient = openai.AsyncOpenAI(base_url=base_url, api_key=key, **options)
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="sgl-openai")
        self.model = model or self.client.models.list().data[0].id

    @property
    def model_name(self) -> str:
        return self.model

    # -- completions (graphs) -----------------------------------------------------------------

    @staticmethod
    def _prompt(graph: CallGraph, leaf: Leaf) -> str | list[int]:
        if graph.uses_token_ids(leaf.node):
            return graph.prompt_ids(leaf.node)
        return graph.prompt_text(leaf.node)

    def _complete(self, prompt: str | list[int], leaf: Leaf) -> LeafResult:
        out = self.client.completions.create(
            model=self.model,
            prompt=prompt,
            **_completion_args(_request_args(leaf, self.name, self._sglang)),
        )
        choice = out.choices[0]
        return _result(leaf, out.id, choice.text, choice.finish_reason, out.usage)

    def run_graph(self, graph: CallGraph) -> list[LeafResult]:
        leaves = graph.leaves
        for leaf in leaves:
            _request_args(leaf, self.name, self._sglang)  # refuse before sending anything
        jobs = [self._pool.submit(self._complete, self._prompt(graph, lf), lf) for lf in leaves]
        return [job.result() for job in jobs]

    async def arun_graph(self, graph: CallGraph) -> list[LeafResult]:
        async def one(leaf: Leaf) -> LeafResult:
            out = await self.aclient.completions.create(
                model=self.model,
                prompt=self._prompt(graph, leaf),
                **_request_args(leaf, self.name, self._sglang),
            )
            choice = out.choices[0]
            return _result(leaf, out.id, choice.text, choice.finish_reason, out.usage)

        for leaf in graph.leaves:
            _request_args(leaf, self.name, self._sglang)
        return list(await asyncio.gather(*(one(leaf) for leaf in graph.leaves)))

    def stream(
        self, prompt: str | Sequence[int], sampling_params: Mapping[str, Any] | None = None, **leaf
    ) -> Iterator[StreamChunk]:
        args = _single_leaf_args(sampling_params, leaf, self.name, self._sglang)
        events = self.client.completions.create(
            model=self.model,
            prompt=prompt if isinstance(prompt, str) else list(prompt),
            stream=True,
            stream_options={"include_usage": True},
            **_completion_args(args),
        )
        yield from _stream(events, lambda c: c.text)

    # -- chat ---------------------------------------------------------------------------------

    def chat(
        self,
        messages: list[dict[str, Any]],
        sampling_params: Mapping[str, Any] | None = None,
        *,
        tools: list[dict[str, Any]] | None = None,
        **leaf: Any,
    ) -> LeafResult:
        args = _single_leaf_args(sampling_params, leaf, self.name, self._sglang)
        if tools:
            args["tools"] = [{"type": "function", "function": t} for t in tools]
        out = self.client.chat.completions.create(model=self.model, messages=messages, **args)
        choice = out.choices[0]
        probe = Leaf(0, 0)
        return _result(probe, out.id, choice.message.content, choice.finish_reason, out.usage)

    def stream_chat(
        self,
        messages: list[dict[str, Any]],
        sampling_params: Mapping[str, Any] | None = None,
        *,
        tools: list[dict[str, Any]] | None = None,
        **leaf: Any,
    ) -> Iterator[StreamChunk]:
        args = _single_leaf_args(sampling_params, leaf, self.name, self._sglang)
        events = self.client.chat.completions.create(
            model=self.model,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            **args,
        )
        yield from _stream(events, lambda c: c.delta.content)

    async def astream(
        self, prompt: str | Sequence[int], sampling_params: Mapping[str, Any] | None = None, **leaf
    ) -> AsyncIterator[StreamChunk]:
        args = _single_leaf_args(sampling_params, leaf, self.name, self._sglang)
        events = await self.aclient.completions.create(
            model=self.model,
            prompt=prompt if isinstance(prompt, str) else list(prompt),
            stream=True,
            stream_options={"include_usage": True},
            **_completion_args(args),
        )
        text, reason, usage, rid = "", None, None, None
        async for event in events:
            rid = rid or event.id
            usage = event.usage or usage
            for choice in event.choices or ():
                delta = choice.text or ""
                reason = choice.finish_reason or reason
                if delta:
                    text += delta
                    yield StreamChunk(delta, text)
        yield _last_chunk(text, rid, reason, usage)

    def close(self) -> None:
        self.client.close()
        self._pool.shutdown(wait=False)


def _single_leaf_args(
    sampling_params: Mapping[str, Any] | None,
    leaf: Mapping[str, Any],
    backend: str,
    sglang: bool = False,
) -> dict[str, Any]:
    graph = CallGraph()
    node = graph.add_node(graph.root, "")
    graph.add_leaf(node, sampling_params, **leaf)
    return _request_args(graph.leaves[0], backend, sglang)


def _last_chunk(text: str, rid: str | None, reason: str | None, usage: Any) -> StreamChunk:
    kind = _FINISH.get(reason or "stop", "stop")
    counts = _usage(usage)
    return StreamChunk("", text, (), kind, counts, _meta(rid, kind, counts))


def _stream(events: Any, delta_of: Any) -> Iterator[StreamChunk]:
    """StreamChunks from OpenAI stream events; the last carries finish reason and usage (the
    usage-only event some servers send after the finish is awaited)."""
    text, reason, usage, rid = "", None, None, None
    try:
        for event in events:
            rid = rid or event.id
            usage = event.usage or usage
            for choice in event.choices or ():
                delta = delta_of(choice) or ""
                reason = choice.finish_reason or reason
                if delta:
                    text += delta
                    yield StreamChunk(delta, text)
    finally:
        events.close()
    yield _last_chunk(text, rid, reason, usage)


@hookimpl
def register_backends(register: Any) -> None:
    register(
        "openai",
        OpenAIBackend,
        CAPABILITIES,
        description="any OpenAI-compatible server, through the official openai client",
    )
