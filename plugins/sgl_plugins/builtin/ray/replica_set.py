"""A set of engine replicas (Ray actors of one model and engine config) with the router in
front of them, and the pool that shares sets between backends.

`ReplicaPool` keys sets by (model, engine config, replica count, routing config, actor
options) and counts references, like the `local` backend's `EnginePool`: front doors that ask
the same `ray` backend by name share one set of actors (weights load once per replica). The
last `release` of a set shuts its engines down and kills its actors; Ray itself stays up.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from sgl_plugins.builtin.local import EnginePool
from sgl_plugins.routing import NoReplicaError, Router, RouterConfig

DEFAULT_INIT = {"include_dashboard": False, "configure_logging": False}


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ImportError("the 'ray' backend needs Ray: pip install 'sgl-adapters[ray]'") from exc
    return ray


class ReplicaSet:
    """`num_replicas` actors each holding an engine, and a `Router` over them. Thread-safe:
    the router locks, the tokenizer is fetched once under a lock, Ray handles are shared."""

    def __init__(
        self,
        model_path: str | None,
        num_replicas: int,
        engine_kwargs: Mapping[str, Any],
        router_config: RouterConfig,
        replica_options: Mapping[str, Any] | None = None,
        max_concurrency: int = 256,
        ray_init: Mapping[str, Any] | None = None,
    ) -> None:
        ray = import_ray()
        if not ray.is_initialized():
            ray.init(**{**DEFAULT_INIT, **dict(ray_init or {})})
        from sgl_plugins.builtin.ray.replica import Replica

        self.ray = ray
        self.router = Router(num_replicas, router_config)
        options = dict(replica_options or default_options(engine_kwargs))
        actor = ray.remote(Replica).options(max_concurrency=max_concurrency, **options)
        kwargs = dict(engine_kwargs)
        self.replicas = [actor.remote(i, model_path, kwargs) for i in range(num_replicas)]
        self.pids = dict(ray.get([r.ready.remote() for r in self.replicas]))
        self._lock = threading.Lock()
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = self.call_any(lambda actor: actor.tokenizer.remote())
            return self._tokenizer

    def call_any(self, call: Any) -> Any:
        """`call(actor)` on the first live replica that answers."""
        for replica in list(self.router.live):
            try:
                return self.ray.get(call(self.replicas[replica]))
            except self.ray.exceptions.RayActorError:
                self.router.remove(replica)
        raise NoReplicaError("no live replica left")

    def shutdown(self) -> None:
        """Stop the engines, kill the actors (nothing to do once Ray itself is shut down)."""
        if not self.ray.is_initialized():
            return
        for r in list(self.router.live):
            try:
                self.ray.get(self.replicas[r].shutdown.remote(), timeout=30)
            except Exception:  # noqa: BLE001 -- killed below either way
                pass
        for actor in self.replicas:
            self.ray.kill(actor)


class ReplicaPool(EnginePool):
    """Reference-counted `ReplicaSet`s: the local plugin's `EnginePool` with sets for engines.
    `acquire`/`release`/`close` mutate under the pool's lock; a set starts under it, so two
    threads asking for the same set get one."""

    def __init__(self) -> None:
        super().__init__(ReplicaSet)

    def acquire(self, model_path: str | None, **spec: Any) -> tuple[Any, ReplicaSet]:
        return super().acquire(model_path, spec)


def default_options(engine_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """One CPU per replica; on CUDA also one GPU per tensor-parallel rank."""
    if str(engine_kwargs.get("device", "")).startswith("cuda"):
        return {"num_cpus": 1, "num_gpus": int(engine_kwargs.get("tp_size", 1))}
    return {"num_cpus": 1}
