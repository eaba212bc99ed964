"""/health and /health_generate follow `Engine.health()`: 200 while the engine can serve, 503
with the reason once it cannot (a dead tensor-parallel rank, a dead engine process), as do the
OpenAI routes; a single-process engine stays healthy until it is shut down."""

from __future__ import annotations

import os
import signal
import threading

import httpx
import pytest
from sgl_engine.server import ServerThread, create_app
from sgl_engine.testing import wait_until

pytestmark = pytest.mark.timeout(240)

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"prompt": "hello", "max_tokens": 2}
DEAD = "tensor-parallel rank 1 (pid 4242) was killed by SIGKILL; shut it down"


@pytest.fixture(scope="module")
def single(tiny_llama):
    from sgl_engine import Engine

    eng = Engine(tiny_llama, device="cpu", max_total_tokens=4096)
    with ServerThread(create_app(eng, api_key="k")) as srv:
        yield (
            eng,
            httpx.Client(base_url=srv.base_url, timeout=60, headers={"Authorization": "Bearer k"}),
        )
    eng.check_invariants()
    eng.shutdown()


def _unavailable(resp: httpx.Response, needle: str) -> str:
    assert resp.status_code == 503, resp.text
    error = resp.json()["error"]
    assert error["type"] == "server_error" and error["code"] == 503
    assert needle in error["message"]
    return error["message"]


def test_a_single_process_engine_is_healthy(single):
    eng, client = single
    assert eng.health() is None
    assert httpx.get(f"{client.base_url}/health").status_code == 200  # open: no key needed
    assert client.get("/health_generate").status_code == 200
    assert client.post("/v1/completions", json=COMPLETION).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_an_unhealthy_engine_gets_503_on_every_serving_route(single, monkeypatch, stream):
    """The routes ask `health()` before starting anything (a stream is refused before its
    first byte), so no request is sent to the engine."""
    eng, client = single
    monkeypatch.setattr(eng, "health", lambda: DEAD, raising=False)
    sent = []
    monkeypatch.setattr(eng, "async_generate", lambda *a, **k: sent.append(k))
    message = _unavailable(httpx.get(f"{client.base_url}/health"), DEAD)
    assert message == DEAD
    _unavailable(client.get("/health_generate"), DEAD)
    _unavailable(client.post("/v1/completions", json={**COMPLETION, "stream": stream}), DEAD)
    _unavailable(client.post("/v1/chat/completions", json={**CHAT, "stream": stream}), DEAD)
    _unavailable(client.post("/generate", json={"text": "hi", "stream": stream}), DEAD)
    assert sent == []


def test_an_aborted_health_generate_is_503(single, monkeypatch):
    eng, client = single
    real = eng.async_generate

    async def aborted(*args, **kwargs):
        out = await real(*args, **kwargs)
        finish = {"type": "abort", "message": "the KV cache is full"}
        return {**out, "meta_info": {**out["meta_info"], "finish_reason": finish}}

    monkeypatch.setattr(eng, "async_generate", aborted)
    _unavailable(client.get("/health_generate"), "the KV cache is full")


def test_a_shut_down_engine_says_so(tiny_llama):
    from sgl_engine import Engine

    eng = Engine(tiny_llama, device="cpu", max_total_tokens=1024)
    assert eng.health() is None
    eng.shutdown()
    assert eng.health() == "the engine has been shut down"
    with ServerThread(create_app(eng)) as srv:
        _unavailable(httpx.get(f"{srv.base_url}/health"), "shut down")
        _unavailable(httpx.get(f"{srv.base_url}/health_generate"), "shut down")


# ---- tensor parallelism: one TP=2 engine per scenario ----------------------------------------


def _running(eng) -> bool:
    return eng.metrics()["running"] > 0


def test_a_dead_follower_rank_makes_the_server_unhealthy(tiny_llama):
    """Killed mid-request: the non-streamed completion in flight gets 503 (not 200 with an
    abort), then /health, /health_generate and new requests get 503 naming the rank."""
    from sgl_engine import Engine

    eng = Engine(tiny_llama, device="cpu", max_total_tokens=4096, tp_size=2)
    try:
        _, follower = eng.pids
        with ServerThread(create_app(eng)) as srv:
            http = httpx.Client(base_url=srv.base_url, timeout=60)
            assert eng.health() is None
            assert http.get("/health").status_code == 200
            assert http.get("/health_generate").status_code == 200
            long = {"prompt": "hello", "max_tokens": 900, "ignore_eos": True}
            result: dict = {}
            worker = threading.Thread(
                target=lambda: result.update(r=http.post("/v1/completions", json=long))
            )
            worker.start()
            wait_until(lambda: _running(eng), 30)
            os.kill(follower, signal.SIGKILL)
            worker.join(60)
            needle = f"tensor-parallel rank 1 (pid {follower}) was killed by SIGKILL"
            _unavailable(result["r"], needle)
            assert needle in eng.health()
            assert _unavailable(http.get("/health"), needle) == eng.health()
            _unavailable(http.get("/health_generate"), needle)
            _unavailable(http.post("/v1/chat/completions", json=CHAT), needle)
            assert eng.proc.is_alive(), "the child process itself still runs"
    finally:
        eng.shutdown()
    assert eng.health() == "the engine has been shut down"


def test_a_dead_engine_process_makes_the_server_unhealthy(tiny_llama):
    from sgl_engine import Engine

    eng = Engine(tiny_llama, device="cpu", max_total_tokens=4096, tp_size=2)
    try:
        core = eng.pids[0]
        with ServerThread(create_app(eng)) as srv:
            http = httpx.Client(base_url=srv.base_url, timeout=60)
            assert http.get("/health").status_code == 200
            os.kill(core, signal.SIGKILL)
            needle = f"engine process (pid {core}) was killed by SIGKILL"
            wait_until(lambda: eng.failure is not None, 30)
            assert needle in eng.health()
            _unavailable(http.get("/health"), needle)
            _unavailable(http.get("/health_generate"), needle)
            _unavailable(http.post("/v1/completions", json=COMPLETION), needle)
    finally:
        eng.shutdown()
