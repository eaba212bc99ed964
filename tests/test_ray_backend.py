"""The `ray` backend on a local Ray cluster (2 CPUs, no dashboard) with 2 replicas of a tiny
random model: the Backend protocol, graph-aware placement of shared prefixes, a hung replica
missing the call deadline, and a replica killed mid-request, restarted by Ray, and killed past
`max_restarts`. One cluster and one backend (max_restarts=4) for the module (starting them is
most of its time); the failure tests run last, in order: hanging replica 0 three times (a
graph, a stream, an HTTP-server request) uses its first three restarts, the kill its fourth,
the next kill leaves it out."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest

ray = pytest.importorskip("ray")

from sgl_plugins.backend import Backend  # noqa: E402
from sgl_plugins.graph import CallGraph  # noqa: E402
from sgl_plugins.manager import PluginManager, get_backend  # noqa: E402

GREEDY = {"max_new_tokens": 6, "temperature": 0}
ENGINE = {"device": "cpu", "max_total_tokens": 4096}
PREFIX = (
    "The quick brown fox jumps over the lazy dog. A radix tree shares prefixes between keys. "
    "Question: What is the capital of France? Answer:"
)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def manager():
    pm = PluginManager({}, entry_points=lambda: []).load()
    yield pm
    pm.close()


@pytest.fixture(scope="module")
def ray_kwargs(tiny_model):
    return {"replicas": 2, "model_path": tiny_model, "engine_kwargs": ENGINE, "max_restarts": 4}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from sgl_engine.testing import make_tiny_model_dir

    return str(make_tiny_model_dir(tmp_path_factory.mktemp("ray") / "llama"))


@pytest.fixture(scope="module")
def backend(cluster, ray_kwargs):
    """From the process-wide plugin manager, so front doors asking for "ray" with the same
    arguments share these two actors."""
    b = get_backend("ray", **ray_kwargs)
    yield b
    b.close()


@pytest.fixture(scope="module")
def local(manager, tiny_model):
    b = manager.get_backend("local", model_path=tiny_model, **ENGINE)
    yield b
    b.close()


def counters(backend) -> tuple[int, int]:
    m = backend.metrics()
    return m["prefill_tokens"], m["cached_tokens"]


def test_the_protocol_through_ray_matches_the_local_engine(backend, local):
    assert isinstance(backend, Backend) and backend.name == "ray"
    prompts = ["Question: What is two plus two?", "Large language models", "0123456789 abc"]
    graph = CallGraph.from_prompts(prompts, backend.tokenizer, GREEDY)
    ours = backend.run_graph(graph)
    ref = local.run_graph(CallGraph.from_prompts(prompts, local.tokenizer, GREEDY))
    assert [r.output_ids for r in ours] == [r.output_ids for r in ref]
    assert [r.leaf_id for r in ours] == [0, 1, 2]
    one = backend.generate(prompts[0], GREEDY)
    assert one.output_ids == ref[0].output_ids and one.usage.cached_tokens > 0
    chunks = list(backend.stream(prompts[1], GREEDY))
    assert "".join(c.delta for c in chunks) == ref[1].text and chunks[-1].finish_reason
    chunks = list(backend.stream(prompts[1], GREEDY, return_logprob=True, top_logprobs_num=1))
    streamed = [e[1] for c in chunks for e in c.output_token_logprobs]
    assert streamed == list(ref[1].output_ids)  # each chunk carries its own tokens' logprobs
    assert all(len(top) == 1 for c in chunks for top in c.output_top_logprobs)
    assert backend.score("Question: What", [" is", " was"]) == local.score(
        "Question: What", [" is", " was"]
    )
    chat = [{"role": "user", "content": "hi"}]
    assert backend.apply_chat_template(chat) == local.apply_chat_template(chat)
    m = backend.metrics()
    assert set(m["replicas"]) == {0, 1} and m["router"]["policy"] == "graph_aware"
    assert m["prompt_tokens"] == sum(r["prompt_tokens"] for r in m["replicas"].values())


def test_async_graph_and_stream(backend, local):
    prompts = ["A radix tree", "A radix forest"]

    async def main():
        ours = await backend.arun_graph(CallGraph.from_prompts(prompts, None, GREEDY))
        text = "".join([c.delta async for c in backend.astream(prompts[0], GREEDY)])
        return ours, text

    ours, text = asyncio.run(main())
    ref = local.run_graph(CallGraph.from_prompts(prompts, None, GREEDY))
    assert [r.text for r in ours] == [r.text for r in ref] and text == ref[0].text


def test_a_batch_sharing_a_prefix_lands_on_one_replica_and_prefills_it_once(backend):
    suffixes = [f" {name}" for name in ("Paris", "Rome", "Berlin", "Madrid", "Oslo", "Bern")]
    tok = backend.tokenizer
    graph = CallGraph.from_prompts([PREFIX + s for s in suffixes], tok, GREEDY)
    before = counters(backend)
    results = backend.run_graph(graph)
    replicas = {r.meta_info["replica"] for r in results}
    assert len(replicas) == 1
    prefill = counters(backend)[0] - before[0]
    prompt_lens = [len(tok.encode(PREFIX + s)) for s in suffixes]
    shared = graph.shared_prefixes()[0].num_tokens
    assert prefill == shared + sum(n - shared for n in prompt_lens)  # the prefix once, cold
    (home,) = replicas
    again = backend.run_graph(CallGraph.from_prompts([PREFIX + " Lima"], tok, GREEDY))
    assert again[0].meta_info["replica"] == home and again[0].usage.cached_tokens >= shared - 1
    other = backend.run_graph(
        CallGraph.from_prompts(["0123456789 " * 6 + s for s in suffixes[:3]], tok, GREEDY)
    )
    assert {r.meta_info["replica"] for r in other} == {1 - home}  # the replica with more room


def prompt_tokens(backend) -> dict[int, int]:
    return {r: m["prompt_tokens"] for r, m in backend.metrics()["replicas"].items()}


def grown(before: dict[int, int], after: dict[int, int]) -> set[int]:
    return {r for r in after if after[r] > before.get(r, 0)}


def test_front_doors_run_through_the_ray_backend(backend, ray_kwargs):
    """ChatSGLang, the DSPy LM and an SGLang program name the "ray" backend; they get the
    shared replica set, and a batch (or fork) sharing a prefix runs on one replica."""
    import sgl_adapters.lang as sgl
    from sgl_adapters.dspy import LM, has_engine_contract
    from sgl_adapters.langchain import ChatSGLang

    chat = ChatSGLang(backend="ray", backend_kwargs=ray_kwargs, max_tokens=4)
    assert chat.client().backend.replica_set is backend.replica_set
    before = prompt_tokens(backend)
    replies = chat.batch([PREFIX + f" {city}?" for city in ("Paris", "Rome", "Oslo")])
    assert len(replies) == 3 and all(isinstance(r.content, str) for r in replies)
    assert len(grown(before, prompt_tokens(backend))) == 1

    if has_engine_contract():
        lm = LM(
            backend="ray", backend_kwargs=ray_kwargs, max_tokens=4, temperature=0.0, cache=False
        )
        before = prompt_tokens(backend)
        (text,) = lm("Tell me about cats.")
        assert isinstance(text, str) and grown(before, prompt_tokens(backend))
    else:  # DSPy 3.3's legacy LM runs on the local engine only, and says so
        with pytest.raises(NotImplementedError, match="local backend only"):
            LM(backend="ray", backend_kwargs=ray_kwargs)

    @sgl.function
    def fan_out(s):
        s += PREFIX
        forks = s.fork(3)
        for i, f in enumerate(forks):
            f += f" {i}" + sgl.gen("answer", max_tokens=3)
        forks.join()

    runtime = sgl.Runtime(backend="ray", **ray_kwargs)
    assert runtime.backend.replica_set is backend.replica_set
    before = prompt_tokens(backend)
    state = fan_out.run(backend=runtime, temperature=0)
    assert len(grown(before, prompt_tokens(backend))) == 1
    assert state.text().startswith(PREFIX)
    runtime.shutdown()


def test_round_robin_spreads_the_same_batch(backend):
    from sgl_plugins.routing import Router, RouterConfig

    graph = CallGraph.from_prompts([PREFIX + f" {i}" for i in range(4)], backend.tokenizer)
    graph_aware = backend.router
    backend.replica_set.router = Router(2, RouterConfig(policy="round_robin"))
    try:
        results = backend.run_graph(graph)
    finally:
        backend.replica_set.router = graph_aware
    assert [r.meta_info["replica"] for r in results] == [0, 1, 0, 1]


def test_a_request_error_releases_every_replicas_load(backend):
    """A batch whose leaf on replica 0 is invalid raises that leaf's error; the leaves routed to
    replica 1 in the same batch are released too (the router counted them as in flight)."""
    from sgl_engine.errors import InvalidRequestError
    from sgl_plugins.routing import Router, RouterConfig

    prompts = ["An invalid leaf", "A valid leaf", "Another valid one"]
    params = [{"temperature": -1}, GREEDY, GREEDY]  # round robin: replicas 0, 1, 0
    graph = CallGraph.from_prompts(prompts, backend.tokenizer, params)
    graph_aware = backend.router
    backend.replica_set.router = Router(2, RouterConfig(policy="round_robin"))
    try:
        with pytest.raises(ray.exceptions.RayTaskError) as info:
            backend.run_graph(graph)
        assert isinstance(info.value.cause, InvalidRequestError)
        assert backend.router.stats()["in_flight"] == [0, 0]
        assert backend.router.live == [0, 1]  # a request's error is not the replica's
    finally:
        backend.replica_set.router = graph_aware


def test_the_http_server_over_replicas(backend):
    """What `sgl-adapters serve --dp 2` serves: the ordinary app over `ReplicatedEngine`."""
    import httpx
    from sgl_engine.server.app import create_app
    from sgl_engine.server.launch import ServerThread
    from sgl_plugins.builtin.ray import ReplicatedEngine

    params = {"max_new_tokens": 3, "temperature": 0}
    with ServerThread(create_app(ReplicatedEngine(backend), model_name="tiny")) as server:
        client = httpx.Client(base_url=server.base_url, timeout=60)
        batch = [PREFIX + f" {c}" for c in ("Lyon", "Nice", "Metz")]
        outs = client.post("/generate", json={"text": batch, "sampling_params": params}).json()
        assert len(outs) == 3 and len({o["meta_info"]["replica"] for o in outs}) == 1
        lines = []
        body = {"text": "Hello", "sampling_params": params, "stream": True}
        with client.stream("POST", "/generate", json=body) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data:")]
        assert lines[-1] == "data: [DONE]" and len(lines) >= 2
        done = client.post(
            "/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 3}
        )
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 3
        bad = {"text": "x", "sampling_params": {"temperature": -1}}
        assert client.post("/generate", json=bad).status_code == 400
        info = client.get("/get_server_info").json()
        assert info["internal_states"][0]["prompt_tokens"] > 0


def wait_until(condition, timeout_s: float = 180) -> None:
    """Poll `condition` until true; fail after `timeout_s` (a bound, not an assertion)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def test_a_hung_replica_misses_the_call_deadline_and_comes_back(backend, ray_kwargs):
    from sgl_plugins.builtin.ray import RayBackend

    router, replica_set = backend.router, backend.replica_set
    timed = RayBackend(pool=backend._pool, call_timeout_s=5, **ray_kwargs)
    try:
        assert timed.replica_set is replica_set
        assert backend.flush_cache()  # empty trees: "room" sends the first unit to replica 0
        ray.get(backend.replicas[0]._hang_for_tests.remote())
        prompts = [f"{w} hangs or not {i}" for i, w in enumerate("ABCD")]
        results = timed.run_graph(CallGraph.from_prompts(prompts, backend.tokenizer, GREEDY))
        assert all(r.error is None and r.meta_info["replica"] == 1 for r in results)
        assert replica_set.restarts == [1, 0]  # replica 0 was killed for Ray to restart
        assert "missed a 5s call deadline" in router.down[0]
        wait_until(lambda: router.live == [0, 1])
        assert router.tree.size(0) == 0 and replica_set.restarts == [1, 0]

        assert backend.flush_cache()  # a stream waiting for its first chunk: the same
        ray.get(backend.replicas[0]._hang_for_tests.remote())
        chunks = list(timed.stream("Streams time out too", GREEDY))
        assert {c.meta_info["replica"] for c in chunks} == {1} and chunks[-1].finish_reason
        assert replica_set.restarts == [2, 0]
        wait_until(lambda: router.live == [0, 1])

        from sgl_plugins.builtin.ray import ReplicatedEngine

        assert backend.flush_cache()  # the HTTP server's engine front: the same
        ray.get(backend.replicas[0]._hang_for_tests.remote())
        engine = ReplicatedEngine(timed)
        out = engine.generate(prompt="Served anyway", sampling_params=GREEDY)
        assert out["meta_info"]["replica"] == 1 and replica_set.restarts == [3, 0]
    finally:
        timed.close()
    wait_until(lambda: router.live == [0, 1])
    assert backend.generate("Back again?", GREEDY).error is None


