"""ChatSGLang / SGLang on a tiny random model: engine parity, streaming, batching, grammars."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import jsonschema
import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel
from typing_extensions import TypedDict

from sgl_adapters.langchain import ChatSGLang, EngineRegistry, SGLang
from sgl_adapters.langchain import tools as lc_tools
from sgl_adapters.langchain.messages import render, to_chat_dicts, to_openai_dicts

ENGINE_KWARGS = {"device": "cpu", "max_total_tokens": 8192}
SYSTEM = "You are a helpful assistant. " * 12


@pytest.fixture(scope="module")
def tiny_lc(tmp_path_factory):
    """A tiny random Llama with a 4096-token context (SmolLM2's tool prompt is long in the
    byte-level tiny tokenizer)."""
    from sgl_engine.testing import make_tiny_model_dir

    path = tmp_path_factory.mktemp("tiny-lc")
    return str(make_tiny_model_dir(path, max_position_embeddings=4096))


@pytest.fixture(scope="module")
def registry():
    """A registry over a private plugin manager (its own engine pool), shut down at the end."""
    from sgl_plugins.manager import PluginManager

    manager = PluginManager().load()
    reg = EngineRegistry(manager)
    yield reg
    reg.close()
    manager.backends()["local"].factory.close()


@pytest.fixture
def chat(tiny_lc, registry):
    return ChatSGLang(model=tiny_lc, max_tokens=12, registry=registry, engine_kwargs=ENGINE_KWARGS)


def _engine(model):
    return model.client().backend.engine


def _reference(model, messages, **params):
    """The engine's own greedy output for the prompt the adapter renders."""
    engine = _engine(model)
    prompt = engine.apply_chat_template(to_chat_dicts(messages))
    sp = {"max_new_tokens": model.max_tokens, "temperature": 0.0, "top_p": 1.0, **params}
    return engine.generate(prompt, sp)


@tool
def pick(color: Literal["red", "green", "blue"], loud: bool) -> str:
    """Pick a color."""
    return color


@tool
def count(n: Literal[1, 2, 3]) -> int:
    """Count to n."""
    return n


class Pet(BaseModel):
    kind: Literal["cat", "dog"]
    friendly: bool


class PetDict(TypedDict):
    kind: Literal["cat", "dog"]
    friendly: bool


