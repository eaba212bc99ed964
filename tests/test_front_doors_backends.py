"""Every front door over every kind of backend, against our real server (no mocks of it).

Backends: `local` (the in-process engine the server also serves), `http` (our server's
/generate), `openai` (our server's /v1 routes through the official client) and `reverse` (the
example third-party plugin, registered by name in a test PluginManager). Greedy answers over
http and openai must equal the local ones (same engine, same prompt); what a backend cannot
do is one clear `BackendCapabilityError` naming backend and capability.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import dspy
import pytest
from sgl_engine.server import ServerThread, create_app
from sgl_plugins.backend import BackendCapabilityError
from sgl_plugins.manager import PluginManager

import sgl_adapters.lang as sgl
from sgl_adapters.dspy import LM, has_engine_contract
from sgl_adapters.engines import EngineRegistry
from sgl_adapters.langchain import ChatSGLang, SGLang

EXAMPLE_PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "example-plugin"
BACKENDS = ["local", "http", "openai", "reverse"]
SCHEMA = {
    "title": "Pick",
    "type": "object",
    "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]}},
    "required": ["color"],
}


@pytest.fixture(scope="module")
def served(tiny_llama):
    from sgl_engine import Engine

    eng = Engine(tiny_llama, device="cpu", max_total_tokens=8192)
    with ServerThread(create_app(eng, model_name="tiny")) as srv:
        yield eng, srv.base_url
    eng.shutdown()


@pytest.fixture(scope="module")
def manager():
    """Built-ins plus the example plugin registered by name, as its entry point would."""
    sys.path.insert(0, str(EXAMPLE_PLUGIN))
    try:
        import sgl_example_plugin
    finally:
        sys.path.remove(str(EXAMPLE_PLUGIN))
    pm = PluginManager({}, entry_points=lambda: []).load()
    assert pm.register(sgl_example_plugin, "reverse")
    yield pm
    pm.close()


@pytest.fixture(scope="module")
def registry(manager):
    reg = EngineRegistry(manager)
    yield reg
    reg.close()


def spec(kind: str, served, manager) -> tuple:
    """(backend, backend_kwargs) a front door takes for `kind`."""
    eng, url = served
    if kind == "local":
        return manager.get_backend("local", engine=eng), {}
    if kind == "http":
        return "http", {"base_url": url}
    if kind == "openai":
        return "openai", {"base_url": url + "/v1", "model": "tiny"}
    return "reverse", {}


def chat(kind, served, manager, registry, **kwargs) -> ChatSGLang:
    backend, bkw = spec(kind, served, manager)
    kwargs.setdefault("max_tokens", 8)
    return ChatSGLang(backend=backend, backend_kwargs=bkw, registry=registry, **kwargs)


@pytest.mark.parametrize("kind", BACKENDS)
def test_chat_model_invoke_stream_usage(kind, served, manager, registry):
    model = chat(kind, served, manager, registry)
    question = "Tell me about the radix tree of kind " + kind
    msg = model.invoke(question)
    assert isinstance(msg.content, str) and msg.content
    assert msg.usage_metadata["input_tokens"] > 0 and msg.usage_metadata["output_tokens"] > 0
    streamed = list(model.stream(question))
    assert "".join(c.content for c in streamed) == msg.content
    assert streamed[-1].usage_metadata["output_tokens"] == msg.usage_metadata["output_tokens"]
    if kind != "reverse":  # the reverse plugin counts cache hits within one graph only
        again = model.invoke(question)
        assert again.usage_metadata["input_token_details"]["cache_read"] > 0
    if kind in ("http", "openai"):
        local = chat("local", served, manager, registry).invoke(question)
        assert msg.content == local.content


@pytest.mark.parametrize("kind", BACKENDS)
def test_chat_model_streams_logprobs_or_refuses(kind, served, manager, registry):
    """Streamed logprobs through the Backend protocol: backends with "logprobs" put each
    chunk's tokens' logprobs in it (together invoke's tokens); the others refuse at once."""
    model = chat(kind, served, manager, registry)
    question = "Stream logprobs for backend " + kind
    if kind in ("openai", "reverse"):
        with pytest.raises(BackendCapabilityError, match=f"'{kind}' lacks capability 'logprobs'"):
            list(model.stream(question, logprobs=True))
        return
    whole = model.invoke(question, logprobs=True, top_logprobs=1)
    chunks = list(model.stream(question, logprobs=True, top_logprobs=1))
    streamed = [
        e for c in chunks for e in c.response_metadata.get("logprobs", {}).get("content", [])
    ]
    tokens = [e["token"] for e in whole.response_metadata["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == tokens and len(tokens) == 8
    assert all(len(e["top_logprobs"]) == 1 for e in streamed)


@pytest.mark.parametrize("kind", BACKENDS)
def test_chat_model_structured_output(kind, served, manager, registry):
    model = chat(kind, served, manager, registry, max_tokens=40).with_structured_output(SCHEMA)
    if kind == "reverse":
        with pytest.raises(
            BackendCapabilityError, match="'reverse' lacks capability 'json_schema'"
        ):
            model.invoke("Pick a color")
        return
    assert model.invoke("Pick a color")["color"] in ("red", "green", "blue")


@pytest.mark.parametrize("kind", ["http", "reverse"])
def test_chat_model_batch_reports_shared_prefix_as_cached(kind, served, manager, registry):
    model = chat(kind, served, manager, registry)
    shared = f"{kind}: a long shared system preamble about caches and trees. " * 4
    outs = model.batch([shared + "First?", shared + "Second?", shared + "Third?"])
    cached = [o.usage_metadata["input_token_details"]["cache_read"] for o in outs]
    assert max(cached) > 0


@pytest.mark.parametrize("kind", BACKENDS)
def test_llm_invoke_and_stream(kind, served, manager, registry):
    backend, bkw = spec(kind, served, manager)
    llm = SGLang(backend=backend, backend_kwargs=bkw, registry=registry, max_tokens=6)
    text = llm.invoke("The quick brown fox")
    assert isinstance(text, str) and text
    assert "".join(llm.stream("The quick brown fox")) == text
    if kind in ("http", "openai"):
        local_backend, _ = spec("local", served, manager)
        ref = SGLang(backend=local_backend, registry=registry, max_tokens=6)
        assert text == ref.invoke("The quick brown fox")


# The OpenAI-style messages= call is what DSPy 3.3 programs send; 3.4 deprecates it for lm15.
@pytest.mark.filterwarnings("ignore:Passing OpenAI-style message dictionaries:DeprecationWarning")
@pytest.mark.parametrize("kind", BACKENDS)
def test_dspy_lm_call_stream_and_typed_output(kind, served, manager, registry):
    backend, bkw = spec(kind, served, manager)
    if not has_engine_contract():  # DSPy 3.3: the legacy LM (tests/test_dspy.py) is local-only
        with pytest.raises(NotImplementedError, match="DSPy < 3.4 runs on the local backend only"):
            LM(backend=backend, backend_kwargs=bkw, registry=registry)
        return
    lm = LM(backend=backend, backend_kwargs=bkw, registry=registry, max_tokens=40)
    (out,) = lm(messages=[{"role": "user", "content": "Say hi"}], max_tokens=8)
    assert isinstance(out, str) and out
    if kind in ("http", "openai"):
        local_backend, _ = spec("local", served, manager)
        ref = LM(backend=local_backend, registry=registry)
        assert out == ref(messages=[{"role": "user", "content": "Say hi"}], max_tokens=8)[0]
    if kind == "reverse":
        fmt = {"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA}}
        with pytest.raises(Exception, match="'reverse' lacks capability 'json_schema'"):
            lm(messages=[{"role": "user", "content": "Pick"}], response_format=fmt)
        return
    predict = dspy.Predict("question -> color: typing.Literal['red', 'green', 'blue']")
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        assert predict(question="Pick one").color in ("red", "green", "blue")
    assert lm.history[-1]["response"].usage.input_tokens > 0


@pytest.mark.parametrize("kind", BACKENDS)
def test_lang_program_on_each_backend(kind, served, manager):
    backend, bkw = spec(kind, served, manager)
    if isinstance(backend, str):
        backend = manager.get_backend(backend, **bkw)
    runtime = sgl.Runtime(backend=backend)

    @sgl.function
    def prog(s):
        s += "The quick brown fox" + sgl.gen("a", max_tokens=6)

    state = prog.run(backend=runtime, temperature=0)
    assert state["a"]
    streamed = prog.run(backend=runtime, stream=True, temperature=0)
    assert "".join(streamed.text_iter("a")) == state["a"]

    @sgl.function
    def pick(s):
        s += "The capital of France is" + sgl.select("c", [" Paris", " London"])

    picked = pick.run(backend=runtime)
    if kind in ("local", "http"):
        assert picked["c"] in (" Paris", " London")
    else:
        with pytest.raises(sgl.ProgramError, match="lacks capability"):
            picked["c"]
    if kind == "openai":
        openai_rt = sgl.OpenAI("tiny", base_url=served[1] + "/v1")
        assert prog.run(backend=openai_rt, temperature=0)["a"] == state["a"]
        openai_rt.shutdown()


def test_openai_backend_refuses_what_it_cannot_do(served, manager):
    backend = manager.get_backend("openai", base_url=served[1] + "/v1")
    assert backend.model == "tiny" and backend.tokenizer is None
    assert "prefix_dedup" not in backend.capabilities and "score" not in backend.capabilities
    with pytest.raises(BackendCapabilityError, match="'openai' lacks capability 'regex'"):
        backend.generate("x", {"max_new_tokens": 2}, regex="[a-z]+")
    with pytest.raises(BackendCapabilityError, match="'openai' lacks capability 'logprobs'"):
        backend.generate("x", {"max_new_tokens": 2}, return_logprob=True)
    with pytest.raises(BackendCapabilityError, match="'openai' lacks capability 'logprobs'"):
        list(backend.stream("x", {"max_new_tokens": 2}, return_logprob=True))
    out = backend.generate("x", {"max_new_tokens": 30}, json_schema=json.dumps(SCHEMA))
    assert json.loads(out.text)["color"] in ("red", "green", "blue")
    backend.close()


def test_tool_choice_auto_needs_token_scoring(served, manager, registry):
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    model = chat("openai", served, manager, registry).bind_tools([add])
    with pytest.raises(BackendCapabilityError, match="'openai' lacks capability"):
        model.invoke("What is 2 + 3?")


def test_plugin_kwargs_and_env_base_url(monkeypatch, served, registry):
    monkeypatch.setenv("SGL_ADAPTERS_BASE_URL", served[1])
    model = ChatSGLang(backend="http", registry=registry, timeout=30.0, chat_template=None)
    assert model.base_url == served[1] and model.backend_kwargs == {"chat_template": None}
    assert model.plugin_kwargs()["timeout"] == 30.0
    assert model.model_name == "http"  # no I/O; responses name the served model
    assert model.invoke("hi", max_tokens=2).response_metadata["model_name"] == "tiny"


@pytest.mark.parametrize("warm", [None, True])
def test_http_batch_prefills_a_shared_prefix_once(warm, served, manager, registry):
    """ChatSGLang.batch over http, cold cache: the server computes the shared prefix once
    (in-batch dedup on our server; with `warm_prefixes` the prefix is prefilled first, as for
    a server without in-batch dedup), and the leaves read it from the radix cache."""
    eng, url = served
    model = ChatSGLang(
        backend="http",
        base_url=url,
        backend_kwargs={"warm_prefixes": warm},
        registry=registry,
        max_tokens=4,
    )
    backend = model.client().backend
    assert backend.warm_prefixes is bool(warm)  # our server dedups in-batch: no warm-up
    shared = "You are a radix-cache expert. Answer in one word. " * 6
    prompts = [shared + f"Question {i}: what is {i} + {i}?" for i in range(8)]
    assert eng.flush_cache()
    before = eng.metrics()
    outs = model.batch(prompts)
    after = eng.metrics()
    prompt_tokens = sum(o.usage_metadata["input_tokens"] for o in outs)
    prefilled = after["prefill_tokens"] - before["prefill_tokens"]
    cached = after["cached_tokens"] - before["cached_tokens"]
    shared_len = len(eng.tokenizer.encode(shared))
    assert prefilled <= prompt_tokens - 6 * shared_len  # the prefix is not computed 8 times
    assert cached >= 7 * shared_len * 0.9
    assert sum(o.usage_metadata["input_token_details"]["cache_read"] for o in outs) > 0


def test_http_without_a_local_tokenizer_uses_the_servers(served, manager, registry):
    """Our server hides its paths: the http backend tokenizes through /tokenize and renders
    chats with the template from /get_server_info; prompts and answers equal local ones,
    tool calls included."""
    from sgl_plugins.builtin.remote_tokenizer import RemoteTokenizer

    eng, url = served
    model = chat("http", served, manager, registry)
    tok = model.client().tokenizer
    assert isinstance(tok, RemoteTokenizer)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages) == eng.apply_chat_template(messages)
    assert tok.encode("The quick brown fox") == eng.tokenizer.encode("The quick brown fox")

    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    local = chat("local", served, manager, registry).bind_tools([add])
    remote = chat("http", served, manager, registry).bind_tools([add])
    want, got = local.invoke("What is 2 + 3?"), remote.invoke("What is 2 + 3?")
    assert got.tool_calls == want.tool_calls and got.content == want.content
