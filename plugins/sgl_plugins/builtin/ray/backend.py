"""The `ray` backend: engine replicas as Ray actors behind a cache- and graph-aware router.

Ray is imported when a backend is built, never at import time. The router runs in the caller's
process (`sgl_plugins.routing`); each routing unit (a group of leaves sharing a CallGraph node,
or one leaf with the non-graph policies) goes to one replica, and the leaves a replica gets
from one graph travel as one sub-graph, so it prefills their shared nodes once.

Replica failure: a replica whose actor dies is removed from the router (and its part of the
prefix tree forgotten); the leaves it had in flight are routed again and re-run on the live
replicas (generation restarts from the prompt, so no partial output is lost or duplicated). A
stream that already yielded chunks cannot be resumed and fails with `ReplicaDiedError`. When
no replica is left, calls fail with `NoReplicaError`. Dead replicas are not restarted.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from sgl_plugins.backend import (
    CAPABILITIES,
    BackendBase,
    ContinuationScore,
    StreamChunk,
)
from sgl_plugins.routing import (
    Decision,
    NoReplicaError,
    Router,
    RouterConfig,
    Unit,
    graph_units,
    subgraph,
)

DEFAULT_INIT = {"include_dashboard": False, "configure_logging": False}
NUMERIC_RATIOS = ("hit_rate", "kv_usage")


class ReplicaDiedError(RuntimeError):
    """A replica died while streaming to the caller; the partial output cannot be resumed."""


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ImportError("the 'ray' backend needs Ray: pip install 'sgl-adapters[ray]'") from exc
    return ray


class RayBackend(BackendBase):
    """`replicas` engine actors of (model_path, engine_kwargs), routed by `policy` (one of
    `sgl_plugins.routing.POLICIES`). Thread-safe: the router locks; Ray handles are shared.

    `ray_init`: keyword arguments for `ray.init` when Ray is not initialised yet (default: a
    local cluster without dashboard). `replica_options`: Ray actor options per replica
    (default one CPU, one GPU when engine_kwargs ask for device="cuda"). `max_concurrency`:
    calls a replica serves at once (its engine batches them).
    """

    capabilities = CAPABILITIES

    def __init__(
        self,
        model_path: str | None = None,
        *,
        replicas: int = 2,
        engine_kwargs: Mapping[str, Any] | None = None,
        policy: str = "graph_aware",
        router_config: RouterConfig | None = None,
        replica_options: Mapping[str, Any] | None = None,
        max_concurrency: int = 256,
        ray_init: Mapping[str, Any] | None = None,
        chat_template: str | None = None,
        name: str = "ray",
        **engine_config: Any,
    ) -> None:
        ray = import_ray()
        self.name = name
        self.chat_template = chat_template
        self._ray = ray
        self._closed = False
        self._tokenizer: Any = None
        self._lock = threading.Lock()
        kwargs = {**dict(engine_kwargs or {}), **engine_config}
        self.router = Router(replicas, router_config or RouterConfig(policy=policy))
        if not ray.is_initialized():
            ray.init(**{**DEFAULT_INIT, **dict(ray_init or {})})
        from sgl_plugins.builtin.ray.replica import Replica

        options = dict(replica_options or _default_options(kwargs))
        actor_class = ray.remote(Replica).options(max_concurrency=max_concurrency, **options)
        self.replicas = [actor_class.remote(i, model_path, kwargs) for i in range(replicas)]
        self.pids = dict(ray.get([r.ready.remote() for r in self.replicas]))

    # -- the Backend protocol ---------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = self._call_any(lambda actor: actor.tokenizer.remote())
            return self._tokenizer

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )

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
            decision = self.router.route(key, (key,))
            actor = self.replicas[decision.replica]
            sent = 0
            try:
                for ref in actor.stream.options(num_returns="streaming").remote(
                    prompt, sampling_params, leaf
                ):
                    chunk = self._ray.get(ref)
                    sent += 1
                    yield dataclasses.replace(
                        chunk, meta_info={**chunk.meta_info, "replica": decision.replica}
                    )
                return
            except self._ray.exceptions.RayActorError as exc:
                self._lost(decision.replica)
                if sent:
                    raise ReplicaDiedError(
                        f"replica {decision.replica} of backend {self.name!r} died after "
                        f"streaming {sent} chunk(s); a stream cannot be resumed elsewhere"
                    ) from exc
            finally:
                self.router.release(decision.replica)

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
        per = dict(
            zip(live, ray.get([self.replicas[r].metrics.remote() for r in live]), strict=True)
        )
        total: dict[str, Any] = {}
        for metrics in per.values():
            for key, value in metrics.items():
                if isinstance(value, int | float) and key not in NUMERIC_RATIOS:
                    total[key] = total.get(key, 0) + value
        prompt = total.get("prompt_tokens", 0)
        total["hit_rate"] = total.get("cached_tokens", 0) / prompt if prompt else 0.0
        kv_total = total.get("kv_total", 0)
        total["kv_usage"] = total.get("kv_used", 0) / kv_total if kv_total else 0.0
        total["replicas"] = per
        total["router"] = self.router.stats()
        return total

    def close(self) -> None:
        """Stop the engines and kill the actors; Ray itself stays up. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        ray = self._ray
        for r in list(self.router.live):
            try:
                ray.get(self.replicas[r].shutdown.remote(), timeout=30)
            except Exception:  # noqa: BLE001 -- killed below either way
                pass
        for actor in self.replicas:
            ray.kill(actor)

    # -- routing and failure ------------------------------------------------------------------

    def _run_units(self, graph: Any, units: Sequence[Unit], results: dict[int, Any]) -> list[Unit]:
        """Route `units`, run one sub-graph per replica, store results by leaf id; returns the
        units of replicas that died (to route again)."""
        by_replica: dict[int, list[Unit]] = {}
        for unit in units:
            decision: Decision = self.router.route(unit.key, unit.prompts, len(unit.leaves))
            by_replica.setdefault(decision.replica, []).append(unit)
        calls = []
        for replica, group in by_replica.items():
            leaf_ids = sorted(i for unit in group for i in unit.leaves)
            sub, original = subgraph(graph, leaf_ids)
            calls.append((replica, group, original, self.replicas[replica].run_graph.remote(sub)))
        retry: list[Unit] = []
        for replica, group, original, ref in calls:
            weight = sum(len(u.leaves) for u in group)
            try:
                outs = self._ray.get(ref)
            except self._ray.exceptions.RayActorError:
                self._lost(replica)
                retry.extend(group)
                continue
            finally:
                self.router.release(replica, weight)
            for leaf_id, out in zip(original, outs, strict=True):
                leaf = graph.leaf(leaf_id)
                results[leaf_id] = dataclasses.replace(
                    out,
                    leaf_id=leaf_id,
                    metadata=leaf.metadata,
                    meta_info={**out.meta_info, "replica": replica},
                )
        return retry

    def _routed_call(self, key: Sequence[int], call: Any) -> Any:
        while True:
            decision = self.router.route(key, (key,))
            try:
                return self._ray.get(call(self.replicas[decision.replica]))
            except self._ray.exceptions.RayActorError:
                self._lost(decision.replica)
            finally:
                self.router.release(decision.replica)

    def _call_any(self, call: Any) -> Any:
        for replica in list(self.router.live):
            try:
                return self._ray.get(call(self.replicas[replica]))
            except self._ray.exceptions.RayActorError:
                self._lost(replica)
        raise NoReplicaError(f"no live replica left in backend {self.name!r}")

    def _lost(self, replica: int) -> None:
        self.router.remove(replica)

    def _tokens(self, prompt: str | Sequence[int]) -> tuple[int, ...]:
        if isinstance(prompt, str):
            return tuple(self.tokenizer.encode(prompt))
        return tuple(int(t) for t in prompt)


def _default_options(engine_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    device = str(engine_kwargs.get("device", ""))
    if device.startswith("cuda"):
        return {"num_cpus": 1, "num_gpus": int(engine_kwargs.get("tp_size", 1))}
    return {"num_cpus": 1}