def test_invoke_matches_engine_and_reports_usage(chat):
    messages = [HumanMessage("hello there")]
    ref = _reference(chat, messages)
    msg = chat.invoke(messages)
    assert msg.content == ref["text"]
    assert msg.response_metadata["model_name"] == chat.model_name
    assert msg.response_metadata["finish_reason"] == ref["meta_info"]["finish_reason"]["type"]
    usage = msg.usage_metadata
    assert usage["input_tokens"] == ref["meta_info"]["prompt_tokens"]
    assert usage["output_tokens"] == ref["meta_info"]["completion_tokens"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    # the reference call just cached this prompt
    assert usage["input_token_details"]["cache_read"] == ref["meta_info"]["prompt_tokens"] - 1


def test_per_call_params_override_construction(chat):
    msg = chat.invoke("count please", max_tokens=3)
    assert msg.usage_metadata["output_tokens"] == 3
    assert msg.response_metadata["finish_reason"] == "length"
    full = chat.invoke("count please", max_tokens=8)
    stop = full.content[2:4]
    cut = chat.invoke("count please", max_tokens=8, stop=[stop])
    assert cut.content == full.content[: full.content.index(stop)]


class _Tokens(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs) -> None:
        self.tokens.append(token)


def test_stream_yields_tokens_to_callbacks_and_matches_invoke(chat):
    expected = chat.invoke("stream me").content
    handler = _Tokens()
    chunks = list(chat.stream("stream me", config={"callbacks": [handler]}))
    assert "".join(c.content for c in chunks) == expected
    assert len([c for c in chunks if c.content]) > 1
    assert "".join(handler.tokens) == expected
    assert chunks[-1].chunk_position == "last"
    full = sum(chunks[1:], chunks[0])
    assert full.usage_metadata["output_tokens"] == 12
    assert full.response_metadata["model_name"] == chat.model_name


def test_async_paths_match_sync(chat):
    expected = chat.invoke("async please").content

    async def run():
        msg = await chat.ainvoke("async please")
        text = "".join([c.content async for c in chat.astream("async please")])
        return msg.content, text

    assert asyncio.run(run()) == (expected, expected)


def test_streaming_flag_routes_invoke_through_stream(tiny_lc, registry):
    model = ChatSGLang(
        model=tiny_lc,
        max_tokens=6,
        streaming=True,
        registry=registry,
        engine_kwargs=ENGINE_KWARGS,
    )
    handler = _Tokens()
    msg = model.invoke("hi", config={"callbacks": [handler]})
    assert "".join(handler.tokens) == msg.content and len(handler.tokens) > 1


def test_instances_share_one_engine(tiny_lc, registry, chat):
    other = ChatSGLang(model=tiny_lc, registry=registry, engine_kwargs=ENGINE_KWARGS)
    llm = SGLang(model=tiny_lc, registry=registry, engine_kwargs=ENGINE_KWARGS)
    assert _engine(other) is _engine(chat) is _engine(llm)
    assert len(registry) == 1
    backend = registry.manager.get_backend("local", model_path=tiny_lc, **ENGINE_KWARGS)
    assert backend.engine is _engine(chat)
    backend.close()
    assert chat.invoke("still serving").usage_metadata["output_tokens"] > 0


def test_default_registry_shares_the_plugin_layers_engine(tiny_lc):
    from sgl_plugins.manager import get_backend

    default = EngineRegistry()
    backend = get_backend("local", model_path=tiny_lc, **ENGINE_KWARGS)
    try:
        assert default.get(tiny_lc, ENGINE_KWARGS) is backend.engine
        pool = default.manager.backends()["local"].factory.pool
        before = len(pool)
        assert default.get(tiny_lc, ENGINE_KWARGS) is backend.engine
        assert len(pool) == before
    finally:
        default.close()
        backend.close()


def _prompts(n):
    return [[SystemMessage(SYSTEM), HumanMessage(f"question {i}")] for i in range(n)]


def _prefill_cost(chat, run):
    engine = _engine(chat)
    assert engine.flush_cache()
    before = engine.metrics()["prefill_tokens"]
    out = run()
    return out, engine.metrics()["prefill_tokens"] - before


def test_batch_prefills_the_shared_prefix_once(chat):
    prompts = _prompts(4)
    engine = _engine(chat)
    ids = [engine.tokenizer.encode(engine.apply_chat_template(to_chat_dicts(p))) for p in prompts]
    shared = len(ids[0])
    while any(x[:shared] != ids[0][:shared] for x in ids):
        shared -= 1
    one_by_one = [chat.invoke(p).content for p in prompts]
    out, cost = _prefill_cost(chat, lambda: chat.batch(prompts))
    assert [m.content for m in out] == one_by_one
    assert cost == shared + sum(len(x) - shared for x in ids)
    out, cost = _prefill_cost(chat, lambda: asyncio.run(chat.abatch(prompts)))
    assert [m.content for m in out] == one_by_one
    assert cost == shared + sum(len(x) - shared for x in ids)


def test_llm_class_matches_engine_and_batches(tiny_lc, registry):
    llm = SGLang(model=tiny_lc, max_tokens=8, registry=registry, engine_kwargs=ENGINE_KWARGS)
    engine = llm.client().backend.engine
    prompts = [SYSTEM + f"item {i}" for i in range(3)]
    refs = engine.generate(prompts, {"max_new_tokens": 8, "temperature": 0.0})
    assert engine.flush_cache()
    before = engine.metrics()["prefill_tokens"]
    assert llm.batch(prompts) == [r["text"] for r in refs]
    assert engine.metrics()["prefill_tokens"] - before < 2 * len(engine.tokenizer.encode(SYSTEM))
    assert "".join(llm.stream(prompts[0])) == refs[0]["text"]
    result = llm.generate(prompts[:1])
    info = result.generations[0][0].generation_info
    assert info["finish_reason"] == refs[0]["meta_info"]["finish_reason"]["type"]
    assert result.llm_output["usage"]["input_tokens"] == refs[0]["meta_info"]["prompt_tokens"]
    assert asyncio.run(llm.ainvoke(prompts[1])) == refs[1]["text"]


STRICT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('no system role') }}{% endif %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate') }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\\n{% endif %}"
)


