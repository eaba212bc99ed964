"""Hostile and careless HTTP input (issue 17): each case gets a 4xx naming the field, or a
bounded answer; nothing hangs, nothing is a 5xx, other clients are unaffected."""

from __future__ import annotations

import json
import logging
import threading

import httpx
import pytest
from sgl_engine.server import ServerThread, create_app
from sgl_engine.server.launch import exposure_warning

GREEDY = {"temperature": 0, "ignore_eos": True}
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def engine(tiny_llama):
    from sgl_engine import Engine

    eng = Engine(tiny_llama, device="cpu", max_total_tokens=4096, context_length=64)
    yield eng
    eng.check_invariants()
    assert eng._channels == {}
    eng.shutdown()


@pytest.fixture(scope="module")
def client(engine):
    with ServerThread(create_app(engine, model_name="tiny")) as srv:
        with httpx.Client(base_url=srv.base_url, timeout=30) as c:
            yield c


def _error(resp, status: int = 400) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["message"]
    return error


def _raw(client, path: str, text: str):
    return client.post(path, content=text.encode(), headers={"content-type": "application/json"})


def test_duplicate_rid_is_a_400_not_a_hang(client):
    body = {"text": ["a", "b"], "rid": ["r", "r"], "sampling_params": {"max_new_tokens": 2}}
    assert _error(client.post("/generate", json=body))["param"] == "rid"


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"top_logprobs_num": 10**6, "logprob_start_len": 0}, "top_logprobs_num"),
        ({"top_logprobs_num": -3}, "top_logprobs_num"),
        ({"logprob_start_len": -7}, "logprob_start_len"),
    ],
)
def test_logprob_amplification_is_refused(client, extra, param):
    body = {"text": "hello", "return_logprob": True, "sampling_params": {"max_new_tokens": 2}}
    assert _error(client.post("/generate", json={**body, **extra}))["param"] == param


@pytest.mark.parametrize(
    "path, raw, param",
    [
        ("/generate", '{"text": "a\\ud800"}', "text"),
        ("/v1/completions", '{"prompt": "\\ud800", "max_tokens": 2}', "prompt"),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "x\\udfffy"}], "max_tokens": 2}',
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]}',
            "stop.0",
        ),
    ],
)
def test_lone_surrogates_are_a_400(client, path, raw, param):
    assert _error(_raw(client, path, raw))["param"] == param


@pytest.mark.parametrize(
    "message, param",
    [
        ({"role": "user", "content": [{"type": "text", "text": 5}]}, "messages.0.content"),
        ({"role": "user", "content": [{"type": "text"}]}, "messages.0.content"),
        (
            {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": "f"}]},
            "messages.0.tool_calls",
        ),
        (
            {"role": "assistant", "tool_calls": [{"id": "c", "function": ["f", "{}"]}]},
            "messages.0.tool_calls",
        ),
        (
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 3}}]},
            "messages.0.tool_calls",
        ),
    ],
)
def test_malformed_chat_messages_are_a_400_naming_the_field(client, message, param):
    body = {"messages": [message, *CHAT], "max_tokens": 2}
    error = _error(client.post("/v1/chat/completions", json=body))
    assert error["param"] == param


def test_a_huge_prompt_is_refused_before_rendering(engine, client, monkeypatch):
    def never(*_a, **_k):
        raise AssertionError("rendered a prompt that cannot fit")

    monkeypatch.setattr(engine, "apply_chat_template", never)
    huge = [{"role": "user", "content": "x" * (engine.builder.max_prompt_chars + 1)}]
    error = _error(client.post("/v1/chat/completions", json={"messages": huge}))
    assert error["param"] == "messages"
    error = _error(client.post("/v1/completions", json={"prompt": huge[0]["content"]}))
    assert error["param"] == "prompt"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/generate"])
def test_tokenising_runs_off_the_event_loop(engine, client, monkeypatch, path):
    """While one request's template rendering or tokenising is stuck, /health still answers."""
    entered, release = threading.Event(), threading.Event()
    real_encode = engine.tokenizer.encode

    def slow_encode(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            entered.set()
            release.wait(30)
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(engine.tokenizer, "encode", slow_encode)
    body = {
        "/v1/chat/completions": {"messages": CHAT, "max_tokens": 2},
        "/v1/completions": {"prompt": "hello", "max_tokens": 2},
        "/generate": {"text": "hello", "sampling_params": {"max_new_tokens": 2}},
    }[path]
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=client.post(path, json=body)))
    worker.start()
    try:
        assert entered.wait(30), "the request never reached the tokenizer"
        assert httpx.get(f"{client.base_url}/health", timeout=10).status_code == 200
    finally:
        release.set()
        worker.join(60)
    assert result["r"].status_code == 200, result["r"].text


def test_max_new_tokens_is_a_reported_clamp(client):
    body = {"text": "hi", "sampling_params": {**GREEDY, "max_new_tokens": 10**12}}
    out = client.post("/generate", json=body).json()
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    assert "clamped" in out["meta_info"]["finish_reason"]["message"]


def test_n_is_capped_on_generate(client):
    body = {"text": "hi", "sampling_params": {"n": 20000}}
    assert _error(client.post("/generate", json=body))["param"] == "sampling_params.n"


