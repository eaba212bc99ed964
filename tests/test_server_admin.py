"""SGLang's auxiliary routes on our server over real HTTP: /get_server_info, /tokenize,
/detokenize, /abort_request, /v1/models/{id}."""

from __future__ import annotations

import threading

import httpx
import pytest
from sgl_engine.server import ServerThread, create_app


@pytest.fixture(scope="module")
def server(tiny_llama):
    from sgl_engine import Engine

    eng = Engine(tiny_llama, device="cpu", max_total_tokens=4096)
    with ServerThread(create_app(eng, model_name="tiny")) as srv:
        yield eng, httpx.Client(base_url=srv.base_url, timeout=60)
    eng.check_invariants()
    eng.shutdown()


def test_server_info_has_model_settings_and_counters(server):
    eng, client = server
    info = client.get("/get_server_info").json()
    assert info["served_model_name"] == "tiny"
    assert info["context_length"] == eng.context_length
    assert info["max_total_tokens"] == 4096
    assert "prefill_tokens" in info["internal_states"][0]


def test_tokenize_and_detokenize_round_trip(server):
    eng, client = server
    out = client.post("/tokenize", json={"prompt": "The quick brown fox"}).json()
    assert out["tokens"] == eng.tokenizer.encode("The quick brown fox")
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == eng.context_length
    many = client.post("/tokenize", json={"prompt": ["a b", "c"], "add_special_tokens": False})
    assert many.json()["tokens"] == [
        eng.tokenizer.encode(t, add_special_tokens=False) for t in ["a b", "c"]
    ]
    ids = eng.tokenizer.encode("hello world", add_special_tokens=False)
    text = client.post("/detokenize", json={"tokens": ids}).json()["text"]
    assert text == eng.tokenizer.decode(ids)
    bad = client.post("/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_abort_request_ends_a_running_request(server):
    eng, client = server
    body = {
        "text": "Count:",
        "rid": "to-abort",
        "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True},
    }
    result = {}

    def run():
        result["out"] = client.post("/generate", json=body).json()

    thread = threading.Thread(target=run)
    thread.start()
    for _ in range(600):
        if eng.metrics().get("running", 0) or eng.metrics().get("decode_tokens", 0):
            break
        threading.Event().wait(0.01)
    assert client.post("/abort_request", json={"rid": "to-abort"}).status_code == 200
    thread.join(timeout=60)
    assert result["out"]["meta_info"]["finish_reason"]["type"] == "abort"
    assert client.post("/abort_request", json={"abort_all": True}).status_code == 400


def test_retrieve_model(server):
    _, client = server
    card = client.get("/v1/models/tiny").json()
    assert card["id"] == "tiny" and card["object"] == "model"
    missing = client.get("/v1/models/other")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
