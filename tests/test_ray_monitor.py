"""The `ray` backend's health monitor finds a dead engine with no traffic: 2 replicas of a tiny
random model, each a tensor-parallel engine (tp_size=2 on the CPU, as in test_ray_health.py:
rank 0 in a child process of the actor, rank 1 in another), `health_interval_s=0.2`,
`max_restarts=1`. Killing one of those processes leaves the actor alive with an engine that
cannot serve. No request is sent: the monitor alone takes the replica out, Ray restarts it, the
router takes it back, and `ReplicatedEngine.health()` (what /health of `serve --dp` reports)
turns to the reason once no replica can serve. One cluster and one backend for the module;
the tests run in order and the second one spends the last restarts."""

from __future__ import annotations

import threading
import time

import pytest

ray = pytest.importorskip("ray")

from ray_support import back, kill_rank  # noqa: E402
from sgl_engine.testing import wait_until  # noqa: E402

pytestmark = pytest.mark.timeout(300)  # nothing may hang

# tp_timeout_s: a rank that hangs fails its engine in 30 s, well inside the test timeout
ENGINE = {"device": "cpu", "max_total_tokens": 4096, "tp_size": 2, "tp_timeout_s": 30}
INTERVAL_S = 0.2


@pytest.fixture(scope="module")
def backend(tiny_llama):
    from sgl_plugins.builtin.ray import RayBackend

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    b = RayBackend(
        tiny_llama, replicas=2, engine_kwargs=ENGINE, max_restarts=1, health_interval_s=INTERVAL_S
    )
    yield b
    b.close()
    ray.shutdown()


def monitors() -> list[threading.Thread]:
    """Live monitor threads (other modules' sets may still have theirs: a set that a front
    door never released lives until its Ray session ends)."""
    return [t for t in threading.enumerate() if t.name == "ray-health"]


def test_the_monitor_restarts_a_dead_engine_without_traffic(backend):
    from sgl_plugins.builtin.ray import ReplicatedEngine

    replica_set, router = backend.replica_set, backend.router
    engine = ReplicatedEngine(backend)
    assert replica_set.monitor in monitors() and replica_set.monitor.daemon
    old = kill_rank(backend, 0)
    wait_until(lambda: replica_set.restarts == [1, 0])  # taken out, actor killed by the monitor
    assert engine.health() is None  # replica 1 still serves
    wait_until(lambda: back(backend, 0, old))
    time.sleep(5 * INTERVAL_S)  # more rounds: a healthy replica is left alone
    assert replica_set.restarts == [1, 0] and router.live == [0, 1] and engine.health() is None
    per = backend.metrics()["replicas"]
    assert per[0]["prompt_tokens"] == per[1]["prompt_tokens"] == 0  # no traffic was sent


def test_health_reports_the_reason_once_no_engine_can_serve(backend):
    from sgl_plugins.builtin.ray import ReplicatedEngine

    replica_set, router = backend.replica_set, backend.router
    engine = ReplicatedEngine(backend)
    kill_rank(backend, 0)  # past max_restarts=1: it stays out
    old = kill_rank(backend, 1)  # its one restart
    wait_until(lambda: replica_set.restarts == [1, 1] and back(backend, 1, old))
    assert router.live == [1] and engine.health() is None
    assert "engine cannot serve: tensor-parallel rank 1" in router.down[0]
    assert "max_restarts=1 reached" in router.down[0]

    kill_rank(backend, 1)
    wait_until(lambda: engine.health() is not None)
    assert router.live == [] and "replica 1: engine cannot serve" in engine.health()
    assert "max_restarts=1 reached" in router.down[1]


def test_the_monitor_stops_when_the_backend_is_released(backend):
    monitor = backend.replica_set.monitor
    assert monitor.is_alive()
    backend.close()  # the last reference: the set shuts down
    assert not monitor.is_alive() and monitor not in monitors()


def test_health_answers_while_every_request_thread_is_busy(backend, tiny_llama, monkeypatch):
    """Health calls have their own concurrency group: a replica whose only request thread is
    blocked still answers them at once, so neither `check` nor the monitor takes it for hung.
    (Runs on the CPUs the released backend freed; a fresh set, monitor off.)"""
    from sgl_plugins.builtin.ray import ReplicaSet, replica_set
    from sgl_plugins.graph import CallGraph
    from sgl_plugins.routing import RouterConfig

    monkeypatch.setattr(replica_set, "HEALTH_CALL_S", 3.0)  # a queued health call fails fast
    engine = {**ENGINE, "tp_size": 1}
    busy = ReplicaSet(
        tiny_llama, 1, engine, RouterConfig(), max_concurrency=1, health_interval_s=None
    )
    try:
        assert busy.monitor is None
        actor = busy.replicas[0]
        ray.get(actor._hang_for_tests.remote())
        blocked = actor.run_graph.remote(CallGraph.from_prompts(["Wait"], None, {}))
        assert ray.wait([blocked], timeout=0.5)[0] == []  # the one request thread is taken
        assert busy.sweep() == [] and busy.check(0, 0) is None
        assert busy.router.live == [0] and busy.restarts == [0]
    finally:
        ray.kill(busy.replicas[0], no_restart=True)
        busy.shutdown()


def test_a_negative_health_interval_is_refused(tiny_llama):
    from sgl_plugins.builtin.ray import RayBackend

    with pytest.raises(ValueError, match="health_interval_s"):
        RayBackend(tiny_llama, replicas=1, engine_kwargs=ENGINE, health_interval_s=-1)
