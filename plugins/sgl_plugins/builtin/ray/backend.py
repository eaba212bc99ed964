"""The `ray` backend: engine replicas as Ray actors behind a cache- and graph-aware router.

Ray is imported when a backend is built, never at import time. The router runs in the caller's
process (`sgl_plugins.routing`); each routing unit (a group of leaves sharing a CallGraph node,
or one leaf with the non-graph policies) goes to one replica, and the leaves a replica gets
from one graph travel as one sub-graph, so it prefills their shared nodes once.

Replica failure: a replica whose actor dies is removed from the router (and its part of the
prefix tree forgotten); the leaves it had in flight are routed again and re-run on the live
replicas (generation restarts from the prompt, so no partial output is lost or duplicated). A
stream that already yielded chunks cannot be resumed and fails with `ReplicaDiedError`. Ray
restarts the dead replica (up to `max_restarts` times) and the router takes it back, with an
empty tree, once its engine answers (`replica_set.py`). With `call_timeout_s`, a call (or a
stream's wait for its next chunk) that takes longer counts as a hung replica: its actor is
killed (and restarted) and its leaves re-routed. When no replica is live, calls wait for one
that is restarting and fail with `NoReplicaError`, saying why each is out, when none is.

A replica whose engine died while its actor lives (a killed tensor-parallel rank) answers with
aborts: a call whose result holds an abort no client asked for, or that raised inside the
actor, asks the replica's health (`ReplicaSet.check`). An unhealthy replica is killed (Ray
restarts it with a fresh engine) and the call handled as if the replica had died: a
sub-graph's leaves and a score are re-run elsewhere, a stream that yielded nothing is re-sent,
and a stream that already yielded chunks ends with the engine's abort chunk. A healthy
replica's abort (a constraint, a full KV cache) or error is the caller's result, as before.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from sgl_plugins.backend import (
    CAPABILITIES,
    BackendBase,
    ContinuationScore,
    StreamChunk,
    finish_fields,
)
from sgl_plugins.builtin.ray.replica_set import (
    DEFAULT_HEALTH_INTERVAL_S,
    DEFAULT_MAX_RESTARTS,
    ReplicaPool,
    request_error,
    suspect,
)
from sgl_plugins.routing import Decision, Router, RouterConfig, Unit, graph_units, subgraph

NUMERIC_RATIOS = ("hit_rate", "kv_usage")


class ReplicaDiedError(RuntimeError):
    """A replica died while streaming to the caller; the partial output cannot be resumed."""


class _Hung(Exception):
    """A call to a replica missed `call_timeout_s`."""


class RayBackend(BackendBase):
    """`replicas` engine actors of (model_path, engine_kwargs), routed by `policy` (one of
    `sgl_plugins.routing.POLICIES`). Thread-safe: the router locks; Ray handles are shared.

    `ray_init`: keyword arguments for `ray.init` when Ray is not initialised yet (default: a
    local cluster without dashboard). `replica_options`: Ray actor options per replica
    (default one CPU, one GPU when engine_kwargs ask for device="cuda"). `max_concurrency`:
    calls a replica serves at once (its engine batches them). `max_restarts`: how often Ray
    restarts a replica that died (0: never). `call_timeout_s`: the deadline of one call to a
    replica (a sub-graph, a score, the wait for a stream's next chunk); a replica missing it
    is treated as hung (killed, restarted) and the call re-routed. None (default): no
    deadline, because one sub-graph may legitimately decode for minutes; set it above your
    longest call. Per backend, not part of the shared replica set. `health_interval_s`: how
    often the replica set's health monitor asks every live replica's engine whether it can
    serve (default 10 s; 0 or None: never, a dead engine is then found only by a call); part
    of the shared set, like `max_restarts`.
    """

    capabilities = CAPABILITIES

    def __init__(
        self,
        model_path: str | None = None,
        *,
        model: str | None = None,
        replicas: int = 2,
        engine_kwargs: Mapping[str, Any] | None = None,
        policy: str = "graph_aware",
        router_config: RouterConfig | None = None,
        replica_options: Mapping[str, Any] | None = None,
        max_concurrency: int = 256,
        ray_init: Mapping[str, Any] | None = None,
        max_restarts: int = DEFAULT_MAX_RESTARTS,
        call_timeout_s: float | None = None,
        health_interval_s: float | None = DEFAULT_HEALTH_INTERVAL_S,
        chat_template: str | None = None,
        pool: ReplicaPool | None = None,
        name: str = "ray",
        **engine_config: Any,
    ) -> None:
        """Get the replica set of these arguments from `pool` (a private one when None);
        `model` is an alias of `model_path`, extra keywords are engine config."""
        if model is not None and model_path is not None and model != model_path:
            raise ValueError("give model_path or model, not both")
        self.name = name
        self.model_name = model_path if model_path is not None else model
        self.chat_template = chat_template
        if call_timeout_s is not None and call_timeout_s <= 0:
            raise ValueError("call_timeout_s must be > 0 (or None: no deadline)")
        self.call_timeout_s = call_timeout_s
        self._closed = False
        self._lock = threading.Lock()
        self._pool = pool if pool is not None else ReplicaPool()
        self._key, self.replica_set = self._pool.acquire(
            model_path if model_path is not None else model,
            num_replicas=replicas,
            engine_kwargs={**dict(engine_kwargs or {}), **engine_config},
            router_config=router_config or RouterConfig(policy=policy),
            replica_options=replica_options,
            max_concurrency=max_concurrency,
            ray_init=ray_init,
            max_restarts=max_restarts,
            health_interval_s=health_interval_s,
        )
        self._ray = self.replica_set.ray

    @property
    def router(self) -> Router:
        return self.replica_set.router

    @property
    def replicas(self) -> list[Any]:
        """The Ray actor handles, by replica index."""
        return self.replica_set.replicas

    # -- the Backend protocol ---------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.replica_set.tokenizer

    def run_graph(self, graph: Any) -> list[Any]:
        if not len(graph):
            return []
        units = graph_units(graph, self.tokenizer, grouped=self.router.config.graph_aware)
        results: dict[int, Any] = {}
        pending = units
        while pending:
            pending = self._run_units(graph, pending, results)
        return [results[leaf.id] for leaf in graph.leaves]

    def stream(
        self, prompt: str | Sequence[int], sampling_params: Mapping[str, Any] | None = None, **leaf
    ) -> Iterator[StreamChunk]:
        key = self._tokens(prompt)
        while True:
            decision = self._route(key, (key,))
            actor = self.replicas[decision.replica]
            sent = 0
            try:
                refs = actor.stream.options(num_returns="streaming").remote(
                    prompt, sampling_params, leaf
                )
                while (ref := self._next(refs)) is not None:
                    chunk = self._ray.get(ref)
                    message = finish_fields(chunk.meta_info)[2]
                    if suspect(chunk.finish_reason, message) and self._unhealthy(decision):
                        if not sent:
                            break  # nothing yielded yet: re-send it to a live replica
                    sent += 1
                    yield dataclasses.replace(
                        chunk, meta_info={**chunk.meta_info, "replica": decision.replica}
                    )
                else:
                    return
            except self._ray.exceptions.RayTaskError as exc:
                if request_error(exc) or not self._unhealthy(decision) or sent:
                    raise
            except (self._ray.exceptions.RayActorError, _Hung) as exc:
                self._lost(decision, exc)
                if sent:
                    raise ReplicaDiedError(
                        f"replica {decision.replica} of backend {self.name!r} "
                        f"{'hung' if isinstance(exc, _Hung) else 'died'} after streaming "
                        f"{sent} chunk(s); a stream cannot be resumed elsewhere"
                    ) from exc
            finally:
                self.router.release(decision.replica, epoch=decision.epoch)

    def score(self, prefix: str, continuations: Sequence[str]) -> list[ContinuationScore]:
        if not continuations:
            return []
        key = self._tokens(prefix)
        return self._routed_call(key, lambda actor: actor.score.remote(prefix, continuations))

    def metrics(self) -> dict[str, Any]:
        """Counters summed over the live replicas (ratios recomputed), each replica's own
        counters under "replicas", and the router's state under "router"."""
        ray = self._ray
        live = list(self.router.live)
        metrics = ray.get([self.replicas[r].metrics.remote() for r in live])
        per = dict(zip(live, metrics, strict=True))
        total = sum_metrics(per.values())
        total["replicas"] = per
        total["router"] = self.router.stats()
        return total

    def flush_cache(self) -> bool:
        """Drop every live replica's radix cache and the router's prefix tree; False (and the
        tree kept) when a replica refused because requests were in flight."""
        live = list(self.router.live)
        ok = all(self._ray.get([self.replicas[r].flush_cache.remote() for r in live]))
        if ok:
            self.router.forget(live)
        return ok

    def close(self) -> None:
        """Drop this backend's reference to its replica set (the last one stops the engines
        and kills the actors; Ray itself stays up). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.release(self._key)

    # -- routing and failure ------------------------------------------------------------------

    def _run_units(self, graph: Any, units: Sequence[Unit], results: dict[int, Any]) -> list[Unit]:
        """Route `units`, run one sub-graph per replica, store results by leaf id; returns the
        units of replicas that died or whose engine did (to route again). Each replica's
        routed load is released exactly once, whatever is raised."""
        by_replica: dict[int, list[Unit]] = {}
        epochs: dict[int, Decision] = {}
        unreleased: dict[int, int] = {}  # replica -> leaves routed to it, not yet released
        try:
            for unit in units:
                decision: Decision = self._route(unit.key, unit.prompts, len(unit.leaves))
                by_replica.setdefault(decision.replica, []).append(unit)
                epochs[decision.replica] = decision
                unreleased[decision.replica] = unreleased.get(decision.replica, 0) + len(
                    unit.leaves
                )
            calls = []
            for replica, group in by_replica.items():
                leaf_ids = sorted(i for unit in group for i in unit.leaves)
                sub, original = subgraph(graph, leaf_ids)
                ref = self.replicas[replica].run_graph.remote(sub)
                calls.append((replica, group, original, ref))
            deadline = self._deadline()
            retry: list[Unit] = []
            for replica, group, original, ref in calls:
                decision = epochs[replica]
                try:
                    outs = self._get(ref, deadline)
                except (self._ray.exceptions.RayActorError, _Hung) as exc:
                    self._lost(decision, exc)
                    retry.extend(group)
                    continue
                except self._ray.exceptions.RayTaskError as exc:
                    if request_error(exc) or not self._unhealthy(decision):
                        raise
                    retry.extend(group)
                    continue
                finally:
                    self.router.release(replica, unreleased.pop(replica), decision.epoch)
                if any(suspect(o.finish_reason, o.error) for o in outs) and self._unhealthy(
                    decision
                ):
                    retry.extend(group)  # its engine is dead: every leaf of the group runs again
                    continue
                for leaf_id, out in zip(original, outs, strict=True):
                    leaf = graph.leaf(leaf_id)
                    results[leaf_id] = dataclasses.replace(
                        out,
                        leaf_id=leaf_id,
                        metadata=leaf.metadata,
                        meta_info={**out.meta_info, "replica": replica},
                    )
            return retry
        finally:  # a call that raised (or a route that failed) left the others counted
            for replica, weight in unreleased.items():
                self.router.release(replica, weight, epochs[replica].epoch)

    def _routed_call(self, key: Sequence[int], call: Any) -> Any:
        while True:
            decision = self._route(key, (key,))
            try:
                return self._get(call(self.replicas[decision.replica]), self._deadline())
            except (self._ray.exceptions.RayActorError, _Hung) as exc:
                self._lost(decision, exc)
            except self._ray.exceptions.RayTaskError as exc:
                if request_error(exc) or not self._unhealthy(decision):
                    raise
            finally:
                self.router.release(decision.replica, epoch=decision.epoch)

    def _route(self, key: Sequence[int], prompts: Any, weight: int = 1) -> Decision:
        """Route, waiting (up to `call_timeout_s`) for a restarting replica if none is live."""
        return self.router.route(key, prompts, weight, wait_s=self.call_timeout_s)

    def _deadline(self) -> float | None:
        return None if self.call_timeout_s is None else time.monotonic() + self.call_timeout_s

    def _get(self, ref: Any, deadline: float | None) -> Any:
        """`ray.get(ref)` by `deadline` (monotonic), else `_Hung`."""
        if deadline is None:
            return self._ray.get(ref)
        try:
            return self._ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
        except self._ray.exceptions.GetTimeoutError:
            raise _Hung from None

    def _next(self, refs: Any) -> Any:
        """The stream's next chunk ref (None at its end), waiting at most `call_timeout_s`."""
        if self.call_timeout_s is not None:
            ready, _ = self._ray.wait([refs], timeout=self.call_timeout_s)
            if not ready:
                raise _Hung
        return next(refs, None)

    def _lost(self, decision: Decision, exc: BaseException) -> None:
        """Take the replica of a failed call out of routing (a hung one is also killed)."""
        if isinstance(exc, _Hung):
            self.replica_set.hung(decision.replica, decision.epoch, self.call_timeout_s or 0)
        else:
            self.replica_set.lost(decision.replica, decision.epoch)

    def _unhealthy(self, decision: Decision) -> bool:
        """After an abort or error from the replica of `decision`: whether its engine cannot
        serve (then it is out of routing, and killed for Ray to restart; `ReplicaSet.check`)."""
        return self.replica_set.check(decision.replica, decision.epoch) is not None

    def _tokens(self, prompt: str | Sequence[int]) -> tuple[int, ...]:
        if isinstance(prompt, str):
            return tuple(self.tokenizer.encode(prompt))
        return tuple(int(t) for t in prompt)


def sum_metrics(per_replica: Any) -> dict[str, Any]:
    """Numeric counters summed over replicas, hit_rate and kv_usage recomputed."""
    total: dict[str, Any] = {}
    for metrics in per_replica:
        for key, value in metrics.items():
            if isinstance(value, int | float) and key not in NUMERIC_RATIOS:
                total[key] = total.get(key, 0) + value
    prompt = total.get("prompt_tokens", 0)
    total["hit_rate"] = total.get("cached_tokens", 0) / prompt if prompt else 0.0
    kv_total = total.get("kv_total", 0)
    total["kv_usage"] = total.get("kv_used", 0) / kv_total if kv_total else 0.0
    return total


class RayBackendFactory:
    """The `ray` factory: every backend it builds shares its `ReplicaPool`, so equal arguments
    share one replica set; `close()` shuts the pool down."""

    def __init__(self, pool: ReplicaPool | None = None) -> None:
        self.pool = pool if pool is not None else ReplicaPool()

    def __call__(
        self, model_path: str | None = None, *, model: str | None = None, **kwargs: Any
    ) -> RayBackend:
        kwargs.setdefault("pool", self.pool)
        return RayBackend(model_path, model=model, **kwargs)

    def close(self) -> None:
        self.pool.close()