def test_messages_a_strict_template_refuses_are_merged():
    from sgl_engine.testing import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    tok.chat_template = STRICT_TEMPLATE
    messages = [
        SystemMessage("sys one"),
        SystemMessage("sys two"),
        HumanMessage("u1"),
        HumanMessage("u2", name="bob"),
        AIMessage("a1"),
        AIMessage("a2"),
        HumanMessage("how are you"),
    ]
    chat = to_chat_dicts(messages)
    with pytest.raises(Exception, match="alternate|system"):
        tok.apply_chat_template(chat, tokenize=False)
    prompt = render(chat, lambda m: tok.apply_chat_template(m, tokenize=False))
    for text in ("sys one", "sys two", "u1", "bob: u2", "a1", "a2", "how are you"):
        assert text in prompt
    assert prompt.index("sys two") < prompt.index("u1") < prompt.index("a2")


def test_tool_history_renders_in_the_family_format(chat):
    """The tiny ChatML template renders no tools: calls and results become text in the
    family's format (Hermes for an unknown template), which the family parses back."""
    from sgl_engine.families import prepare_chat

    call = {"name": "pick", "args": {"color": "red", "loud": True}, "id": "c1"}
    history = [
        HumanMessage("pick"),
        AIMessage("", tool_calls=[call]),
        ToolMessage("done", tool_call_id="c1", name="pick"),
    ]
    family = chat.model_family()
    assert family.name == "hermes"
    msgs, tools = prepare_chat(
        family, _engine(chat).tokenizer.chat_template, to_openai_dicts(history)
    )
    assert tools is None and msgs[1]["role"] == "assistant"
    content, calls = family.tool_format.parse(msgs[1]["content"])
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("pick", call["args"])]
    assert msgs[2]["role"] == "user"
    body = msgs[2]["content"][len("<tool_response>") : -len("</tool_response>")]
    assert json.loads(body) == {"name": "pick", "content": "done"}


@pytest.mark.parametrize("seed", range(3))
def test_forced_tool_calls_always_parse_and_validate(chat, seed):
    bound = chat.bind_tools([pick, count], tool_choice="any", parallel_tool_calls=False)
    msg = bound.invoke("choose", max_tokens=160, temperature=1.0, seed=seed)
    assert not msg.invalid_tool_calls and len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    spec = {s["name"]: s for s in lc_tools.tool_specs([pick, count])}[call["name"]]
    jsonschema.validate(call["args"], spec["parameters"])
    named = chat.bind_tools([pick, count], tool_choice="count", strict=True)
    forced = named.invoke("choose", max_tokens=160, temperature=1.0, seed=seed)
    assert forced.tool_calls and {c["name"] for c in forced.tool_calls} == {"count"}
    assert all(c["args"]["n"] in (1, 2, 3) for c in forced.tool_calls)


