"""A replica whose engine dies while its Ray actor lives: 2 replicas of a tiny random model, each
a tensor-parallel engine (tp_size=2 on the CPU, gloo: the engine's rank 0 in a child process of
the actor, rank 1 in another). Killing one of those processes leaves the actor alive and every
request it gets aborted; the backend asks the replica's health, kills the actor so that Ray
restarts it with a fresh engine, and re-runs the request on the other replica. Ordinary aborts
(a client's, an invalid constraint) leave a healthy replica alone. The health monitor is off
here (health_interval_s=None), so the calls alone find each dead engine; the monitor is
test_ray_monitor.py's. One cluster and one backend (max_restarts=2) for the module; the tests run in order and the last one uses the last
restarts."""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest

ray = pytest.importorskip("ray")

from ray_support import back, engine_pids  # noqa: E402
from sgl_engine.testing import wait_until  # noqa: E402
from sgl_plugins.graph import CallGraph  # noqa: E402

pytestmark = pytest.mark.timeout(300)  # nothing may hang

GREEDY = {"max_new_tokens": 6, "temperature": 0}
# tp_timeout_s: a rank that hangs fails its engine in 30 s, well inside the test timeout
ENGINE = {"device": "cpu", "max_total_tokens": 4096, "tp_size": 2, "tp_timeout_s": 30}


@pytest.fixture(scope="module")
def backend(tiny_llama):
    from sgl_plugins.builtin.ray import RayBackend

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    b = RayBackend(
        tiny_llama, replicas=2, engine_kwargs=ENGINE, max_restarts=2, health_interval_s=None
    )
    yield b
    b.close()
    ray.shutdown()


def test_ordinary_aborts_leave_a_healthy_replica_live(backend):
    from sgl_plugins.builtin.ray import ReplicatedEngine

    router, replica_set = backend.router, backend.replica_set
    assert [len(engine_pids(backend, r)) for r in (0, 1)] == [2, 2]  # tp_size=2: child, rank 1
    graph = CallGraph.from_prompts(["Say yes or no:"], None, GREEDY, regex="((unclosed")
    (bad,) = backend.run_graph(graph)
    assert bad.finish_reason == "abort" and "invalid constraint" in bad.error

    engine = ReplicatedEngine(backend)
    assert engine.health() is None
    long = {"max_new_tokens": 100000, "temperature": 0, "ignore_eos": True}
    out: dict = {}
    worker = threading.Thread(
        target=lambda: out.update(engine.generate(prompt="Go on", sampling_params=long, rid="r1"))
    )
    worker.start()
    wait_until(lambda: any(m["running"] for m in backend.metrics()["replicas"].values()))
    engine.abort("r1")
    worker.join(timeout=60)
    reason = out["meta_info"]["finish_reason"]
    assert reason == {"type": "abort", "message": "aborted by client"}

    assert router.live == [0, 1] and replica_set.restarts == [0, 0] and not router.down
    assert [ray.get(r.health.remote()) for r in backend.replicas] == [None, None]


def test_a_killed_tp_rank_takes_its_replica_out_and_its_requests_rerun(backend):
    router, replica_set = backend.router, backend.replica_set
    assert backend.flush_cache()  # empty trees: "room" sends the first unit to replica 0
    old = engine_pids(backend, 0)
    os.kill(old[1], signal.SIGKILL)  # rank 1 of replica 0: its actor and rank 0 live on
    prompts = [f"{w} was asked {i} times" for i, w in enumerate("ABCD")]
    results = backend.run_graph(CallGraph.from_prompts(prompts, backend.tokenizer, GREEDY))
    assert all(r.error is None and r.finish_reason == "length" for r in results)
    assert {r.meta_info["replica"] for r in results} == {1}  # replica 0's leaves re-ran
    assert replica_set.restarts == [1, 0]
    down = router.down.get(0, "")  # (empty when the restart was already taken back)
    assert not down or f"tensor-parallel rank 1 (pid {old[1]})" in down

    wait_until(lambda: back(backend, 0, old))  # Ray restarted it with a fresh engine
    served = backend.run_graph(CallGraph.from_prompts(["Zed is new"], backend.tokenizer, GREEDY))
    assert served[0].meta_info["replica"] == 0 and served[0].error is None

    # A stream whose replica's engine process (rank 0's) is dead is re-sent before any chunk.
    old = engine_pids(backend, 1)
    os.kill(old[0], signal.SIGKILL)
    chunks = list(backend.stream(prompts[0], GREEDY))  # cached on replica 1: routed there
    assert {c.meta_info["replica"] for c in chunks} == {0}
    assert chunks[-1].finish_reason == "length" and replica_set.restarts == [1, 1]
    wait_until(lambda: back(backend, 1, old))


def test_the_server_over_replicas_serves_while_one_can_and_503s_when_none_can(backend):
    """`serve --dp 2`: a request (streamed, then not) to a dead engine is re-sent; when every
    engine is dead past max_restarts, the request fails and /health answers 503 saying why."""
    import httpx
    from sgl_engine.server.app import create_app
    from sgl_engine.server.launch import ServerThread
    from sgl_plugins.builtin.ray import ReplicatedEngine

    router, replica_set = backend.router, backend.replica_set
    engine = ReplicatedEngine(backend)
    params = {"max_new_tokens": 3, "temperature": 0}
    with ServerThread(create_app(engine, model_name="tiny")) as server:
        client = httpx.Client(base_url=server.base_url, timeout=120)
        assert client.get("/health").status_code == 200
        assert backend.flush_cache()
        old = engine_pids(backend, 0)
        os.kill(old[1], signal.SIGKILL)
        body = {"text": "Anyone home?", "sampling_params": params, "stream": True}
        with client.stream("POST", "/generate", json=body) as response:
            lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert response.status_code == 200 and lines[-1] == "[DONE]"
        chunks = [json.loads(line) for line in lines[:-1]]
        assert {c["meta_info"]["replica"] for c in chunks} == {1}  # re-sent before any chunk
        assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
        assert replica_set.restarts == [2, 1]
        wait_until(lambda: back(backend, 0, old))

        # Both engines dead: replica 0 is past max_restarts=2, replica 1 has one restart left,
        # so the request waits for it and is served; its next death leaves nothing live.
        old = engine_pids(backend, 1)
        for replica in (0, 1):
            os.kill(engine_pids(backend, replica)[1], signal.SIGKILL)
        body = {"text": "Last call", "sampling_params": params}
        late = client.post("/generate", json=body)
        assert late.status_code == 200 and late.json()["meta_info"]["replica"] == 1
        assert replica_set.restarts == [2, 2] and "max_restarts=2 reached" in router.down[0]
        assert engine.health() is None  # replica 1 is live again
        wait_until(lambda: back(backend, 1, old))
        os.kill(engine_pids(backend, 1)[0], signal.SIGKILL)
        assert client.post("/generate", json=body).status_code >= 500
        assert router.live == [] and "max_restarts=2 reached" in engine.health()
        health = client.get("/health")
        assert health.status_code == 503 and "max_restarts=2 reached" in health.text
