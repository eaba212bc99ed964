"""SGLang's native routes over real HTTP: /generate (batch, ids, logprobs, SSE), metrics, cache."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from sgl_engine.server import ServerThread, create_app

GREEDY = {"temperature": 0, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def server(tiny_llama):
    from sgl_engine import Engine

    eng = Engine(tiny_llama, device="cpu", max_total_tokens=4096)
    with ServerThread(create_app(eng)) as srv:
        yield eng, httpx.Client(base_url=srv.base_url, timeout=60)
    eng.check_invariants()
    eng.shutdown()


def test_generate_text_equals_engine(server):
    eng, client = server
    ref = eng.generate("The quick brown fox", GREEDY)
    out = client.post("/generate", json={"text": "The quick brown fox", "sampling_params": GREEDY})
    out = out.json()
    assert out["text"] == ref["text"] and out["output_ids"] == ref["output_ids"]
    assert out["meta_info"]["finish_reason"] == ref["meta_info"]["finish_reason"]
    assert out["meta_info"]["prompt_tokens"] == ref["meta_info"]["prompt_tokens"]


def test_generate_batch_of_ids(server):
    eng, client = server
    ids = [eng.tokenizer.encode("A radix tree"), eng.tokenizer.encode("Question: What")]
    refs = eng.generate(input_ids=ids, sampling_params=GREEDY)
    outs = client.post("/generate", json={"input_ids": ids, "sampling_params": GREEDY}).json()
    assert [o["output_ids"] for o in outs] == [r["output_ids"] for r in refs]


def test_generate_prompt_logprobs_for_select(server):
    eng, client = server
    prefix = eng.tokenizer.encode("Answer: Paris")
    body = {
        "input_ids": prefix,
        "sampling_params": {"max_new_tokens": 0},
        "return_logprob": True,
        "logprob_start_len": 1,
        "return_text_in_logprobs": True,
    }
    meta = client.post("/generate", json=body).json()["meta_info"]
    ref = eng.generate(
        input_ids=prefix,
        sampling_params={"max_new_tokens": 0},
        return_logprob=True,
        logprob_start_len=1,
    )["meta_info"]
    got = meta["input_token_logprobs"]
    assert [t for _, t, _ in got] == [t for _, t, _ in ref["input_token_logprobs"]]
    assert [lp for lp, _, _ in got] == pytest.approx(
        [lp for lp, _, _ in ref["input_token_logprobs"]], abs=1e-4
    )
    assert [text for _, _, text in got] == [eng.tokenizer.decode([t]) for _, t, _ in got]


def test_generate_stream_is_cumulative_and_ends_with_done(server):
    eng, client = server
    ref = eng.generate("Large language models", GREEDY)
    body = {"text": "Large language models", "sampling_params": GREEDY, "stream": True}
    lines = []
    with client.stream("POST", "/generate", json=body) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))
    assert texts[-1] == ref["text"]
    assert chunks[-1]["meta_info"]["finish_reason"] is not None
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])


def test_generate_regex_constraint(server):
    _, client = server
    body = {
        "text": "IP:",
        "sampling_params": {"regex": r"[0-9]{1,3}(\.[0-9]{1,3}){3}", "max_new_tokens": 32},
    }
    out = client.post("/generate", json=body).json()
    assert re.fullmatch(r"[0-9]{1,3}(\.[0-9]{1,3}){3}", out["text"]), out


@pytest.mark.parametrize(
    "body, field",
    [
        ({"text": "hi", "sampling_params": {"top_p": 2}}, "sampling_params.top_p"),
        ({"text": "hi", "sampling_params": {"bogus": 1}}, "sampling_params.bogus"),
        ({"text": "hi", "sampling_params": {"regex": "(("}}, "sampling_params"),
        ({"input_ids": [10**9]}, "input_ids"),
        ({}, "prompt"),
    ],
)
def test_generate_bad_params_are_400_naming_the_field(server, body, field):
    _, client = server
    resp = client.post("/generate", json=body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == field and resp.json()["error"]["message"]


def test_model_info_health_flush(server):
    eng, client = server
    info = client.get("/get_model_info").json()
    assert info["model_path"] == info["served_model_name"] == "llama"  # the folder's name
    assert info["is_generation"] is True
    assert client.get("/health").status_code == 200
    assert client.post("/flush_cache").status_code == 200
    assert client.get("/flush_cache").status_code == 405, "state-changing routes are POST-only"
    assert eng.metrics()["cache_tokens"] == 0


def parse_prometheus(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            samples[name_labels.split("{")[0]] = float(value)
    return samples


def test_metrics_are_prometheus_text_matching_engine(server):
    eng, client = server
    client.post("/generate", json={"text": "The quick", "sampling_params": GREEDY})
    resp = client.get("/metrics")
    assert resp.headers["content-type"].startswith("text/plain")
    samples = parse_prometheus(resp.text)
    ref = eng.metrics()
    assert samples["sgl_engine_kv_total"] == ref["kv_total"]
    assert samples["sgl_engine_prompt_tokens_total"] == ref["prompt_tokens"]
    assert samples["sgl_engine_finished_requests_total"] == ref["finished_requests"]
    for line in resp.text.splitlines():
        if line.startswith("# TYPE"):
            assert line.split()[3] in ("counter", "gauge")
