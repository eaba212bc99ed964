"""The Backend protocol every backend plugin implements, its result types, and helpers.

A backend runs CallGraphs (`run_graph`/`arun_graph`), single calls (`generate`, `stream`),
scores continuations for `select` (`score`), and exposes its tokenizer and chat template.
`BackendBase` gives default `generate`/`stream`/`astream`/`arun_graph` on top of `run_graph`,
so a minimal backend implements `run_graph` and `tokenizer` only.

Optional members (front doors look them up with `getattr` and fall back): `chat` and
`stream_chat` run a chat whose template the backend (or its server) applies -- backends
declaring "chat" but not "chat_template" get chats this way; `flush_cache` empties a prefix
cache; `model_name` names the model served. What a front door needs and a backend lacks is
reported by `require` as one `BackendCapabilityError` naming both.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from sgl_plugins.graph import CallGraph, Leaf, LeafResult, Usage

CAPABILITIES = frozenset(
    {
        "generate",  # run_graph / generate
        "stream",  # token-by-token streaming (else one chunk with the whole result)
        "score",  # score(prefix, continuations) from prompt logprobs
        "constrained",  # regex / json_schema / ebnf / choices leaves
        "chat_template",  # apply_chat_template renders the model's template
        "logprobs",  # return_logprob, top_logprobs_num on leaves
        "prefix_cache",  # prompt prefixes are reused across calls (cached_tokens > 0)
        "prefix_dedup",  # one run_graph prefills each shared node once, even cold
        "token_ids",  # leaves given as token ids are sent as such
        "async",  # arun_graph/astream are natively asynchronous
        "chat",  # chat/stream_chat take messages; the backend applies the template itself
    }
)
"""Capability names with a meaning the adapters rely on; plugins may declare others.
"constrained" means all four constraint kinds; a backend supporting only some declares them
by name instead ("json_schema", "regex", "ebnf", "choices")."""

CONSTRAINT_CAPABILITIES = ("regex", "json_schema", "ebnf", "choices")


class BackendCapabilityError(NotImplementedError):
    """A front door needs `capability` and backend `backend` does not have it."""

    def __init__(self, backend: str, capability: str, needed_for: str = "") -> None:
        why = f" (needed for {needed_for})" if needed_for else ""
        super().__init__(f"backend {backend!r} lacks capability {capability!r}{why}")
        self.backend = backend
        self.capability = capability


def has_capability(backend: Any, capability: str) -> bool:
    """Whether `backend` declares `capability` ("constrained" implies each constraint kind)."""
    caps = getattr(backend, "capabilities", frozenset())
    if capability in caps:
        return True
    return capability in CONSTRAINT_CAPABILITIES and "constrained" in caps


def require(backend: Any, capability: str, needed_for: str = "") -> None:
    """Raise `BackendCapabilityError` unless `backend` declares `capability`."""
    if not has_capability(backend, capability):
        name = getattr(backend, "name", type(backend).__name__)
        raise BackendCapabilityError(name, capability, needed_for)


@dataclass(frozen=True)
class ContinuationScore:
    """Logprob of `text` given a prefix: per token, summed and averaged over `num_tokens`."""

    text: str
    logprob_sum: float
    logprob_mean: float
    num_tokens: int
    token_ids: tuple[int, ...] = ()
    token_logprobs: tuple[float, ...] = ()


LogprobEntry = tuple[float, int, "str | None"]
"""SGLang's (logprob, token id, token text or None) of one token."""


@dataclass(frozen=True)
class StreamChunk:
    """A piece of a streamed call: `delta` is the new text, `text`/`output_ids` are cumulative.
    The last chunk has `finish_reason` and `usage` set. When the call asked `return_logprob`,
    `output_token_logprobs` (and `output_top_logprobs`, `top_logprobs_num` alternatives per
    token) hold this chunk's new tokens only, like `delta`: over a whole stream they concatenate
    to what `generate` returns in meta_info."""

    delta: str
    text: str
    output_ids: tuple[int, ...] = ()
    finish_reason: str | None = None
    usage: Usage | None = None
    meta_info: Mapping[str, Any] = field(default_factory=dict)
    output_token_logprobs: tuple[LogprobEntry, ...] = ()
    output_top_logprobs: tuple[tuple[LogprobEntry, ...], ...] = ()


