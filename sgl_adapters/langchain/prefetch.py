"""One engine submission for a whole `batch`/`abatch`.

`batch` renders every input's request first and submits them together (so the engine
prefills a shared prefix once), then lets LangChain's own `batch` run each input as usual
(callbacks, tracing, return_exceptions); each `_generate` takes its result from the
submission instead of submitting again. The submission is published through a context
variable, which LangChain's batch executor copies into its worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from contextvars import ContextVar

from sgl_adapters.engines import EngineClient, Request

_CURRENT: ContextVar[BatchSubmission | None] = ContextVar("sgl_batch_submission", default=None)


def _key(client: EngineClient, request: Request) -> tuple:
    return id(client.backend), request.prompt, json.dumps(request.params, sort_keys=True)


class BatchSubmission:
    """Requests submitted together; results are claimed once each. Thread-safe (a lock
    guards the claim table)."""

    def __init__(self, client: EngineClient, requests: Sequence[Request]) -> None:
        self._lock = threading.Lock()
        self._slots: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            self._slots.setdefault(_key(client, request), []).append(i)
        self.future: Future = Future()
        threading.Thread(
            target=self._run, args=(client, list(requests)), name="sgl-lc-batch", daemon=True
        ).start()

    def _run(self, client: EngineClient, requests: list[Request]) -> None:
        try:
            self.future.set_result(client.generate(requests))
        except BaseException as exc:  # noqa: BLE001 -- claimants fall back to their own call
            self.future.set_exception(exc)

    def claim(self, client: EngineClient, request: Request) -> int | None:
        with self._lock:
            slots = self._slots.get(_key(client, request))
            return slots.pop(0) if slots else None

    def result(self, index: int) -> dict | None:
        """The result at `index`, or None when the submission failed as a whole."""
        try:
            return self.future.result()[index]
        except Exception:  # noqa: BLE001
            return None

    async def aresult(self, index: int) -> dict | None:
        try:
            return (await asyncio.wrap_future(self.future))[index]
        except Exception:  # noqa: BLE001
            return None


@contextlib.contextmanager
def submitted(client: EngineClient, requests: Sequence[Request]) -> Iterator[None]:
    """Submit `requests` now and publish them to `take` calls in this context."""
    token = _CURRENT.set(BatchSubmission(client, requests) if len(requests) > 1 else None)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def take(client: EngineClient, request: Request) -> dict | None:
    """The batch's result for `request`, if the current batch submitted it."""
    batch = _CURRENT.get()
    index = batch.claim(client, request) if batch is not None else None
    return None if index is None else batch.result(index)


async def atake(client: EngineClient, request: Request) -> dict | None:
    batch = _CURRENT.get()
    index = batch.claim(client, request) if batch is not None else None
    return None if index is None else await batch.aresult(index)
