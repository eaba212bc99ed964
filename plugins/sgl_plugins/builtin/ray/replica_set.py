"""A set of engine replicas (Ray actors of one model and engine config) with the router in
front of them, and the pool that shares sets between backends.

`ReplicaPool` keys sets by (model, engine config, replica count, routing config, actor
options) and counts references, like the `local` backend's `EnginePool`: front doors that ask
the same `ray` backend by name share one set of actors (weights load once per replica). The
last `release` of a set shuts its engines down and kills its actors; Ray itself stays up.

Restarts are Ray's: each actor is created with `max_restarts` (and `max_task_retries=0`: the
backend re-routes a failed call itself, to a live replica, rather than waiting for the
restart). When a call sees a replica die (`lost`) or miss its deadline (`hung`: the actor is
killed so that Ray restarts it), the router stops routing to it and a `ready` probe is sent;
when the probe answers (Ray queues nothing for a restarting actor: an "actor is restarting"
answer is probed again shortly), the router takes the replica back with an empty prefix tree.
Once Ray gives up (`ActorDiedError`, after `max_restarts` restarts) the replica stays out.

An engine can die while its actor lives (a tensor-parallel rank or the engine's process
killed): its requests then end as aborts. A call that ends in an abort not asked for by a
client, or in an error, asks the replica's `health()` (`check`); a replica whose engine cannot
serve is lost like a hung one -- killed, so that Ray restarts it with a fresh engine. An abort
of a healthy replica (a constraint that cannot be met, a full KV cache) changes nothing.

So that an engine that dies while idle is found without traffic (and `/health` of
`serve --dp` turns 503 when none can serve), a health monitor -- one daemon thread per set,
like sgl-router's periodic worker checks -- asks every live replica's health each
`health_interval_s` (`sweep`) and takes out, as `check` does, each one that is unhealthy, dead
or does not answer. It stops when the set shuts down. Health calls run in the actor's own
"health" concurrency group, so a replica whose `max_concurrency` request threads are all busy
still answers them (it is not mistaken for a hung one).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from sgl_engine.errors import CLIENT_ABORT, InvalidRequestError

from sgl_plugins.builtin.local import EnginePool
from sgl_plugins.routing import NoReplicaError, Router, RouterConfig

DEFAULT_INIT = {"include_dashboard": False, "configure_logging": False}
DEFAULT_MAX_RESTARTS = 3
PROBE_INTERVAL_S = 0.2
HEALTH_CALL_S = 60.0  # a ProcessEngine bounds its own health() at 20 s
DEFAULT_HEALTH_INTERVAL_S = 10.0
HEALTH_GROUP = "health"  # the actors' concurrency group for health calls
MONITOR_JOIN_S = 10.0

logger = logging.getLogger(__name__)


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ImportError("the 'ray' backend needs Ray: pip install 'sgl-adapters[ray]'") from exc
    return ray


class ReplicaSet:
    """`num_replicas` actors each holding an engine, and a `Router` over them. Thread-safe:
    the router locks, the tokenizer is fetched once under a lock of its own, Ray handles are
    shared;
    `lost`/`hung` and the probes' callbacks (on Ray's threads) update the router and
    `restarts`/`pids` under the set's lock. `max_restarts`: restarts Ray may make of each
    replica (0: never). `health_interval_s`: seconds between the health monitor's rounds
    (`sweep`, on a daemon thread started here and stopped by `shutdown`); 0 or None: no
    monitor, a dead engine is then found only by a call that ends in an abort or error."""

    def __init__(
        self,
        model_path: str | None,
        num_replicas: int,
        engine_kwargs: Mapping[str, Any],
        router_config: RouterConfig,
        replica_options: Mapping[str, Any] | None = None,
        max_concurrency: int = 256,
        ray_init: Mapping[str, Any] | None = None,
        max_restarts: int = DEFAULT_MAX_RESTARTS,
        health_interval_s: float | None = DEFAULT_HEALTH_INTERVAL_S,
    ) -> None:
        if max_restarts < 0:
            raise ValueError("max_restarts must be >= 0")
        if health_interval_s is not None and health_interval_s < 0:
            raise ValueError("health_interval_s must be >= 0 (0 or None: no health monitor)")
        ray = import_ray()
        if not ray.is_initialized():
            ray.init(**{**DEFAULT_INIT, **dict(ray_init or {})})
        from sgl_plugins.builtin.ray.replica import Replica

        self.ray = ray
        self.router = Router(num_replicas, router_config)
        options = dict(replica_options or default_options(engine_kwargs))
        actor = ray.remote(concurrency_groups={HEALTH_GROUP: 2})(Replica).options(
            max_concurrency=max_concurrency,
            max_restarts=max_restarts,
            max_task_retries=0,
            **options,
        )
        kwargs = dict(engine_kwargs)
        self.max_restarts = max_restarts
        self.restarts = [0] * num_replicas
        self.replicas = [actor.remote(i, model_path, kwargs) for i in range(num_replicas)]
        self.pids = dict(ray.get([r.ready.remote() for r in self.replicas]))
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()  # not _lock: fetching it may call `lost`
        self._closed = False
        self._tokenizer: Any = None
        self._stop = threading.Event()
        self.monitor: threading.Thread | None = None
        if health_interval_s:
            self.monitor = threading.Thread(
                target=self._watch, args=(health_interval_s,), name="ray-health", daemon=True
            )
            self.monitor.start()

    @property
    def tokenizer(self) -> Any:
        with self._tokenizer_lock:
            if self._tokenizer is None:
                self._tokenizer = self.call_any(lambda actor: actor.tokenizer.remote())
            return self._tokenizer

    def call_any(self, call: Any) -> Any:
        """`call(actor)` on the first live replica that answers."""
        for replica in list(self.router.live):
            epoch = self.router.epochs[replica]
            try:
                return self.ray.get(call(self.replicas[replica]))
            except self.ray.exceptions.RayActorError:
                self.lost(replica, epoch)
        raise NoReplicaError(f"no live replica answered (router: {self.router.stats()['down']})")

    def lost(self, replica: int, epoch: int, why: str = "died", kill: bool = False) -> bool:
        """A call routed to `replica` in `epoch` saw it die (or, with `kill`, hang: its actor
        is killed here): take it out of routing and, while restarts remain, wait for Ray's
        restart. False when another call saw it first."""
        with self._lock:
            if self._closed:
                return False
            used, limit = self.restarts[replica], self.max_restarts
            restart = used < limit
            if restart:
                reason = f"{why}; restarting (restart {used + 1} of max_restarts={limit})"
            else:
                reason = f"{why}; not restarted: max_restarts={limit} reached"
            if not self.router.remove(replica, reason, epoch=epoch, restarting=restart):
                return False
            if restart:
                self.restarts[replica] += 1
            old_pid = self.pids.get(replica) if kill else None
        if kill:
            self.ray.kill(self.replicas[replica], no_restart=not restart)
        if restart:
            self._probe(replica, old_pid)
        return True

    def hung(self, replica: int, epoch: int, timeout_s: float) -> None:
        """A call to `replica` missed its `timeout_s` deadline: treat it as hung -- out of
        routing, and its actor killed (Ray restarts it while restarts remain)."""
        self.lost(replica, epoch, f"missed a {timeout_s:g}s call deadline", kill=True)

    def check(self, replica: int, epoch: int) -> str | None:
        """A call routed to `replica` in `epoch` ended in an abort or an error: ask its engine's
        health. Unhealthy: take it out and kill its actor (as `lost(..., kill=True)`; Ray
        restarts it with a fresh engine) and return why; healthy: None, nothing changes (the
        abort was the request's own). A replica that dies meanwhile is `lost`; one that does
        not answer in `HEALTH_CALL_S` is treated as hung. Blocks on one Ray call; locks and
        mutates as `lost`."""
        return self._judge(replica, epoch, self._ask_health(replica), HEALTH_CALL_S)

    def sweep(self) -> list[int]:
        """One round of the health monitor: ask every live replica's health at once (one Ray
        call each, all answered within `HEALTH_CALL_S`) and handle each answer as `check` does,
        in the epoch the replica was live in when asked (a replica taken out and back
        meanwhile is left alone). Returns the replicas found dead, hung or unhealthy. Holds no lock during a Ray
        call; locks and mutates as `lost`."""
        live = self.router.live_epochs()
        refs = [self._ask_health(r) for r, _ in live]
        deadline = time.monotonic() + HEALTH_CALL_S
        out = []
        for (replica, epoch), ref in zip(live, refs, strict=True):
            wait_s = max(0.0, deadline - time.monotonic())
            if self._judge(replica, epoch, ref, wait_s) is not None:
                out.append(replica)
        return out

    def _ask_health(self, replica: int) -> Any:
        return self.replicas[replica].health.options(concurrency_group=HEALTH_GROUP).remote()

    def _judge(self, replica: int, epoch: int, ref: Any, timeout_s: float) -> str | None:
        """Wait up to `timeout_s` for the health answer `ref` of `replica` (asked in `epoch`):
        dead, hung or unhealthy takes it out (`lost`); returns why, None when healthy."""
        try:
            why = self.ray.get(ref, timeout=timeout_s)
        except self.ray.exceptions.RayActorError:
            self.lost(replica, epoch)
            return "died"
        except self.ray.exceptions.GetTimeoutError:
            self.hung(replica, epoch, HEALTH_CALL_S)
            return "hung"
        if why is not None:
            self.lost(replica, epoch, f"engine cannot serve: {why}", kill=True)
        return why

    def _watch(self, interval_s: float) -> None:
        """The monitor thread: a `sweep` every `interval_s` until `shutdown`, or until the Ray
        session it was started in ends (a set still referenced when Ray shuts down, say by a
        front door that never released it, must not go on calling dead handles)."""
        job = self.ray.get_runtime_context().get_job_id()
        while not self._stop.wait(interval_s):
            if not self.ray.is_initialized() or self.ray.get_runtime_context().get_job_id() != job:
                return
            try:
                taken = self.sweep()
            except Exception:  # noqa: BLE001 -- Ray going down; the next round tries again
                if self._stop.is_set():
                    return
                logger.exception("replica health round failed")
                continue
            if taken:
                down = self.router.stats()["down"]
                logger.warning("health monitor took out replica(s) %s: %s", taken, down)

    def _probe(self, replica: int, old_pid: int | None = None) -> None:
        """Ask the restarting `replica` whether it is up; an answer from `old_pid` (the
        process killed for hanging, not dead yet) does not count."""
        if self._closed:
            return
        ref = self.replicas[replica].ready.remote()
        ref.future().add_done_callback(lambda f: self._probed(replica, old_pid, f))

    def _probed(self, replica: int, old_pid: int | None, future: Any) -> None:
        """On a Ray thread: the probe of a restarting replica answered."""
        if self._closed:
            return
        exc = future.exception()
        if exc is None and future.result()[1] != old_pid:
            with self._lock:
                self.pids[replica] = future.result()[1]
            self.router.restore(replica)
        elif exc is None or isinstance(exc, self.ray.exceptions.ActorUnavailableError):
            _later(PROBE_INTERVAL_S, lambda: self._probe(replica, old_pid))
        else:
            self.router.give_up(
                replica,
                f"dead, not restarted by Ray (max_restarts={self.max_restarts}): "
                f"{str(exc).splitlines()[0]}",
            )

    def shutdown(self) -> None:
        """Stop the health monitor and the engines, kill the actors (nothing to do once Ray
        itself is shut down), then wait (bounded) for the monitor thread to end."""
        with self._lock:
            self._closed = True
        self._stop.set()
        if self.ray.is_initialized():
            for r in list(self.router.live):
                try:
                    self.ray.get(self.replicas[r].shutdown.remote(), timeout=30)
                except Exception:  # noqa: BLE001 -- killed below either way
                    pass
            for actor in self.replicas:
                self.ray.kill(actor)
        if self.monitor is not None and self.monitor is not threading.current_thread():
            self.monitor.join(MONITOR_JOIN_S)  # its pending health calls fail with the kills


class ReplicaPool(EnginePool):
    """Reference-counted `ReplicaSet`s: the local plugin's `EnginePool` with sets for engines.
    `acquire`/`release`/`close` mutate under the pool's lock; a set starts under it, so two
    threads asking for the same set get one."""

    def __init__(self) -> None:
        super().__init__(ReplicaSet)

    def acquire(self, model_path: str | None, **spec: Any) -> tuple[Any, ReplicaSet]:
        return super().acquire(model_path, spec)


def suspect(finish_reason: str | None, message: str | None) -> bool:
    """Whether a result finished so (type, abort message) may come from a dead engine:
    an abort a client did not ask for (`ReplicaSet.check` decides)."""
    return finish_reason == "abort" and message != CLIENT_ABORT


def request_error(exc: BaseException) -> bool:
    """Whether a call failed through its request's fault (an `InvalidRequestError` raised in
    the actor: no reason to doubt the replica)."""
    return isinstance(getattr(exc, "cause", None), InvalidRequestError)


def _later(delay_s: float, call: Callable[[], None]) -> None:
    timer = threading.Timer(delay_s, call)
    timer.daemon = True
    timer.start()


def default_options(engine_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """One CPU per replica; on CUDA also one GPU per tensor-parallel rank."""
    if str(engine_kwargs.get("device", "")).startswith("cuda"):
        return {"num_cpus": 1, "num_gpus": int(engine_kwargs.get("tp_size", 1))}
    return {"num_cpus": 1}
