"""Real clients over real HTTP against `sgl_engine.server` serving the embedded SmolLM2:
the official `openai` client, LangChain's `ChatOpenAI`, and SGLang programs on
`RuntimeEndpoint`. Answers are checked against the in-process engine on the same weights."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel
from sgl_engine.server import ServerThread, create_app

import sgl_adapters.lang as sgl

API_KEY = "test-key"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def served(smollm2_path):
    from sgl_engine import Engine

    eng = Engine(smollm2_path, device="cpu", max_total_tokens=16384)
    with ServerThread(create_app(eng, api_key=API_KEY, model_name="smollm2")) as srv:
        yield eng, srv.base_url
    eng.check_invariants()
    eng.shutdown()


@pytest.fixture(scope="module")
def client(served):
    with openai.OpenAI(base_url=served[1] + "/v1", api_key=API_KEY, max_retries=0) as c:
        yield c


def reference_chat(eng, messages, max_new_tokens):
    ids = eng.tokenizer.encode(eng.apply_chat_template(messages), add_special_tokens=False)
    return eng.generate(
        input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": max_new_tokens}
    )


def test_openai_models_and_bad_key(served, client):
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    with openai.OpenAI(base_url=served[1] + "/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_openai_chat_equals_engine(served, client):
    eng, _ = served
    ref = reference_chat(eng, QUESTION, 16)
    resp = client.chat.completions.create(
        model="smollm2", messages=QUESTION, max_tokens=16, temperature=0
    )
    assert resp.choices[0].message.content == ref["text"]
    assert "Paris" in resp.choices[0].message.content
    assert resp.usage.prompt_tokens == ref["meta_info"]["prompt_tokens"]
    assert resp.usage.prompt_tokens_details.cached_tokens > 0  # the reference warmed the cache


def test_openai_chat_stream_equals_non_stream(client):
    kwargs = dict(model="smollm2", messages=QUESTION, max_tokens=24, temperature=0)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    stream = client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == full
    assert usage is not None and usage.completion_tokens > 0


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def _streamed_message(stream):
    content, calls, reason = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            name, args = calls.get(call.index, (None, ""))
            calls[call.index] = (call.function.name or name, args + (call.function.arguments or ""))
        reason = chunk.choices[0].finish_reason or reason
    return content, [(n, json.loads(a)) for n, a in (calls[i] for i in sorted(calls))], reason


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_openai_chat_stream_with_tools_equals_non_stream(client, choice):
    """Content streams as it is decoded and calls arrive whole as their blocks close; the
    streamed message adds up to the non-streamed one."""
    ask = [{"role": "user", "content": "Use the tool: what is the weather in Paris?"}]
    kwargs = dict(
        model="smollm2",
        messages=ask,
        tools=[WEATHER_TOOL],
        tool_choice=choice,
        parallel_tool_calls=False,
        max_tokens=48,
        temperature=0,
    )
    ref = client.chat.completions.create(**kwargs).choices[0]
    content, calls, reason = _streamed_message(
        client.chat.completions.create(**kwargs, stream=True)
    )
    assert content.strip() == (ref.message.content or "").strip()
    expected = [
        (c.function.name, json.loads(c.function.arguments)) for c in ref.message.tool_calls or []
    ]
    assert calls == expected and reason == ref.finish_reason
    if choice == "required":
        assert calls and calls[0][0] == "get_weather"


TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current local time in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
        },
    },
}


def test_openai_tool_call_list_and_no_reasoning_for_smollm2(client):
    """SmolLM2's format holds several calls per turn (a JSON list; parallel calls are admitted,
    though the 135M model greedily makes one here); tool_choice "auto" on a user turn decodes
    that list (its tuned protocol), every call valid, streamed equal to whole. SmolLM2 has no
    reasoning markers, so no reasoning_content comes back. (Parallel calls and
    reasoning_content are shown on tiny Qwen3/DeepSeek-R1-family models in
    tests/test_server_tools.py.)"""
    ask = [{"role": "user", "content": "What are the weather and the time in Paris and Rome?"}]
    kwargs = dict(
        model="smollm2",
        messages=ask,
        tools=[WEATHER_TOOL, TIME_TOOL],
        max_tokens=120,
        temperature=0,
    )
    out = client.chat.completions.create(**kwargs).choices[0]
    assert out.finish_reason == "tool_calls" and out.message.tool_calls
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in kwargs["tools"]}
    for call in out.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    assert "reasoning_content" not in (out.message.model_extra or {})
    content, calls, reason = _streamed_message(
        client.chat.completions.create(**kwargs, stream=True)
    )
    expected = [(c.function.name, json.loads(c.function.arguments)) for c in out.message.tool_calls]
    assert calls == expected and reason == "tool_calls" and not content
    single = client.chat.completions.create(**kwargs, parallel_tool_calls=False).choices[0]
    assert len(single.message.tool_calls) == 1


def test_openai_completions_and_stream(served, client):
    eng, _ = served
    prompt = "The capital of France is"
    ref = eng.generate(prompt, {"temperature": 0, "max_new_tokens": 8})
    resp = client.completions.create(model="smollm2", prompt=prompt, max_tokens=8, temperature=0)
    assert resp.choices[0].text == ref["text"]
    streamed = client.completions.create(
        model="smollm2", prompt=prompt, max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == ref["text"]


class City(BaseModel):
    name: str
    country: str


def test_openai_json_schema_structured_output(client):
    parsed = client.chat.completions.parse(
        model="smollm2",
        messages=[{"role": "user", "content": "Give the capital city of France as JSON."}],
        response_format=City,
        max_tokens=64,
        temperature=0,
    )
    city = parsed.choices[0].message.parsed
    assert isinstance(city, City)
    jsonschema.validate(json.loads(parsed.choices[0].message.content), City.model_json_schema())


def test_openai_bad_parameter_is_a_400(client):
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.chat.completions.create(model="smollm2", messages=QUESTION, top_p=3.0)


def test_langchain_chat_openai_invoke_stream_and_tools(served):
    from langchain_openai import ChatOpenAI

    eng, url = served
    llm = ChatOpenAI(
        base_url=url + "/v1", api_key=API_KEY, model="smollm2", temperature=0, max_tokens=16
    )
    ref = reference_chat(eng, QUESTION, 16)["text"]
    assert llm.invoke(QUESTION).content == ref
    assert "".join(c.content for c in llm.stream(QUESTION)) == ref

    def get_weather(city: str) -> str:
        """Get the weather in a city."""
        return "sunny"

    forced = llm.bind_tools([get_weather], tool_choice="get_weather").bind(max_tokens=48)
    msg = forced.invoke([{"role": "user", "content": "What's the weather in Paris?"}])
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather"
    assert isinstance(msg.tool_calls[0]["args"].get("city"), str)


def test_sglang_program_on_runtime_endpoint(served):
    eng, url = served

    @sgl.function
    def qa(s, question):
        s += "Question: " + question + "\nAnswer:"
        s += sgl.gen("answer", max_tokens=8, stop="\n", temperature=0)
        s += "\nIs that right? "
        s += sgl.select("ok", choices=["yes", "no"])

    endpoint = sgl.RuntimeEndpoint(url, api_key=API_KEY)
    state = qa.run(question="What is the capital of France?", backend=endpoint)
    assert state.error() is None
    prompt = "Question: What is the capital of France?\nAnswer:"
    ref = eng.generate(prompt, {"temperature": 0, "max_new_tokens": 8, "stop": "\n"})
    assert state["answer"] == ref["text"]
    assert state["ok"] in ("yes", "no")
