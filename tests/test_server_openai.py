"""The OpenAI routes over real HTTP against a tiny random model, checked against the engine."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from sgl_engine.server import ServerThread, create_app

GREEDY = {"temperature": 0}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fox."}]


@pytest.fixture(scope="module")
def server(tiny_llama):
    from sgl_engine import Engine

    eng = Engine(tiny_llama, device="cpu", max_total_tokens=4096)
    with ServerThread(create_app(eng, model_name="tiny")) as srv:
        yield eng, httpx.Client(base_url=srv.base_url, timeout=60)
    eng.check_invariants()
    eng.shutdown()


def chat_ids(eng, messages=CHAT):
    text = eng.apply_chat_template(messages)
    return eng.tokenizer.encode(text, add_special_tokens=False)


def sse_events(client, path, body):
    events = []
    with client.stream("POST", path, json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line:
                assert line.startswith("data: ")
                events.append(line[len("data: ") :])
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_models_lists_the_served_name(server):
    _, client = server
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["tiny"]


def test_chat_greedy_equals_engine_and_reports_usage(server):
    eng, client = server
    ids = chat_ids(eng)
    ref = eng.generate(input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 12})
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 12, **GREEDY}
    out = client.post("/v1/chat/completions", json=body).json()
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": ref["text"]}
    assert choice["finish_reason"] == ref["meta_info"]["finish_reason"]["type"]
    usage = out["usage"]
    assert usage["prompt_tokens"] == len(ids)
    assert usage["completion_tokens"] == len(ref["output_ids"])
    assert usage["total_tokens"] == len(ids) + len(ref["output_ids"])
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0  # the reference ran first


def test_cached_tokens_zero_after_flush_then_reused(server):
    eng, client = server
    messages = [{"role": "user", "content": "A radix tree shares prefixes between keys."}]
    body = {"messages": messages, "max_tokens": 2, **GREEDY}
    assert client.post("/flush_cache").status_code == 200
    first = client.post("/v1/chat/completions", json=body).json()["usage"]
    second = client.post("/v1/chat/completions", json=body).json()["usage"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert 0 < second["prompt_tokens_details"]["cached_tokens"] <= second["prompt_tokens"]


def test_chat_stream_concatenates_to_the_full_answer(server):
    eng, client = server
    body = {"messages": CHAT, "max_tokens": 16, "stream": True, **GREEDY}
    body["stream_options"] = {"include_usage": True}
    events = sse_events(client, "/v1/chat/completions", body)
    full = client.post("/v1/chat/completions", json={**body, "stream": False}).json()
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == full["choices"][0]["message"]["content"]
    finals = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
    assert finals[-1] == full["choices"][0]["finish_reason"] and finals[:-1] == [None] * (
        len(finals) - 1
    )
    assert (
        events[-1]["choices"] == []
        and events[-1]["usage"]["completion_tokens"] == (full["usage"]["completion_tokens"])
    )


def test_n_choices_stream_and_non_stream(server):
    _, client = server
    body = {"messages": CHAT, "max_tokens": 6, "n": 3, "temperature": 1.0, "seed": 7}
    out = client.post("/v1/chat/completions", json=body).json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert out["usage"]["prompt_tokens"] == len(chat_ids(server[0]))  # the prompt counts once
    assert 3 <= out["usage"]["completion_tokens"] <= 3 * 6
    events = sse_events(client, "/v1/chat/completions", {**body, "stream": True})
    texts = {0: "", 1: "", 2: ""}
    for e in events:
        for c in e["choices"]:
            texts[c["index"]] += c["delta"].get("content", "")
    assert texts == {c["index"]: c["message"]["content"] for c in out["choices"]}


def test_stop_string_truncates_like_the_engine(server):
    eng, client = server
    ref = eng.generate(input_ids=chat_ids(eng), sampling_params={**GREEDY, "max_new_tokens": 16})
    stop = ref["text"][3:5]
    assert stop, "reference too short to pick a stop string"
    want = ref["text"][: ref["text"].index(stop)]
    body = {"messages": CHAT, "max_tokens": 16, "stop": [stop], **GREEDY}
    choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["message"]["content"] == want
    assert choice["finish_reason"] == "stop" and choice["matched_stop"] == stop


def test_chat_logprobs_match_engine(server):
    eng, client = server
    ids = chat_ids(eng)
    ref = eng.generate(
        input_ids=ids,
        sampling_params={**GREEDY, "max_new_tokens": 6},
        return_logprob=True,
        top_logprobs_num=3,
    )
    body = {"messages": CHAT, "max_tokens": 6, "logprobs": True, "top_logprobs": 3, **GREEDY}
    content = client.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"]
    content = content["content"]
    want = ref["meta_info"]["output_token_logprobs"]
    assert [c["logprob"] for c in content] == pytest.approx([lp for lp, _, _ in want], abs=1e-4)
    assert [c["token"] for c in content] == [eng.tokenizer.decode([t]) for _, t, _ in want]
    for c, tops in zip(content, ref["meta_info"]["output_top_logprobs"], strict=True):
        assert len(c["top_logprobs"]) == 3
        assert c["top_logprobs"][0]["logprob"] == pytest.approx(tops[0][0], abs=1e-4)


def test_completions_batch_echo_and_logprobs(server):
    eng, client = server
    prompts = ["The quick brown fox", "Question: What is"]
    body = {"prompt": prompts, "max_tokens": 5, "logprobs": 2, "echo": True, **GREEDY}
    out = client.post("/v1/completions", json=body).json()
    assert out["object"] == "text_completion" and len(out["choices"]) == 2
    for prompt, choice in zip(prompts, out["choices"], strict=True):
        ref = eng.generate(prompt, {**GREEDY, "max_new_tokens": 5})
        assert choice["text"] == prompt + ref["text"]
        lp = choice["logprobs"]
        n_prompt = len(eng.tokenizer.encode(prompt))
        assert len(lp["tokens"]) == n_prompt + len(ref["output_ids"])
        assert lp["token_logprobs"][0] is None and all(
            x is not None for x in lp["token_logprobs"][1:]
        )
        assert lp["text_offset"] == sorted(lp["text_offset"])


def test_completions_token_prompt_and_stream(server):
    eng, client = server
    ids = eng.tokenizer.encode("A radix tree")
    ref = eng.generate(input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 8})
    body = {"prompt": ids, "max_tokens": 8, **GREEDY}
    assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == ref["text"]
    events = sse_events(client, "/v1/completions", {**body, "stream": True})
    assert "".join(e["choices"][0]["text"] for e in events) == ref["text"]


def test_json_schema_response_format_validates(server):
    _, client = server
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    body = {"messages": CHAT, "max_tokens": 64, "response_format": fmt, **GREEDY}
    choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    jsonschema.validate(json.loads(choice["message"]["content"]), schema)


def test_json_object_response_format_is_an_object(server):
    _, client = server
    body = {"messages": CHAT, "max_tokens": 64, "response_format": {"type": "json_object"}}
    choice = client.post("/v1/chat/completions", json={**body, **GREEDY}).json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    assert isinstance(json.loads(choice["message"]["content"]), dict)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_forced_tool_call_parses_and_validates(server, choice):
    _, client = server
    body = {"messages": CHAT, "max_tokens": 96, "tools": [WEATHER], "tool_choice": choice}
    body["parallel_tool_calls"] = False  # a random model would keep adding calls
    out = client.post("/v1/chat/completions", json={**body, **GREEDY}).json()["choices"][0]
    assert out["finish_reason"] == "tool_calls", out
    calls = out["message"]["tool_calls"]
    assert calls and all(c["function"]["name"] == "get_weather" for c in calls)
    for call in calls:
        jsonschema.validate(
            json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"]
        )


def test_unknown_tool_choice_is_a_400(server):
    _, client = server
    choice = {"type": "function", "function": {"name": "nope"}}
    body = {"messages": CHAT, "tools": [WEATHER], "tool_choice": choice}
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 400 and "nope" in resp.json()["error"]["message"]
    assert resp.json()["error"]["param"] == "tool_choice"