def test_a_killed_replica_loses_no_request_restarts_then_stays_out(backend):
    from sgl_plugins.routing import NoReplicaError

    router, replica_set = backend.router, backend.replica_set
    long = {"max_new_tokens": 120, "temperature": 0, "ignore_eos": True}
    prompts = [f"{word} is the question number {i}" for i, word in enumerate("ABCDEFGH")]
    graph = CallGraph.from_prompts(prompts, backend.tokenizer, long)
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["results"] = backend.run_graph(graph)
        except BaseException as exc:  # noqa: BLE001 -- asserted below
            out["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    victim = backend.replicas[0]
    wait_until(lambda: ray.get(victim.metrics.remote())["running"] > 0, 30)
    os.kill(replica_set.pids[0], signal.SIGKILL)
    worker.join(timeout=120)
    assert "error" not in out, out.get("error")
    results = out["results"]
    assert all(r.finish_reason == "length" and len(r.output_ids) == 120 for r in results)
    assert {r.meta_info["replica"] for r in results} == {1}  # replica 0's leaves were re-run

    # Ray restarts it (its fourth restart); the router takes it back with an empty tree.
    wait_until(lambda: router.live == [0, 1])
    assert replica_set.restarts == [4, 0] and router.tree.size(0) == 0
    fresh = [f"{w} comes back {i}" for i, w in enumerate("IJKL")]
    served = backend.run_graph(CallGraph.from_prompts(fresh, backend.tokenizer, GREEDY))
    assert 0 in {r.meta_info["replica"] for r in served}  # it gets leaves again
    assert backend.metrics()["replicas"][0]["prompt_tokens"] > 0

    # A fifth death exceeds max_restarts=4: replica 0 stays out, and says so.
    os.kill(replica_set.pids[0], signal.SIGKILL)
    again = [f"{w} after the last kill {i}" for i, w in enumerate("MNOP")]
    results = backend.run_graph(CallGraph.from_prompts(again, backend.tokenizer, GREEDY))
    assert {r.meta_info["replica"] for r in results} == {1}
    assert router.live == [1] and "max_restarts=4 reached" in router.down[0]
    assert set(backend.metrics()["replicas"]) == {1}
    with pytest.raises(ray.exceptions.ActorDiedError):  # Ray counted the same restarts
        ray.get(backend.replicas[0].ready.remote())

    ray.kill(backend.replicas[1])  # no_restart: Ray gives up on it at once
    with pytest.raises(NoReplicaError, match="replica 0: .*max_restarts=4 reached") as info:
        backend.generate("Anyone?", GREEDY)
    assert "replica 1: dead, not restarted by Ray" in str(info.value)