@pytest.mark.parametrize("seed", range(3))
def test_parallel_tool_calls_each_validate(chat, seed):
    from sgl_engine.families import tool_grammar

    bound = chat.bind_tools([pick, count], tool_choice="required", parallel_tool_calls=True)
    msg = bound.invoke("choose", max_tokens=200, temperature=1.0, seed=seed)
    specs = {s["name"]: s for s in lc_tools.tool_specs([pick, count])}
    assert msg.tool_calls or msg.response_metadata["finish_reason"] == "length"
    for call in msg.tool_calls:
        jsonschema.validate(call["args"], specs[call["name"]]["parameters"])
    grammar = tool_grammar(chat.model_family().tool_format, list(specs.values()), "required")
    assert "tool_call)*" in grammar  # several calls per turn admitted


def test_streamed_tool_call_chunks_aggregate_to_the_invoked_call(chat):
    bound = chat.bind_tools([pick], tool_choice="pick", parallel_tool_calls=False)
    msg = bound.invoke("choose", max_tokens=160)
    chunks = list(bound.stream("choose", max_tokens=160))
    assert sum(len(c.tool_call_chunks) for c in chunks) > 1
    assert {c["index"] for ch in chunks for c in ch.tool_call_chunks} == set(
        range(len(msg.tool_calls))
    )
    full = sum(chunks[1:], chunks[0])
    assert [(c["name"], c["args"]) for c in full.tool_calls] == [
        (c["name"], c["args"]) for c in msg.tool_calls
    ]


@pytest.mark.parametrize("seed", range(4))
def test_auto_tool_choice_gives_calls_or_plain_text(chat, seed):
    bound = chat.bind_tools([pick])
    msg = bound.invoke("maybe", max_tokens=160, temperature=1.0, seed=seed)
    assert not msg.invalid_tool_calls
    assert "<tool_call>" not in msg.content
    for call in msg.tool_calls:
        assert call["name"] == "pick" and call["args"]["color"] in ("red", "green", "blue")


def test_tool_choice_none_answers_in_text(chat):
    msg = chat.bind_tools([pick], tool_choice="none").invoke("pick", max_tokens=20)
    assert not msg.tool_calls and "<tool_call>" not in msg.content


def test_response_format_and_logprobs_as_invoke_kwargs(chat):
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": Pet.model_json_schema()}}
    msg = chat.invoke("a pet", max_tokens=160, response_format=fmt)
    Pet.model_validate_json(msg.content)
    obj = chat.invoke("x", max_tokens=60, response_format={"type": "json_object"})
    assert obj.content.startswith("{")  # a JSON object under the grammar (may be cut by length)
    out = chat.invoke("hello", logprobs=True, top_logprobs=2)
    lp = out.response_metadata["logprobs"]["content"]
    assert len(lp) == out.usage_metadata["output_tokens"]
    assert "".join(e["token"] for e in lp).startswith(out.content)
    assert all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in lp)


def _streamed_logprobs(chunks) -> list[dict]:
    return [e for c in chunks for e in c.response_metadata.get("logprobs", {}).get("content", [])]


def _same_logprobs(streamed: list[dict], whole: list[dict]) -> None:
    """Same tokens and alternatives; logprobs equal up to float noise (stream and invoke run
    in different batches)."""
    assert [e["token"] for e in streamed] == [e["token"] for e in whole]
    assert [e["logprob"] for e in streamed] == pytest.approx(
        [e["logprob"] for e in whole], abs=1e-4
    )
    for s, w in zip(streamed, whole, strict=True):
        assert [a["token"] for a in s["top_logprobs"]] == [a["token"] for a in w["top_logprobs"]]


def test_streamed_chunks_carry_their_tokens_logprobs(chat):
    """stream(..., logprobs=True): each chunk carries its own tokens' logprobs where ChatOpenAI
    puts them (response_metadata["logprobs"]["content"]); greedy, they concatenate (and the
    chunks add up) to invoke's list, sync and async."""
    whole = chat.invoke("hello", logprobs=True, top_logprobs=2).response_metadata["logprobs"]
    assert len(whole["content"]) == 12
    chunks = list(chat.stream("hello", logprobs=True, top_logprobs=2))
    assert len([c for c in chunks if c.response_metadata.get("logprobs")]) > 1
    _same_logprobs(_streamed_logprobs(chunks), whole["content"])
    full = sum(chunks[1:], chunks[0])
    _same_logprobs(full.response_metadata["logprobs"]["content"], whole["content"])

    async def run():
        return [c async for c in chat.astream("hello", logprobs=True, top_logprobs=2)]

    _same_logprobs(_streamed_logprobs(asyncio.run(run())), whole["content"])
    assert not _streamed_logprobs(chat.stream("hello"))