def test_a_tiny_top_p_is_well_defined(client):
    greedy = client.post(
        "/generate", json={"text": "The quick", "sampling_params": {**GREEDY, "max_new_tokens": 4}}
    ).json()["output_ids"]
    params = {"top_p": 1e-46, "temperature": 1.0, "ignore_eos": True, "max_new_tokens": 4}
    out = client.post("/generate", json={"text": "The quick", "sampling_params": params})
    assert out.json()["output_ids"] == greedy


@pytest.mark.parametrize("model", ["gpt-4", "../../etc/passwd", ""])
def test_an_unknown_model_is_a_404(client, model):
    for path, body in [
        ("/v1/chat/completions", {"model": model, "messages": CHAT, "max_tokens": 1}),
        ("/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 1}),
    ]:
        error = _error(client.post(path, json=body), 404)
        assert error["code"] == "model_not_found" and error["param"] == "model"


def test_served_name_and_aliases_are_accepted_and_no_path_is_exposed(engine, client):
    for model in ("tiny", "llama", str(engine.model_path), None):
        body = {"messages": CHAT, "max_tokens": 1, **({"model": model} if model else {})}
        resp = client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200 and resp.json()["model"] == "tiny"
    listed = json.dumps(client.get("/v1/models").json()) + json.dumps(
        client.get("/get_model_info").json()
    )
    assert str(engine.model_path) not in listed and "/" not in listed
    info = client.get("/get_server_info").text
    assert str(engine.model_path) not in info and '"model_path":"tiny"' in info.replace(" ", "")
    assert client.get("/v1/models/llama").json()["id"] == "tiny", "an alias finds the model"


def test_default_name_is_the_folder_not_the_path(engine):
    app = create_app(engine)
    assert app.state.sgl.model_name == "llama"


def test_kv_exhaustion_on_openai_routes_says_why(tiny_llama):
    from sgl_engine import Engine

    with Engine(tiny_llama, device="cpu", max_total_tokens=40) as eng:
        with ServerThread(create_app(eng)) as srv:
            body = {"messages": CHAT, "max_tokens": 200, "ignore_eos": True, "temperature": 0}
            url = f"{srv.base_url}/v1/chat/completions"
            choice = httpx.post(url, json=body, timeout=60).json()["choices"][0]
            assert choice["finish_reason"] == "abort"
            assert "KV cache exhausted" in choice["finish_message"]
            with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as resp:
                events = [json.loads(line[6:]) for line in resp.iter_lines() if "{" in line]
            last = events[-1]["choices"][0]
            assert last["finish_reason"] == "abort" and "KV cache" in last["finish_message"]
        eng.check_invariants()


def test_state_changing_routes_are_post_only(client):
    assert client.get("/flush_cache").status_code == 405
    assert client.post("/flush_cache").status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "10.0.0.5"])
def test_without_a_key_only_loopback_host_names_are_served(client, host):
    for method, path in [("GET", "/v1/models"), ("POST", "/flush_cache")]:
        resp = client.request(method, path, headers={"Host": host})
        assert _error(resp)["param"] == "Host"
    assert client.get("/health", headers={"Host": host}).status_code == 200
    for ok in ("localhost:8000", "127.0.0.1", "[::1]:30000"):
        assert client.get("/v1/models", headers={"Host": ok}).status_code == 200


def test_allowed_hosts_and_api_key_widen_the_host_check(engine):
    allowed = create_app(engine, allowed_hosts=("api.internal",))
    keyed = create_app(engine, api_key="k")
    with ServerThread(allowed) as a, ServerThread(keyed) as k:
        assert httpx.get(f"{a.base_url}/v1/models", headers={"Host": "api.internal"}).is_success
        assert httpx.get(f"{a.base_url}/v1/models", headers={"Host": "other"}).status_code == 400
        auth = {"Host": "anything", "Authorization": "Bearer k"}
        assert httpx.get(f"{k.base_url}/v1/models", headers=auth).is_success


def test_a_warning_when_exposed_without_a_key():
    assert "without an API key" in exposure_warning("0.0.0.0", None)
    assert exposure_warning("127.0.0.1", None) is None
    assert exposure_warning("localhost", None) is None
    assert exposure_warning("0.0.0.0", "k") is None


def test_an_internal_error_is_counted_in_metrics_and_says_so(engine, client, caplog):
    real = engine.runner.launch
    calls = {"n": 0}

    def broken(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("kernel panic")
        return real(*args, **kwargs)

    engine.runner.launch = broken
    try:
        with caplog.at_level(logging.ERROR, logger="sgl_engine.scheduler"):
            resp = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 3})
    finally:
        del engine.runner.launch
    choice = resp.json()["choices"][0]
    assert choice["finish_reason"] == "abort" and "internal error" in choice["finish_message"]
    assert "kernel panic" not in resp.text, "details stay in the server log"
    assert any(r.exc_info for r in caplog.records if "chatcmpl-" in r.getMessage())
    metrics = client.get("/metrics").text
    assert 'sgl_engine_internal_errors_total{model_name="tiny"} 1.0' in metrics
