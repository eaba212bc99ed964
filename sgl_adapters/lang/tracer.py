"""Tracing: run a program without a model and record its generation calls as a CallGraph.

The program runs on a `TracingExecutor` (no worker thread): text, roles and forks behave as
in a real run, but each `gen`/`select` records the prompt it would be sent and yields the
placeholder `{name}`. The recorded prompts become a `CallGraph` (shared prefixes found by a
trie over tokens when the backend has a tokenizer), the same graph the LangChain and DSPy
adapters build. Leaf metadata: `program` (index in the batch), `name`, `kind` ("gen" or
"select") and `depends_on` (names of earlier calls whose output is part of the prompt: such
leaves are not runnable before those calls finish).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sgl_adapters.graph import CallGraph
from sgl_adapters.lang import chat_template as templates
from sgl_adapters.lang import ir
from sgl_adapters.lang.interpreter import StreamExecutor, run_program


@dataclass(frozen=True)
class TracedCall:
    program: int
    prompt: str
    name: str | None
    kind: str
    sampling_params: Mapping[str, Any] = field(default_factory=dict)
    choices: tuple[str, ...] | None = None
    method: str | None = None
    depends_on: tuple[str, ...] = ()


class TraceRecorder:
    """Stands in for a backend during tracing; collects `TracedCall`s (lock-protected)."""

    def __init__(self, backend: Any = None) -> None:
        self.tokenizer = getattr(backend, "tokenizer", None)
        self.chat_template = backend.get_chat_template() if backend is not None else templates.PLAIN
        self.calls: list[TracedCall] = []
        self.program = 0
        self._placeholders: dict[str, str] = {}
        self._lock = threading.Lock()

    def get_chat_template(self) -> templates.ChatTemplate:
        return self.chat_template

    def cache_prefix(self, prefixes: Any) -> None:
        return None

    def record(self, prompt: str, name: str | None, kind: str, **fields: Any) -> str:
        placeholder = "{" + (name or kind) + "}"
        with self._lock:
            deps = tuple(n for n, p in self._placeholders.items() if p in prompt)
            self.calls.append(
                TracedCall(self.program, prompt, name, kind, depends_on=deps, **fields)
            )
            if name is not None:
                self._placeholders[name] = placeholder
        return placeholder


class TracingExecutor(StreamExecutor):
    """Executes text, roles and forks; records gen/select on its `TraceRecorder` backend."""

    def _gen(self, expr: ir.Gen) -> None:
        params = expr.params.merged_over(self.defaults)
        n = params.n or 1
        sp = {k: v for k, v in params.sampling_params().items() if k != "n"}
        values = [self.backend.record(self.text_, expr.name, "gen", sampling_params=sp)]
        values += [
            self.backend.record(self.text_, expr.name, "gen", sampling_params=sp)
            for _ in range(n - 1)
        ]
        self.text_ += values[0]
        self._set_var(expr.name, values if n > 1 else values[0], None)

    def _select(self, expr: ir.Select) -> None:
        value = self.backend.record(
            self.text_, expr.name, "select", choices=expr.choices, method=repr(expr.method)
        )
        self.text_ += value
        self._set_var(expr.name, value, None)


def trace_calls(
    func: Callable[..., Any],
    batch_kwargs: Sequence[Mapping[str, Any]],
    backend: Any,
    defaults: ir.GenParams,
    strict: bool = True,
) -> list[TracedCall]:
    """The calls of each program `func(s, **kwargs)`; with `strict`, a program that raises
    while tracing raises here, else its calls so far are kept."""
    recorder = TraceRecorder(backend)
    for i, kwargs in enumerate(batch_kwargs):
        recorder.program = i
        state = run_program(
            func,
            recorder,
            (),
            dict(kwargs),
            defaults,
            use_thread=False,
            executor_cls=TracingExecutor,
        )
        error = state.stream_executor.error_
        if strict and error is not None:
            raise error
    return recorder.calls


def calls_to_graph(calls: Sequence[TracedCall], tokenizer: Any = None) -> CallGraph:
    """A CallGraph with one leaf per call (leaf i is call i)."""
    graph = CallGraph()
    if not calls:
        return graph
    base = CallGraph.from_prompts([c.prompt for c in calls], tokenizer)
    for node in base.nodes[1:]:
        graph.add_node(node.parent, node.text, token_ids=node.token_ids)
    for leaf, call in zip(base.leaves, calls, strict=True):
        meta = {
            "program": call.program,
            "name": call.name,
            "kind": call.kind,
            "depends_on": list(call.depends_on),
        }
        if call.method is not None:
            meta["choices_method"] = call.method
        graph.add_leaf(leaf.node, dict(call.sampling_params), choices=call.choices, metadata=meta)
    return graph


def trace_program(
    func: Callable[..., Any],
    batch_kwargs: Sequence[Mapping[str, Any]],
    backend: Any,
    defaults: ir.GenParams,
) -> CallGraph:
    tokenizer = getattr(backend, "tokenizer", None)
    return calls_to_graph(trace_calls(func, batch_kwargs, backend, defaults), tokenizer)


def warm_shared_prefixes(
    func: Callable[..., Any],
    batch_kwargs: Sequence[Mapping[str, Any]],
    backend: Any,
    defaults: ir.GenParams,
    min_tokens: int = 4,
) -> int:
    """Prefill the prefixes shared by the programs' first runnable calls, one prefill-only
    request per wave (parents first). Returns the number of prefixes warmed."""
    calls = trace_calls(func, batch_kwargs, backend, defaults, strict=False)
    prompts = [c.prompt for c in calls if not c.depends_on and c.prompt]
    if len(prompts) < 2:
        return 0
    tokenizer = getattr(backend, "tokenizer", None)
    graph = CallGraph.from_prompts(prompts, tokenizer)
    warmed = 0
    for wave in graph.shared_prefix_waves():
        if tokenizer is not None:
            batch: list[Any] = [graph.prompt_ids(n) for n in wave]
        else:
            batch = [graph.prompt_text(n) for n in wave]
        batch = [p for p in batch if len(p) >= min_tokens]
        if batch:
            backend.cache_prefix(batch)
            warmed += len(batch)
    return warmed


_ARG_MARK = "\ue000"


def extract_prefix(
    func: Callable[..., Any],
    arg_names: Sequence[str],
    bound: Mapping[str, Any],
    backend: Any,
) -> str:
    """The text a program always starts with: what it adds before its first generation call
    and before the first argument not in `bound` (traced with marker strings in their place;
    a program that fails on a marker keeps the text before the failure)."""
    kwargs = {n: bound.get(n, f"{_ARG_MARK}{n}{_ARG_MARK}") for n in arg_names}
    recorder = TraceRecorder(backend)
    state = run_program(
        func,
        recorder,
        (),
        kwargs,
        ir.GenParams(),
        use_thread=False,
        executor_cls=TracingExecutor,
    )
    text = recorder.calls[0].prompt if recorder.calls else state.stream_executor.text_
    return text.split(_ARG_MARK, 1)[0]
