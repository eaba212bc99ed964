"""`ReplicatedEngine`: a `RayBackend`'s replicas behind the engine interface the HTTP server
uses (`async_generate`, `abort`, `metrics`, `flush_cache`, `tokenizer`, ...), so
`sgl-adapters serve --dp N` is the ordinary server over N Ray replicas.

Routing: one HTTP request (a prompt, or a list of prompts sent together) is one unit, routed
by its prompts' common token prefix with the backend's router -- a batch sharing a prefix is
prefilled once, on one replica. A replica that dies before answering (or, with the
backend's `call_timeout_s`, does not answer a non-streamed request in time) is taken out of
routing (and restarted by Ray, see `replica_set.py`) and the request re-sent to another; a
stream that already sent chunks fails (it cannot be resumed). A replica whose engine died while
its actor lives (its requests end as aborts no client asked for, or raise) is found by asking
its health (`ReplicaSet.check`), killed for Ray to restart, and handled the same way, except
that a stream that already sent chunks ends with the engine's abort chunk; the replica set's
health monitor finds one with no traffic. `health()` is None while some replica is live, so
`/health` turns 503 when none can serve.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from sgl_engine.inputs import GenerateRequest

from sgl_plugins.backend import finish_fields
from sgl_plugins.builtin.ray.backend import RayBackend, ReplicaDiedError
from sgl_plugins.builtin.ray.replica_set import request_error, suspect
from sgl_plugins.routing import NoReplicaError, prompt_units


class ReplicatedEngine:
    """Engine-shaped front of `backend`'s replicas. Owns nothing: `shutdown` closes the
    backend only when `owns_backend` is set. Thread- and task-safe (the router locks)."""

    def __init__(self, backend: RayBackend, owns_backend: bool = False) -> None:
        self.backend = backend
        self.owns_backend = owns_backend
        self.model_path = backend.model_name
        self.config = None
        replicas = backend.replica_set
        self.context_length = replicas.call_any(lambda actor: actor.context_length.remote())
        self.hf_config = replicas.call_any(lambda actor: actor.hf_config.remote())

    @property
    def tokenizer(self) -> Any:
        return self.backend.tokenizer

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None
    ) -> str:
        return self.backend.apply_chat_template(messages, add_generation_prompt, tools)

    async def async_generate(self, *args: Any, **kwargs: Any) -> Any:
        """`Engine.async_generate` (same arguments: `GenerateRequest`) on the replica the
        router picks for this request."""
        request = GenerateRequest(*args, **kwargs)
        key, prompts = self._routing_key(request)
        if request.stream:
            return self._stream(request.forwarded(), key, prompts)
        return await self._generate(request.forwarded(), key, prompts)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        import asyncio

        return asyncio.run(self.async_generate(*args, **kwargs))

    def abort(self, rid: str) -> None:
        """Abort `rid` wherever it runs (sent to every live replica; unknown ids are ignored)."""
        for r in list(self.backend.router.live):
            self.backend.replicas[r].abort.remote(rid)

    def health(self) -> str | None:
        """None while a replica is live (routed to), else why none is (`NoReplicaError`'s
        message): what the server's /health reports. Reads the router; mutates nothing."""
        return self.backend.router.unavailable()

    def metrics(self) -> dict[str, Any]:
        return self.backend.metrics()

    def flush_cache(self) -> bool:
        return self.backend.flush_cache()

    def shutdown(self) -> None:
        if self.owns_backend:
            self.backend.close()

    # -- internals ------------------------------------------------------------------------------

    async def _generate(self, request: dict, key: tuple[int, ...], prompts: list) -> Any:
        ray = self.backend._ray
        router = self.backend.router
        timeout = self.backend.call_timeout_s
        replicas = self.backend.replica_set
        while True:
            decision = await self._route(key, prompts, max(1, len(prompts)))
            ref = self.backend.replicas[decision.replica].generate.remote(request)
            try:
                out = await asyncio.wait_for(asyncio.ensure_future(ref), timeout)
            except TimeoutError:
                replicas.hung(decision.replica, decision.epoch, timeout or 0)
                continue
            except ray.exceptions.RayActorError:
                replicas.lost(decision.replica, decision.epoch)
                continue
            except ray.exceptions.RayTaskError as exc:
                if request_error(exc) or not await self._unhealthy(decision):
                    raise _cause(exc) from None
                continue
            finally:
                router.release(decision.replica, max(1, len(prompts)), decision.epoch)
            if any(map(_suspect, out if isinstance(out, list) else [out])):
                if await self._unhealthy(decision):
                    continue  # its engine is dead: the whole request again, elsewhere
            return _tag(out, decision.replica)

    async def _stream(
        self, request: dict, key: tuple[int, ...], prompts: list
    ) -> AsyncIterator[dict]:
        ray = self.backend._ray
        router = self.backend.router
        while True:
            decision = await self._route(key, prompts)
            actor = self.backend.replicas[decision.replica]
            sent = 0
            try:
                refs = actor.generate_stream.options(num_returns="streaming").remote(request)
                async for ref in refs:
                    chunk = await ref
                    if _suspect(chunk) and await self._unhealthy(decision) and not sent:
                        break  # nothing sent yet: re-send it to a live replica
                    sent += 1
                    yield _tag(chunk, decision.replica)
                else:
                    return
            except ray.exceptions.RayActorError as exc:
                self.backend.replica_set.lost(decision.replica, decision.epoch)
                if sent:
                    raise ReplicaDiedError(
                        f"replica {decision.replica} died after {sent} chunk(s)"
                    ) from exc
            except ray.exceptions.RayTaskError as exc:
                if request_error(exc) or not await self._unhealthy(decision) or sent:
                    raise _cause(exc) from None
            finally:
                router.release(decision.replica, epoch=decision.epoch)

    async def _route(self, key: tuple[int, ...], prompts: list, weight: int = 1) -> Any:
        """Route at once while a replica is live, else wait (in a thread) for a restart."""
        router = self.backend.router
        if router.live:
            try:
                return router.route(key, prompts, weight)
            except NoReplicaError:
                pass
        return await asyncio.to_thread(
            router.route, key, prompts, weight, wait_s=self.backend.call_timeout_s
        )

    async def _unhealthy(self, decision: Any) -> bool:
        """`ReplicaSet.check` (one blocking Ray call) in a thread: True when the replica's
        engine cannot serve (it is then out of routing and being restarted)."""
        check = self.backend.replica_set.check
        return await asyncio.to_thread(check, decision.replica, decision.epoch) is not None

    def _routing_key(
        self, request: GenerateRequest
    ) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
        """The common token prefix of the request's prompts, and the prompts."""
        seqs, _ = request.prompts()
        if request.prompt is not None:
            seqs = [self.tokenizer.encode(t) for t in seqs]
        if not seqs:
            return (), []
        prompts = [tuple(int(t) for t in s) for s in seqs]
        units = prompt_units(prompts)
        return (units[0].key if len(units) == 1 else prompts[0]), prompts


def _tag(out: Any, replica: int) -> Any:
    if isinstance(out, list):
        return [_tag(o, replica) for o in out]
    return {**out, "meta_info": {**out.get("meta_info", {}), "replica": replica}}


def _suspect(out: dict) -> bool:
    kind, _, message = finish_fields(out.get("meta_info", {}))
    return suspect(kind, message)


def _cause(exc: Exception) -> Exception:
    """The exception raised inside the actor (InvalidRequestError keeps its HTTP meaning)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, Exception) else exc