def test_tools_with_response_format_answer_json_or_call(chat):
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": Pet.model_json_schema()}}
    bound = chat.bind_tools([count], response_format=fmt, max_tokens=160)
    for seed in range(3):
        msg = bound.invoke("x", temperature=1.0, seed=seed)
        if not msg.tool_calls:
            Pet.model_validate_json(msg.content)


def test_n_seed_token_counts_and_profile(chat):
    model = chat.model_copy(update={"n": 3, "seed": 7, "temperature": 1.0})
    result = model.generate([[HumanMessage("hi")]])
    assert len(result.generations[0]) == 3
    again = model.generate([[HumanMessage("hi")]])
    assert [g.text for g in again.generations[0]] == [g.text for g in result.generations[0]]
    messages = [SystemMessage("be brief"), HumanMessage("hello there")]
    out = chat.invoke(messages)
    assert chat.get_num_tokens_from_messages(messages) == out.usage_metadata["input_tokens"]
    bound_out = chat.bind_tools([pick]).invoke(messages)
    assert (
        chat.get_num_tokens_from_messages(messages, tools=[pick])
        == bound_out.usage_metadata["input_tokens"]
    )
    assert chat.get_num_tokens("hello there") == len(_engine(chat).tokenizer.encode("hello there"))
    profile = chat.profile
    assert profile["tool_calling"] and profile["structured_output"]
    assert profile["max_input_tokens"] == 4096


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
@pytest.mark.parametrize("schema", [Pet, PetDict, Pet.model_json_schema()])
def test_structured_output_always_parses(chat, method, schema):
    model = chat.model_copy(update={"max_tokens": 160})
    out = model.with_structured_output(schema, method=method).invoke("a pet")
    data = out.model_dump() if isinstance(out, Pet) else out
    assert isinstance(out, Pet) == (schema is Pet)
    assert data["kind"] in ("cat", "dog") and isinstance(data["friendly"], bool)
    raw = model.with_structured_output(schema, method=method, include_raw=True).invoke("a pet")
    assert isinstance(raw["raw"], AIMessage) and raw["parsing_error"] is None
    assert raw["parsed"] == out


def test_json_mode_without_schema_gives_a_json_object(chat):
    model = chat.model_copy(update={"max_tokens": 60})
    out = model.with_structured_output(method="json_mode").invoke("json")
    assert isinstance(out, dict)


def test_runnable_parallel_branches_prefill_the_shared_prefix_once(chat):
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.runnables import RunnableParallel

    branches = {
        f"b{i}": ChatPromptTemplate.from_messages(
            [("system", SYSTEM), ("human", f"topic {i}: {{x}}")]
        )
        | chat
        for i in range(3)
    }
    engine = _engine(chat)
    chats = [[SystemMessage(SYSTEM), HumanMessage(f"topic {i}: sea")] for i in range(3)]
    ids = [engine.tokenizer.encode(engine.apply_chat_template(to_chat_dicts(c))) for c in chats]
    shared = len(ids[0])
    while any(x[:shared] != ids[0][:shared] for x in ids):
        shared -= 1
    one_by_one = [chat.invoke(c).content for c in chats]
    out, cost = _prefill_cost(chat, lambda: RunnableParallel(branches).invoke({"x": "sea"}))
    assert [out[f"b{i}"].content for i in range(3)] == one_by_one
    assert cost == shared + sum(len(x) - shared for x in ids)
