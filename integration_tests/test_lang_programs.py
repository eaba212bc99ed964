"""SGLang programs (`import sgl_adapters.lang as sgl`) on the embedded SmolLM2-135M-Instruct."""

from __future__ import annotations

import importlib.util
import json
import re
import threading
from pathlib import Path

import jsonschema
import pytest

import sgl_adapters.lang as sgl

GREEDY = {"temperature": 0.0}
SHOTS = (
    "Question: What is the capital of Italy?\nAnswer: Rome\n\n"
    "Question: What is the capital of Spain?\nAnswer: Madrid\n\n"
    "Question: What is the capital of Germany?\nAnswer: Berlin\n\n"
)


@pytest.fixture(scope="module")
def rt(smollm2_path):
    backend = sgl.Runtime(smollm2_path, device="cpu", max_total_tokens=16384)
    yield backend
    backend.engine.check_invariants()
    backend.shutdown()


@pytest.fixture(scope="module")
def http_rt(rt):
    """The same engine behind our server, reached through the `http` backend."""
    from sgl_engine.server import ServerThread, create_app

    with ServerThread(create_app(rt.engine)) as srv:
        remote = sgl.Runtime(backend="http", base_url=srv.base_url)
        yield remote
        remote.shutdown()


@pytest.fixture(params=["local", "http"])
def any_rt(request):
    """The tests taking `any_rt` run over the `local` and the `http` backend."""
    return request.getfixturevalue("rt" if request.param == "local" else "http_rt")


@sgl.function
def few_shot_qa(s, question):
    s += SHOTS + "Question: " + question + "\nAnswer:"
    s += sgl.gen("answer", max_tokens=8, stop="\n")


def test_few_shot_qa_run_and_run_batch(any_rt):
    rt = any_rt
    state = few_shot_qa.run(question="What is the capital of France?", backend=rt, **GREEDY)
    assert state.error() is None
    assert "Paris" in state["answer"]
    questions = [
        "What is the capital of France?",
        "What is the capital of Japan?",
        "What is the capital of England?",
    ]
    states = few_shot_qa.run_batch(
        [{"question": q} for q in questions], backend=rt, progress_bar=True, **GREEDY
    )
    singles = [few_shot_qa.run(question=q, backend=rt, **GREEDY)["answer"] for q in questions]
    assert [s["answer"] for s in states] == singles
    assert "Paris" in states[0]["answer"] and "Tokyo" in states[1]["answer"]
    assert all(s.get_meta_info("answer")["cached_tokens"] > 0 for s in states)


def test_multi_turn_chat_messages(rt):
    @sgl.function
    def chat(s):
        s += sgl.user("What is the capital of France? One word.")
        s += sgl.assistant(sgl.gen("a1", max_tokens=8))
        s += sgl.user("And of Germany? One word.")
        s += sgl.assistant(sgl.gen("a2", max_tokens=8))

    state = chat.run(backend=rt, **GREEDY)
    msgs = state.messages()
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert all(set(m) == {"role", "content"} for m in msgs)
    assert msgs[0]["content"] == rt.chat_template.default_system_prompt
    assert "Paris" in state["a1"] and "Berlin" in state["a2"]
    raw = [msgs[0]["content"], msgs[1]["content"], state["a1"], msgs[3]["content"], state["a2"]]
    expected = rt.tokenizer.apply_chat_template(
        [{"role": m["role"], "content": c} for m, c in zip(msgs, raw, strict=True)],
        tokenize=False,
    )
    assert state.text() == expected


@pytest.mark.parametrize(
    "method",
    [
        sgl.token_length_normalized,
        sgl.greedy_token_selection,
        sgl.unconditional_likelihood_normalized,
    ],
)
def test_select_with_scores(any_rt, method):
    rt = any_rt

    @sgl.function
    def pick(s):
        s += SHOTS + "Question: What is the capital of France?\nAnswer:"
        s += sgl.select("city", [" Paris", " London", " Madrid"], choices_method=method)

    state = pick.run(backend=rt)
    meta = state.get_meta_info("city")
    scores = meta["normalized_prompt_logprobs"]
    assert len(scores) == 3 and all(x < 0 for x in scores)
    assert state["city"] == " Paris"
    if method is sgl.token_length_normalized:
        assert scores.index(max(scores)) == 0


def test_fork_5_join(rt):
    @sgl.function
    def tips(s, topic):
        s += sgl.system("You give one short tip.")
        s += sgl.user(f"Give me a tip about {topic}.")
        forks = s.fork(5)
        for i, f in enumerate(forks):
            f += sgl.assistant(f"Tip {i + 1}:" + sgl.gen("tip", max_tokens=12, stop="\n"))
        forks.join()
        s += sgl.assistant("Summary:" + sgl.gen("summary", max_tokens=12))

    state = tips.run(topic="sleep", backend=rt, temperature=0.7)
    assert state.error() is None
    assert isinstance(state["tip"], list) and len(state["tip"]) == 5
    assert all(t.strip() for t in state["tip"])
    assert state["summary"].strip()


