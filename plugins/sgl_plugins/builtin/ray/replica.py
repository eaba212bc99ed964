"""One replica: the body of a Ray actor holding an in-process engine (through `LocalBackend`).

Runs inside the actor's process; Ray calls its methods from up to `max_concurrency` threads at
once, which the engine batches together (it is thread-safe). Nothing here imports Ray.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any


class Replica:
    """An engine replica. `run_graph`, `stream`, `score` go through the local backend (so a
    sub-graph's shared nodes are prefilled once); `generate`/`generate_stream` pass raw engine
    requests through (for the HTTP server over replicas)."""

    def __init__(self, index: int, model_path: str | None, engine_kwargs: Mapping[str, Any]):
        from sgl_plugins.builtin.local import LocalBackend

        self.index = index
        self.backend = LocalBackend(model_path, name=f"ray-replica-{index}", **engine_kwargs)
        self._running = threading.Event()
        self._running.set()

    def ready(self) -> tuple[int, int]:
        """(replica index, process id) once the engine has loaded."""
        return self.index, os.getpid()

    def health(self) -> str | None:
        """The engine's `health()`: None while it can serve, else why not (a dead
        tensor-parallel rank or engine process, a shut-down engine) -- the actor itself may be
        alive. Mutates nothing."""
        return self.backend.engine.health()

    def engine_pids(self) -> list[int]:
        """The engine's processes beyond this actor (a `ProcessEngine`'s child, then its
        follower ranks); empty for an in-process engine."""
        return list(getattr(self.backend.engine, "pids", []))

    def tokenizer(self) -> Any:
        return self.backend.tokenizer

    def context_length(self) -> int:
        return int(self.backend.engine.context_length)

    def hf_config(self) -> Any:
        return self.backend.engine.hf_config

    def run_graph(self, graph: Any) -> list[Any]:
        self._running.wait()
        return self.backend.run_graph(graph)

    def stream(
        self, prompt: str | Sequence[int], sampling_params: Mapping[str, Any] | None, leaf: dict
    ) -> Iterator[Any]:
        self._running.wait()
        yield from self.backend.stream(prompt, sampling_params, **leaf)

    def score(self, prefix: str, continuations: Sequence[str]) -> list[Any]:
        self._running.wait()
        return self.backend.score(prefix, continuations)

    def generate(self, request: dict[str, Any]) -> Any:
        self._running.wait()
        return self.backend.engine.generate(**request)

    def generate_stream(self, request: dict[str, Any]) -> Iterator[dict]:
        self._running.wait()
        yield from self.backend.engine.generate(stream=True, **request)

    def abort(self, rid: str) -> None:
        self.backend.engine.abort(rid)

    def metrics(self) -> dict[str, Any]:
        return self.backend.metrics()

    def flush_cache(self) -> bool:
        return bool(self.backend.engine.flush_cache())

    def shutdown(self) -> None:
        self.backend.close()

    def _hang_for_tests(self) -> None:
        """Make later calls that run requests block until this actor is killed (a hung
        replica, for the call-deadline tests; a restarted actor runs again)."""
        self._running.clear()
