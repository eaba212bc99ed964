"""Safety of the server: API key, body limit, clear 400s, disconnect aborts, draining shutdown."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from sgl_engine.server import ServerThread, create_app

LONG = {"max_new_tokens": 900, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def engine(tiny_llama):
    from sgl_engine import Engine

    eng = Engine(tiny_llama, device="cpu", max_total_tokens=4096)
    yield eng
    eng.check_invariants()
    eng.shutdown()


@pytest.fixture(scope="module")
def guarded(engine):
    with ServerThread(create_app(engine, api_key="s3cret", max_body_bytes=2048)) as srv:
        yield srv.base_url


def wait_idle(engine, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = engine.metrics()
        if m["running"] == 0 and m["waiting"] == 0:
            return m
        time.sleep(0.02)
    raise AssertionError(f"engine still busy: {engine.metrics()}")


def test_api_key_is_required_except_for_health(guarded):
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 1}}
    assert httpx.post(f"{guarded}/generate", json=body).status_code == 401
    bad = {"Authorization": "Bearer nope"}
    resp = httpx.post(f"{guarded}/generate", json=body, headers=bad)
    assert resp.status_code == 401 and "API key" in resp.json()["error"]["message"]
    assert httpx.get(f"{guarded}/v1/models").status_code == 401
    good = {"Authorization": "Bearer s3cret"}
    assert httpx.post(f"{guarded}/generate", json=body, headers=good).status_code == 200
    assert httpx.get(f"{guarded}/health").status_code == 200


def test_body_limit_413_declared_and_chunked(guarded):
    auth = {"Authorization": "Bearer s3cret"}
    big = {"text": "x" * 4096}
    resp = httpx.post(f"{guarded}/generate", json=big, headers=auth)
    assert resp.status_code == 413 and "2048" in resp.json()["error"]["message"]

    def chunks():
        data = json.dumps(big).encode()
        for i in range(0, len(data), 512):
            yield data[i : i + 512]

    resp = httpx.post(f"{guarded}/generate", content=chunks(), headers=auth)
    assert resp.status_code == 413


@pytest.fixture(scope="module")
def open_server(engine):
    with ServerThread(create_app(engine)) as srv:
        yield srv.base_url


@pytest.mark.parametrize(
    "path, raw, needle",
    [
        ("/v1/chat/completions", b'{"messages": [', "not valid JSON"),
        ("/v1/chat/completions", b'{"messages": []}', "messages"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 3}]}', "content"),
        ("/v1/completions", b'{"prompt": "a", "n": 0}', "n"),
        ("/v1/completions", b'{"prompt": "a", "temperature": -1}', "temperature"),
        ("/generate", b"[1, 2]", "body"),
    ],
)
def test_malformed_requests_get_a_clear_400(open_server, path, raw, needle):
    resp = httpx.post(
        f"{open_server}{path}", content=raw, headers={"content-type": "application/json"}
    )
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and needle in error["message"]


@pytest.mark.parametrize("path", ["/generate", "/v1/completions"])
def test_stream_disconnect_aborts_and_frees_kv(engine, open_server, path):
    wait_idle(engine)
    before = engine.metrics()
    body = (
        {"text": "The quick brown fox", "sampling_params": LONG, "stream": True}
        if path == "/generate"
        else {
            "prompt": "The quick brown fox",
            "max_tokens": 900,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
        }
    )
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{open_server}{path}", json=body) as resp:
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(3)]
            assert any(line.startswith("data: {") for line in got)
    after = wait_idle(engine)
    assert after["aborted_requests"] == before["aborted_requests"] + 1
    assert after["decode_tokens"] - before["decode_tokens"] < LONG["max_new_tokens"]
    assert after["kv_used"] == after["cache_tokens"]  # only the radix cache holds KV
    engine.check_invariants()


def test_non_stream_disconnect_aborts(engine, open_server):
    wait_idle(engine)
    before = engine.metrics()
    body = {"text": "The quick brown fox", "sampling_params": LONG}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{open_server}/generate", json=body, timeout=httpx.Timeout(5, read=0.3))
    after = wait_idle(engine)
    assert after["aborted_requests"] == before["aborted_requests"] + 1
    engine.check_invariants()


def test_shutdown_drains_in_flight_streams(engine):
    srv = ServerThread(create_app(engine)).start()
    body = {"text": "Large language", "sampling_params": {**LONG, "max_new_tokens": 200}}
    body["stream"] = True
    lines: list[str] = []
    first = threading.Event()

    def consume() -> None:
        with httpx.stream("POST", f"{srv.base_url}/generate", json=body, timeout=60) as resp:
            for line in resp.iter_lines():
                if line:
                    lines.append(line)
                    first.set()

    reader = threading.Thread(target=consume)
    reader.start()
    assert first.wait(30)
    srv.stop()
    reader.join(60)
    assert lines[-1] == "data: [DONE]"
    final = json.loads(lines[-2][len("data: ") :])
    assert final["meta_info"]["finish_reason"]["type"] == "length"
    assert final["meta_info"]["completion_tokens"] == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{srv.base_url}/health")