def test_regex_json_and_dtypes(any_rt):
    rt = any_rt
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["city", "population"],
    }

    @sgl.function
    def structured(s):
        s += "The IP address of localhost is " + sgl.gen(
            "ip", regex=r"((25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(25[0-5]|2[0-4]\d|1?\d?\d)"
        )
        s += "\nParis as JSON: " + sgl.gen("js", json_schema=json.dumps(schema), max_tokens=48)
        s += "\n3 + 4 = " + sgl.gen_int("sum")
        s += "\nPi is about " + sgl.gen("pi", dtype=float, max_tokens=8)
        s += "\nIs water wet (True/False)? " + sgl.gen("wet", dtype=bool)

    state = structured.run(backend=rt, **GREEDY)
    assert state.error() is None
    assert re.fullmatch(r"(\d{1,3}\.){3}\d{1,3}", state["ip"])
    jsonschema.validate(json.loads(state["js"]), schema)
    int(state["sum"])
    float(state["pi"])
    assert state["wet"] in ("True", "False")


def test_per_variable_streaming_and_min_tokens(any_rt):
    rt = any_rt

    @sgl.function
    def story(s):
        s += sgl.user("Write a sentence about the sea.")
        s += sgl.assistant(sgl.gen("line", max_tokens=24, min_tokens=20))

    state = story.run(backend=rt, stream=True, **GREEDY)
    pieces = list(state.text_iter("line"))
    assert len(pieces) > 3
    assert "".join(pieces) == state["line"]
    assert state.get_meta_info("line")["completion_tokens"] >= 20


def test_trace_yields_the_expected_graph(rt):
    @sgl.function
    def judge(s, question):
        s += sgl.system("You are a careful judge.")
        s += sgl.user(question)
        forks = s.fork(3)
        for f in forks:
            f += sgl.assistant(sgl.gen("draft", max_tokens=16))
        forks.join()
        s += sgl.user("Is the first draft correct?")
        s += sgl.assistant(sgl.select("verdict", ["yes", "no"]))

    graph = judge.trace(question="What is 2 + 2?", backend=rt)
    kinds = [(leaf.metadata["kind"], leaf.metadata["name"]) for leaf in graph.leaves]
    assert kinds == [("gen", "draft")] * 3 + [("select", "verdict")]
    top = graph.shared_prefixes()[0]
    assert top.num_leaves == 4
    assert "You are a careful judge." in top.text and "What is 2 + 2?" in top.text
    drafts = {leaf.node for leaf in graph.leaves[:3]}
    assert len(drafts) == 1  # the three drafts share one prompt node
    assert graph.leaves[3].metadata["depends_on"] == []  # join gathers; the text stays shared


def _fake_server_module():
    path = Path(__file__).resolve().parents[1] / "tests" / "test_lang_endpoint.py"
    spec = importlib.util.spec_from_file_location("lang_fake_server", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runtime_endpoint_on_a_fake_sglang_server(rt, smollm2_path):
    server, url, log = _fake_server_module().serve_sglang_protocol(rt.engine, smollm2_path)
    try:
        remote = sgl.RuntimeEndpoint(url, chat_template=rt.chat_template)
        local_state = few_shot_qa.run(
            question="What is the capital of France?", backend=rt, **GREEDY
        )
        state = few_shot_qa.run(question="What is the capital of France?", backend=remote, **GREEDY)
        assert state["answer"] == local_state["answer"]
        assert log and "text" in log[-1] and "sampling_params" in log[-1]
        remote.shutdown()
    finally:
        server.shutdown()
        server.server_close()


def test_runtime_endpoint_on_our_server(rt):
    uvicorn = pytest.importorskip("uvicorn")
    from sgl_engine.server.app import create_app

    config = uvicorn.Config(create_app(rt.engine), host="127.0.0.1", port=0, log_level="error")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        threading.Event().wait(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        remote = sgl.RuntimeEndpoint(f"http://127.0.0.1:{port}", tokenizer=rt.tokenizer)

        @sgl.function
        def prog(s):
            s += SHOTS + "Question: What is the capital of France?\nAnswer:"
            s += sgl.select("city", [" Paris", " London"])
            s += "\nWhy?" + sgl.gen("why", max_tokens=8)

        a = prog.run(backend=rt, **GREEDY)
        b = prog.run(backend=remote, **GREEDY)
        assert (b["city"], b["why"]) == (a["city"], a["why"])
        st = prog.run(backend=remote, stream=True, **GREEDY)
        assert "".join(st.text_iter("why")) == a["why"]
        remote.shutdown()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