@runtime_checkable
class Backend(Protocol):
    """What the front doors call. Implementations must be safe to call from several threads
    at once; `close` releases what the backend holds (engines, connections)."""

    name: str
    capabilities: frozenset[str]

    @property
    def tokenizer(self) -> Any:
        """A HF-style tokenizer (encode/decode/apply_chat_template), or None for text-only
        backends (graphs then share prefixes by characters)."""

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt text for a chat."""

    def run_graph(self, graph: CallGraph) -> list[LeafResult]:
        """Run every leaf of `graph`; results in leaf order. Each shared node is prefilled once
        when the backend declares "prefix_dedup". Invalid leaves raise ValueError."""

    async def arun_graph(self, graph: CallGraph) -> list[LeafResult]:
        """`run_graph` for asyncio callers."""

    def generate(
        self, prompt: str | Sequence[int], sampling_params: Mapping[str, Any] | None = None, **leaf
    ) -> LeafResult:
        """One call; `leaf` takes `CallGraph.add_leaf`'s keyword arguments (regex, ...)."""

    def stream(
        self, prompt: str | Sequence[int], sampling_params: Mapping[str, Any] | None = None, **leaf
    ) -> Iterator[StreamChunk]:
        """One call, streamed. With `return_logprob=True` (and `top_logprobs_num`) every chunk
        carries its new tokens' logprobs; a backend without "logprobs" raises
        `BackendCapabilityError` before anything is generated."""

    def astream(
        self, prompt: str | Sequence[int], sampling_params: Mapping[str, Any] | None = None, **leaf
    ) -> AsyncIterator[StreamChunk]:
        """One call, streamed to asyncio callers."""

    def score(self, prefix: str, continuations: Sequence[str]) -> list[ContinuationScore]:
        """Prompt logprobs of each continuation given `prefix` (no generation)."""

    def metrics(self) -> dict[str, Any]:
        """Counters such as prefill_tokens, cached_tokens, hit_rate (may be empty)."""

    def close(self) -> None:
        """Release held resources; idempotent."""


def single_leaf_graph(
    prompt: str | Sequence[int], sampling_params: Mapping[str, Any] | None = None, **leaf: Any
) -> CallGraph:
    graph = CallGraph()
    if isinstance(prompt, str):
        node = graph.add_node(graph.root, prompt)
    else:
        node = graph.add_node(graph.root, token_ids=prompt)
    graph.add_leaf(node, sampling_params, **leaf)
    return graph


class BackendBase:
    """Defaults for the optional parts of `Backend`; subclasses implement `run_graph` and set
    `name`, `capabilities` and `tokenizer`."""

    name: str = "base"
    capabilities: frozenset[str] = frozenset({"generate"})
    tokenizer: Any = None
    chat_template: str | None = None
    """A Jinja chat template used instead of the tokenizer's own (None: the tokenizer's)."""

    def run_graph(self, graph: CallGraph) -> list[LeafResult]:
        raise NotImplementedError

    async def arun_graph(self, graph: CallGraph) -> list[LeafResult]:
        return await asyncio.to_thread(self.run_graph, graph)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The chat rendered by `tokenizer` with `chat_template`, else its own template."""
        tok = self.tokenizer
        if tok is None or not (self.chat_template or getattr(tok, "chat_template", None)):
            raise NotImplementedError(f"backend {self.name!r} has no chat template")
        template = {"chat_template": self.chat_template} if self.chat_template else {}
        return tok.apply_chat_template(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **template,
        )

    def generate(
        self, prompt: str | Sequence[int], sampling_params: Mapping[str, Any] | None = None, **leaf
    ) -> LeafResult:
        return self.run_graph(single_leaf_graph(prompt, sampling_params, **leaf))[0]

    def stream(
        self, prompt: str | Sequence[int], sampling_params: Mapping[str, Any] | None = None, **leaf
    ) -> Iterator[StreamChunk]:
        result = self.generate(prompt, sampling_params, **leaf)
        yield StreamChunk(
            result.text,
            result.text,
            result.output_ids,
            result.finish_reason,
            result.usage,
            result.meta_info,
            *new_logprobs(result.meta_info, 0),
        )

    async def astream(
        self, prompt: str | Sequence[int], sampling_params: Mapping[str, Any] | None = None, **leaf
    ) -> AsyncIterator[StreamChunk]:
        async for chunk in iterate_in_thread(lambda: self.stream(prompt, sampling_params, **leaf)):
            yield chunk

    def score(self, prefix: str, continuations: Sequence[str]) -> list[ContinuationScore]:
        raise NotImplementedError(f"backend {self.name!r} cannot score continuations")

    def metrics(self) -> dict[str, Any]:
        return {}

    def flush_cache(self) -> bool:
        """Empty the prefix cache; False when there is none to flush."""
        return False

    def chat(
        self,
        messages: list[dict[str, Any]],
        sampling_params: Mapping[str, Any] | None = None,
        *,
        tools: list[dict[str, Any]] | None = None,
        **leaf: Any,
    ) -> LeafResult:
        """One chat call: the messages rendered with `apply_chat_template`, then `generate`."""
        return self.generate(
            self.apply_chat_template(messages, tools=tools), sampling_params, **leaf
        )

    def stream_chat(
        self,
        messages: list[dict[str, Any]],
        sampling_params: Mapping[str, Any] | None = None,
        *,
        tools: list[dict[str, Any]] | None = None,
        **leaf: Any,
    ) -> Iterator[StreamChunk]:
        return self.stream(self.apply_chat_template(messages, tools=tools), sampling_params, **leaf)

    def close(self) -> None:
        return None


async def iterate_in_thread(make_iter: Any) -> AsyncIterator[Any]:
    """Drive a blocking iterator in a worker thread, yielding its items to asyncio."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def pump() -> None:
        try:
            for item in make_iter():
                loop.call_soon_threadsafe(queue.put_nowait, ("item", item))
        except BaseException as exc:  # noqa: BLE001 -- re-raised in the consumer
            loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))
        else:
            loop.call_soon_threadsafe(queue.put_nowait, ("done", None))

    threading.Thread(target=pump, daemon=True).start()
    while True:
        kind, value = await queue.get()
        if kind == "error":
            raise value
        if kind == "done":
            return
        yield value


