"""An example sgl-adapters plugin: the `reverse` backend and the `plain` chat template.

The backend answers each leaf with its prompt reversed, cut to `max_new_tokens` characters and
at the first `stop` string. It has no tokenizer (graphs share prefixes by characters); a
character counts as a token, and within one graph the part of a leaf's prompt that belongs to
nodes already run counts as cached, the way an engine with a prefix cache would report it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jinja2
from sgl_plugins.backend import BackendBase, StreamChunk
from sgl_plugins.graph import CallGraph, Leaf, LeafResult, Usage
from sgl_plugins.hookspecs import hookimpl

PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


class ReverseBackend(BackendBase):
    """Deterministic, model-free; `metrics()` counts prefill characters across calls."""

    name = "reverse"
    capabilities = frozenset({"generate", "stream", "chat_template", "prefix_dedup"})
    tokenizer = None

    def __init__(self, chat_template: str | None = None) -> None:
        self._template = jinja2.Environment().from_string(chat_template or PLAIN_TEMPLATE)
        self._lock = threading.Lock()
        self._prefill = 0
        self._cached = 0

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=tools
        )

    def run_graph(self, graph: CallGraph) -> list[LeafResult]:
        seen: set[int] = set()
        results = []
        for leaf in graph.leaves:
            path = graph.path(leaf.node)
            cached = sum(len(_text(n)) for n in path if n.id in seen)
            seen.update(n.id for n in path)
            results.append(self._answer(leaf, "".join(_text(n) for n in path), cached))
        return results

    def stream(
        self, prompt: str | Sequence[int], sampling_params: Mapping[str, Any] | None = None, **leaf
    ) -> Iterator[StreamChunk]:
        result = self.generate(prompt, sampling_params, **leaf)
        for i, ch in enumerate(result.text):
            yield StreamChunk(ch, result.text[: i + 1])
        yield StreamChunk("", result.text, (), result.finish_reason, result.usage)

    def metrics(self) -> dict[str, Any]:
        with self._lock:
            return {"prefill_tokens": self._prefill, "cached_tokens": self._cached}

    def _answer(self, leaf: Leaf, prompt: str, cached: int) -> LeafResult:
        if leaf.constraint is not None:
            raise ValueError(f"the reverse backend cannot decode under {leaf.constraint[0]}")
        params = leaf.sampling_params
        text = prompt[::-1][: int(params.get("max_new_tokens", 128))]
        reason, matched = ("length" if len(text) < len(prompt) else "stop"), None
        stops = params.get("stop") or []
        for stop in [stops] if isinstance(stops, str) else stops:
            at = text.find(stop)
            if at >= 0:
                text, reason, matched = text[:at], "stop", stop
        with self._lock:
            self._prefill += len(prompt) - cached
            self._cached += cached
        usage = Usage(len(prompt), len(text), cached)
        return LeafResult(
            leaf.id, text, (), reason, usage, matched_stop=matched, metadata=leaf.metadata
        )


def _text(node: Any) -> str:
    if node.text is None:
        raise ValueError("the reverse backend runs text graphs only (it has no tokenizer)")
    return node.text


@hookimpl
def register_backends(register: Any) -> None:
    register("reverse", ReverseBackend, ReverseBackend.capabilities, description="echo, reversed")


@hookimpl
def register_chat_templates(register: Any) -> None:
    register("plain", PLAIN_TEMPLATE, description="role: content lines")
