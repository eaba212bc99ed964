"""SGLang 0.5 frontend compatibility (docs/SGLANG_COMPAT.md), model-independent properties on
the tiny random model: each test is named in the table's row it proves."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import threading
from pathlib import Path

import pytest

import sgl_adapters.lang as sgl
from sgl_adapters.lang import chat_template as templates

GREEDY = {"temperature": 0.0}


@pytest.fixture
def rt(make_engine, tiny_llama):
    backend = sgl.Runtime(engine=make_engine(tiny_llama))
    yield backend
    backend.shutdown()


@pytest.fixture
def default_backend(rt):
    before = sgl.global_config.default_backend
    sgl.set_default_backend(rt)
    yield rt
    sgl.set_default_backend(before)


def _fake_server():
    path = Path(__file__).with_name("test_lang_endpoint.py")
    spec = importlib.util.spec_from_file_location("lang_fake_server_compat", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.serve_sglang_protocol


# -- module-level names ---------------------------------------------------------------------


def test_public_names_of_sglang_frontend_exist():
    names = [
        "Engine", "Runtime", "RuntimeEndpoint", "assistant", "assistant_begin", "assistant_end",
        "flush_cache", "function", "gen", "gen_int", "gen_string", "get_server_info", "image",
        "select", "set_default_backend", "system", "system_begin", "system_end", "user",
        "user_begin", "user_end", "video", "greedy_token_selection", "token_length_normalized",
        "unconditional_likelihood_normalized", "Anthropic", "LiteLLM", "VertexAI",
        "global_config", "separate_reasoning", "__version__",
    ]  # fmt: skip
    assert [n for n in names if not hasattr(sgl, n)] == []


def test_function_decorator_forms_and_num_api_spec_tokens(default_backend):
    @sgl.function(num_api_spec_tokens=64)
    def spec(s):
        s += "Hi" + sgl.gen("x", max_tokens=2)

    @sgl.function()
    def called(s):
        s += "Hi" + sgl.gen("x", max_tokens=2)

    assert isinstance(spec, sgl.SglFunction) and isinstance(called, sgl.SglFunction)
    assert spec.run(**GREEDY)["x"] == called(**GREEDY)["x"]


def test_global_config_default_backend(rt):
    before = sgl.global_config.default_backend
    try:
        sgl.global_config.default_backend = None
        assert sgl.get_default_backend() is None
        sgl.set_default_backend(rt)
        assert sgl.global_config.default_backend is rt

        @sgl.function
        def prog(s):
            s += "A" + sgl.gen("x", max_tokens=2)

        assert prog.run(**GREEDY).error() is None
    finally:
        sgl.global_config.default_backend = before


def test_global_config_options(rt, capsys, monkeypatch):
    cfg = sgl.global_config
    assert (cfg.verbosity, cfg.enable_precache_with_tracing, cfg.enable_parallel_encoding) == (
        0,
        True,
        True,
    )
    assert cfg.skip_special_tokens_in_output and cfg.spaces_between_special_tokens_in_out

    @sgl.function
    def prog(s):
        s += "Hello" + sgl.gen("x", max_tokens=3)

    monkeypatch.setattr(cfg, "verbosity", 2)
    state = prog.run(backend=rt, **GREEDY)
    state.sync()
    assert state.text() in capsys.readouterr().out
    monkeypatch.setattr(cfg, "verbosity", 0)
    monkeypatch.setattr(cfg, "skip_special_tokens_in_output", False)
    assert prog.run(backend=rt, **GREEDY).error() is None  # the option reaches the engine
    sent = []
    real = rt.request
    monkeypatch.setattr(rt, "request", lambda data: sent.append(data) or real(data))
    prog.run(backend=rt, **GREEDY).sync()
    assert sent[-1]["sampling_params"]["skip_special_tokens"] is False


def test_flush_cache_and_empty_cache(default_backend):
    assert sgl.flush_cache() is True
    assert sgl.flush_cache(default_backend, empty_cache=False) is True
    assert sgl.flush_cache(default_backend.endpoint) is True


def test_get_server_info_local(default_backend):
    info = sgl.get_server_info()
    assert info["is_generation"] is True and info["model_path"]
    assert info["context_length"] == default_backend.engine.context_length
    assert "cached_tokens" in info["internal_states"][0]
    assert sgl.get_server_info(default_backend.endpoint)["model_path"] == info["model_path"]
    assert asyncio.run(default_backend.get_server_info())["model_path"] == info["model_path"]


def test_get_server_info_without_backend_is_none():
    before = sgl.global_config.default_backend
    sgl.global_config.default_backend = None
    try:
        assert sgl.get_server_info() is None
        assert sgl.flush_cache() is False
    finally:
        sgl.global_config.default_backend = before


def test_image_and_video_refused_text_only():
    for call in (lambda: sgl.image("cat.png"), lambda: sgl.video("clip.mp4", 8)):
        with pytest.raises(sgl.UnsupportedFeatureError, match="this model is text-only"):
            call()


def test_api_backends_refused_with_reason():
    for backend in (sgl.Anthropic, sgl.LiteLLM, sgl.VertexAI):
        with pytest.raises(sgl.UnsupportedFeatureError, match="backend is not included"):
            backend("some-model")


def test_engine_name_is_sgl_engine(tiny_llama):
    from sgl_engine import Engine

    eng = sgl.Engine(tiny_llama, device="cpu", max_total_tokens=1024)
    try:
        assert isinstance(eng, Engine)
        out = eng.generate("Hi", {"max_new_tokens": 2, "temperature": 0})
        assert set(out) >= {"text", "meta_info"}
    finally:
        eng.shutdown()


# -- gen ------------------------------------------------------------------------------------


def test_stop_regex_ends_generation_at_the_match(rt):
    @sgl.function
    def prog(s):
        s += "Once" + sgl.gen("x", max_tokens=24, stop_regex=r"[aeiou]", ignore_eos=True)
        s += "|" + sgl.gen("y", max_tokens=24, stop_regex=[r"[A-Z]", r"\d"], ignore_eos=True)

    state = prog.run(backend=rt, **GREEDY)
    for name, pattern in (("x", "[aeiou]"), ("y", r"[A-Z]|\d")):
        meta = state.get_meta_info(name)
        assert not __import__("re").search(pattern, state[name])
        if meta["finish_reason"]["type"] == "stop":
            assert __import__("re").fullmatch(pattern, meta["finish_reason"]["matched"])
        else:
            assert meta["completion_tokens"] == 24
    with pytest.raises(ValueError, match="invalid regex"):
        sgl.gen("z", stop_regex="(")


def test_stop_regex_default_from_run(rt):
    @sgl.function
    def prog(s):
        s += "Go" + sgl.gen("x", max_tokens=24, ignore_eos=True)

    state = prog.run(backend=rt, stop_regex=r"\s", **GREEDY)
    assert " " not in state["x"] and "\n" not in state["x"]


def test_return_text_in_logprobs_fills_token_text(rt):
    @sgl.function
    def prog(s):
        s += "Tell me" + sgl.gen(
            "x",
            max_tokens=6,
            return_logprob=True,
            top_logprobs_num=2,
            logprob_start_len=0,
            return_text_in_logprobs=True,
        )
        s += sgl.gen("y", max_tokens=3, return_logprob=True)

    state = prog.run(backend=rt, **GREEDY)
    meta = state.get_meta_info("x")
    tok = rt.tokenizer
    for key in ("input_token_logprobs", "output_token_logprobs"):
        assert meta[key] and all(e[2] == tok.decode([e[1]]) for e in meta[key])
    assert all(t[2] == tok.decode([t[1]]) for tops in meta["output_top_logprobs"] for t in tops)
    assert all(e[2] is None for e in state.get_meta_info("y")["output_token_logprobs"])


# -- SglFunction ----------------------------------------------------------------------------


def test_run_accepts_sglang_keyword_arguments(rt):
    @sgl.function
    def prog(s, q):
        s += q + sgl.gen("x", max_tokens=3)

    kwargs = dict(
        max_new_tokens=5, n=1, stop=None, stop_token_ids=None, stop_regex=None, temperature=0.0,
        top_p=1.0, top_k=-1, min_p=0.0, frequency_penalty=0.0, presence_penalty=0.0,
        ignore_eos=False, return_logprob=None, logprob_start_len=None, top_logprobs_num=None,
        return_text_in_logprobs=None, stream=False, backend=rt, use_thread=True,
    )  # fmt: skip
    assert prog.run("Hi", **kwargs)["x"] == prog.run(q="Hi", backend=rt, **GREEDY)["x"]


def test_run_use_thread_false_runs_in_the_caller(rt):
    seen = []
    real = rt.generate

    def spy(*args, **kwargs):
        seen.append(threading.current_thread())
        return real(*args, **kwargs)

    rt.generate = spy

    @sgl.function
    def prog(s):
        s += "A" + sgl.gen("x", max_tokens=2)
        s += "B" + sgl.gen("y", max_tokens=2)

    state = prog.run(backend=rt, use_thread=False, **GREEDY)
    assert state["y"] is not None and seen == [threading.current_thread()] * 2
    threaded = prog.run(backend=rt, **GREEDY)
    assert (threaded["x"], threaded["y"]) == (state["x"], state["y"])


def test_run_batch_generator_style(rt):
    @sgl.function
    def prog(s, q):
        s += "Q: " + q + "\nA:" + sgl.gen("a", max_tokens=3)

    batch = [{"q": f"question {i}"} for i in range(5)] + [("question 5",)]
    listed = prog.run_batch(batch, backend=rt, **GREEDY)
    gen = prog.run_batch(batch, backend=rt, generator_style=True, num_threads=2, **GREEDY)
    assert not isinstance(gen, list)
    assert [s["a"] for s in gen] == [s["a"] for s in listed]
    assert list(prog.run_batch([], backend=rt, generator_style=True)) == []
    assert len(prog.run_batch(batch, backend=rt, num_threads=1, progress_bar=True, **GREEDY)) == 6


def test_cache_prefills_constant_prefix(rt):
    @sgl.function
    def few_shot(s, prompt, question):
        s += prompt
        s += "Q: What is the capital of France?\nA: Paris\n"
        s += "Q: " + question + "\nA:" + sgl.gen("answer", max_tokens=2)

    bound = few_shot.bind(prompt="Answer the following questions as if you were a kid.\n\n")
    prefix = bound.cache(rt)
    assert prefix == "Answer the following questions as if you were a kid.\n\n" + (
        "Q: What is the capital of France?\nA: Paris\nQ: "
    )
    before = rt.metrics()["cached_tokens"]
    bound.run(question="What is 2+2?", backend=rt, **GREEDY).sync()
    assert rt.metrics()["cached_tokens"] - before >= len(rt.tokenizer.encode(prefix)) - 2
    assert few_shot.cache(rt) is None  # unbound first argument: no constant prefix


def test_compile_refused_with_reason(rt):
    @sgl.function
    def prog(s):
        s += "x"

    with pytest.raises(sgl.UnsupportedFeatureError, match="graph compiler"):
        prog.compile(backend=rt)


# -- ProgramState / ProgramStateGroup -------------------------------------------------------


def test_fork_group_item_assignment(rt):
    @sgl.function
    def parallel(s):
        s += "Tips:\n"
        forks = s.fork(3)
        for i in range(3):
            forks[i] += f"Tip {i + 1}:"
            forks[i] += sgl.gen("tip", max_tokens=3)
        forks.join()
        s += "Done"

    @sgl.function
    def lambdas(s):
        s += "Tips:\n"
        forks = s.fork(3)
        forks += lambda i: f"Tip {i + 1}:" + sgl.gen("tip", max_tokens=3)
        forks.join()

    @sgl.function
    def replace(s):
        group = s.fork(2, position_ids_offset=[0, 0])
        group[0] = group[1]

    state = parallel.run(backend=rt, **GREEDY)
    assert state.error() is None and len(state["tip"]) == 3
    assert state["tip"] == lambdas.run(backend=rt, **GREEDY)["tip"]
    with pytest.raises(TypeError, match="holds its own branches"):
        raise replace.run(backend=rt).error()
    with pytest.raises(sgl.ProgramError, match="has ended"):
        state += "more"


def test_text_async_iter_meta_incremental_logprobs(rt):
    @sgl.function
    def prog(s):
        s += "Write:" + sgl.gen("x", max_tokens=12, return_logprob=True, ignore_eos=True)

    async def consume(state):
        return [item async for item in state.text_async_iter("x", return_meta_data=True)]

    state = prog.run(backend=rt, stream=True, **GREEDY)
    items = asyncio.run(consume(state))
    assert items and all(isinstance(t, str) and isinstance(m, dict) for t, m in items)
    assert "".join(t for t, _ in items) == state["x"]
    final = state.get_meta_info("x")
    pieces = [e for _, m in items for e in m["output_token_logprobs"]]
    assert [tuple(e[:2]) for e in pieces] == [tuple(e[:2]) for e in final["output_token_logprobs"]]
    total = 0
    for _, m in items:
        total += len(m["output_token_logprobs"])
        assert m["completion_tokens"] == total
    plain = prog.run(backend=rt, **GREEDY)
    [(value, meta)] = asyncio.run(consume(plain))
    assert value == plain["x"] and meta is plain.get_meta_info("x")


def test_text_async_iter_fills_token_text_per_piece(rt):
    @sgl.function
    def prog(s):
        s += "Write:" + sgl.gen(
            "x", max_tokens=8, return_logprob=True, return_text_in_logprobs=True, ignore_eos=True
        )

    async def consume(state):
        return [item async for item in state.text_async_iter("x", return_meta_data=True)]

    items = asyncio.run(consume(prog.run(backend=rt, stream=True, **GREEDY)))
    entries = [e for _, m in items for e in m["output_token_logprobs"]]
    assert entries and all(e[2] == rt.tokenizer.decode([e[1]]) for e in entries)


def test_incremental_stream_chunks_accumulate():
    from sgl_adapters.lang import logprobs

    chunks = [
        {"completion_tokens": 1, "output_token_logprobs": [(-1.0, 5, None)]},
        {"completion_tokens": 3, "output_token_logprobs": [(-2.0, 6, None), (-3.0, 7, None)]},
    ]
    running = None
    for c in chunks:
        running = logprobs.accumulate(running, c)
    assert [e[1] for e in running["output_token_logprobs"]] == [5, 6, 7]
    cumulative = {"completion_tokens": 3, "output_token_logprobs": running["output_token_logprobs"]}
    assert logprobs.accumulate(running, cumulative) == cumulative


# -- Runtime / RuntimeEndpoint --------------------------------------------------------------


def test_runtime_accepts_sglang_options(tiny_llama):
    a = sgl.Runtime(tiny_llama, device="cpu", max_total_tokens=1024, log_level="error")
    b = sgl.Runtime(model_path=tiny_llama, device="cpu", max_total_tokens=1024, launch_timeout=5.0)
    try:
        assert a.engine is b.engine  # one engine per model and config
        assert a.get_tokenizer() is a.tokenizer
        c = sgl.Runtime(engine=a.engine, chat_template="chatml")
        assert c.chat_template is templates.get_chat_template("chatml")
    finally:
        a.shutdown()
        b.shutdown()
    with pytest.raises(TypeError, match="unknown engine option"):
        sgl.Runtime(tiny_llama, device="cpu", not_an_option=1)


def test_runtime_generate_returns_json(rt):
    out = json.loads(rt.generate("Hello", {"max_new_tokens": 3, "temperature": 0}))
    direct = rt.engine.generate("Hello", {"max_new_tokens": 3, "temperature": 0})
    assert out["text"] == direct["text"]
    outs = json.loads(
        rt.generate(["a", "b"], {"max_new_tokens": 2}, return_logprob=True, top_logprobs_num=1)
    )
    assert len(outs) == 2 and all(len(o["meta_info"]["output_token_logprobs"]) for o in outs)
    with pytest.raises(sgl.UnsupportedFeatureError, match="LoRA"):
        rt.generate("a", {}, lora_path="x")


def test_runtime_async_generate_streams_text(rt):
    params = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}

    async def consume():
        return [piece async for piece in rt.async_generate("Hello", params)]

    pieces = asyncio.run(consume())
    assert "".join(pieces) == rt.engine.generate("Hello", params)["text"]
    assert rt.add_request == rt.async_generate


def test_runtime_encode_and_profile_refused(rt):
    with pytest.raises(sgl.UnsupportedFeatureError, match="embedding model"):
        rt.encode("Hello")
    with pytest.raises(sgl.UnsupportedFeatureError, match="profiler"):
        rt.start_profile()


def test_runtime_endpoint_access(rt):
    ep = rt.endpoint
    assert ep.get_model_name() == rt.get_model_name() == str(rt.engine.model_path)
    assert ep.get_server_info()["model_path"] == rt.get_model_name()
    assert ep.get_chat_template() is rt.chat_template
    for name in ("url", "generate_url"):
        with pytest.raises(AttributeError, match="in-process"):
            getattr(rt, name)

    @sgl.function
    def prog(s):
        s += "A" + sgl.gen("x", max_tokens=2)

    assert prog.run(backend=ep, **GREEDY)["x"] == prog.run(backend=rt, **GREEDY)["x"]


def test_endpoint_chat_template_name_and_served_model(make_engine, tiny_llama):
    engine = make_engine(tiny_llama)
    server, url, _ = _fake_server()(engine, tiny_llama)
    try:
        named = sgl.RuntimeEndpoint(url, chat_template_name="llama-3-instruct")
        assert named.get_chat_template() is templates.get_chat_template("llama-3-instruct")
        served = sgl.RuntimeEndpoint(url, None, None)  # base_url, api_key, verify
        derived = templates.from_tokenizer(engine.tokenizer)
        assert served.get_chat_template().role_prefix_and_suffix == derived.role_prefix_and_suffix
        assert served.get_chat_template() is not templates.PLAIN
        with pytest.raises(ValueError, match="unknown chat template"):
            sgl.RuntimeEndpoint(url, chat_template_name="no-such-template")
        with pytest.raises(RuntimeError, match="404"):
            served.get_server_info()  # the fake server lacks the route: a clear error
        with pytest.raises(sgl.UnsupportedFeatureError, match="profiling"):
            served.start_profile()
        for ep in (named, served):
            ep.shutdown()
    finally:
        server.shutdown()
        server.server_close()


def test_chat_template_lookup_by_model_path():
    by = templates.get_chat_template_by_model_path
    assert by("/models/Meta-Llama-3-8B-Instruct").name == "llama-3-instruct"
    assert by("Qwen/Qwen2.5-7B-Instruct").name == "qwen"
    assert by("HuggingFaceTB/SmolLM2-135M-Instruct").name == "chatml"
    assert by("some/unknown-model").name == "default"
    assert templates.for_served_model({"model_path": "/nowhere/vicuna-7b"}).name == "vicuna_v1.1"
    t = templates.get_chat_template("chatml")
    assert t.get_prefix_and_suffix("user", []) == ("<|im_start|>user\n", "<|im_end|>\n")


def test_template_stop_str_is_added_to_stops(rt, monkeypatch):
    sent = []
    real = rt.request
    monkeypatch.setattr(rt, "request", lambda data: sent.append(data) or real(data))
    monkeypatch.setattr(rt, "chat_template", templates.get_chat_template("chatml"))

    @sgl.function
    def prog(s):
        s += sgl.user("Hi") + sgl.assistant(sgl.gen("x", max_tokens=2, stop="."))

    prog.run(backend=rt, **GREEDY).sync()
    assert sent[-1]["sampling_params"]["stop"] == [".", "<|im_end|>"]


def test_gen_int_and_gen_string_take_sglang_positional_order(rt):
    @sgl.function
    def prog(s):
        s += "Number: " + sgl.gen_int("i", 4, None, None, None, None, 0.0)
        s += "\nName: " + sgl.gen_string("t", 8, temperature=0.0, min_tokens=0)

    state = prog.run(backend=rt)
    assert state["i"].strip().lstrip("+-").isdigit()
    assert state["t"].startswith('"')
    assert state.get_meta_info("i")["completion_tokens"] <= 4
    from sgl_adapters.lang.ir import REGEX_BOOL, REGEX_FLOAT, REGEX_INT, REGEX_STR

    assert (REGEX_INT, REGEX_FLOAT, REGEX_BOOL, REGEX_STR) == (
        r"[-+]?[0-9]+[ \n]*",
        r"[-+]?[0-9]*\.?[0-9]+[ \n]*",
        r"(True|False)",
        r"\"[\w\d\s]*\"",
    )


def test_run_stream_runs_the_body_in_its_own_thread(rt):
    seen = []

    @sgl.function
    def prog(s):
        seen.append(threading.current_thread())
        s += "A" + sgl.gen("x", max_tokens=3)
        s += "|" + s["x"] + sgl.gen("y", max_tokens=3)  # the body reads its own variable

    state = prog.run(backend=rt, stream=True, **GREEDY)
    assert "".join(state.text_iter("y")) == state["y"]
    assert seen and seen[0] is not threading.current_thread()
    assert prog.run(backend=rt, **GREEDY)["y"] == state["y"]