# -- the SGLang result format (the engine's and the /generate endpoint's) ----------------------


def finish_fields(meta: Mapping[str, Any]) -> tuple[str, int | str | None, str | None]:
    """(finish_reason type, matched stop, abort message) from SGLang meta info."""
    reason = meta.get("finish_reason")
    if reason is None:
        return "stop", None, None
    if isinstance(reason, str):
        return reason, None, None
    return reason.get("type", "stop"), reason.get("matched"), reason.get("message")


def usage_from_meta(meta: Mapping[str, Any]) -> Usage:
    return Usage(
        prompt_tokens=int(meta.get("prompt_tokens", 0)),
        completion_tokens=int(meta.get("completion_tokens", 0)),
        cached_tokens=int(meta.get("cached_tokens", 0)),
    )


def leaf_result_from_sglang(leaf: Leaf, out: Mapping[str, Any]) -> LeafResult:
    """Convert one SGLang result dict ({"text", "output_ids", "meta_info"}) for `leaf`."""
    meta = out.get("meta_info", {})
    reason, matched, message = finish_fields(meta)
    logprobs = None
    if leaf.return_logprob and meta.get("output_token_logprobs") is not None:
        logprobs = tuple(float(entry[0]) for entry in meta["output_token_logprobs"])
    return LeafResult(
        leaf_id=leaf.id,
        text=out.get("text", ""),
        output_ids=tuple(out.get("output_ids", ())),
        finish_reason=reason,
        usage=usage_from_meta(meta),
        matched_stop=matched,
        logprobs=logprobs,
        error=message,
        meta_info=dict(meta),
        metadata=leaf.metadata,
    )


def new_logprobs(
    meta: Mapping[str, Any], sent: int
) -> tuple[tuple[LogprobEntry, ...], tuple[tuple[LogprobEntry, ...], ...]]:
    """The output logprobs of an SGLang stream chunk's new tokens, `sent` having come before.
    SGLang sends them cumulative (all `completion_tokens` of them) or, with incremental
    streaming output, the new ones only; both are read here."""
    entries = list(meta.get("output_token_logprobs") or ())
    tops = list(meta.get("output_top_logprobs") or ())
    cumulative = len(entries) == meta.get("completion_tokens", len(entries)) >= sent
    start = sent if cumulative else 0
    new = tuple(tuple(e) for e in entries[start:])
    top = tuple(tuple(tuple(a) for a in (t or ())) for t in tops[start : start + len(new)])
    return new, top


def stream_chunk_from_sglang(
    chunk: Mapping[str, Any], previous_text: str = "", sent_logprobs: int = 0
) -> StreamChunk:
    """Convert one SGLang stream chunk; without a "delta" key the delta is the cumulative
    text past `previous_text`, and logprobs are those past the `sent_logprobs` already sent."""
    meta = chunk.get("meta_info", {})
    finished = meta.get("finish_reason") is not None
    text = chunk.get("text", "")
    delta = chunk.get("delta")
    if delta is None:
        delta = text[len(previous_text) :] if text.startswith(previous_text) else text
    new, top = new_logprobs(meta, sent_logprobs)
    return StreamChunk(
        delta=delta,
        text=text,
        output_ids=tuple(chunk.get("output_ids", ())),
        finish_reason=finish_fields(meta)[0] if finished else None,
        usage=usage_from_meta(meta) if finished else None,
        meta_info=dict(meta),
        output_token_logprobs=new,
        output_top_logprobs=top,
    )


def continuation_score(
    text: str, token_ids: Sequence[int], token_logprobs: Sequence[float | None]
) -> ContinuationScore:
    """Sum and mean over the tokens that have a logprob (a prompt's first token has none)."""
    pairs = [(t, lp) for t, lp in zip(token_ids, token_logprobs, strict=True) if lp is not None]
    total = sum(lp for _, lp in pairs)
    n = len(pairs)
    return ContinuationScore(
        text=text,
        logprob_sum=total,
        logprob_mean=total / n if n else float("-inf"),
        num_tokens=n,
        token_ids=tuple(t for t, _ in pairs),
        token_logprobs=tuple(lp for _, lp in pairs),
    )
