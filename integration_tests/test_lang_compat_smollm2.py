"""SGLang programs that run unchanged on the embedded SmolLM2-135M-Instruct: the examples/
directory, SGLang's own frontend idioms, and the compat rows where an answer matters
(docs/SGLANG_COMPAT.md)."""

from __future__ import annotations

import re
import runpy
import threading
from pathlib import Path

import jsonschema
import pytest

import sgl_adapters.lang as sgl

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
IMPORT_LINE = "import sgl_adapters.lang as sgl  # with SGLang: import sglang as sgl"
GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def rt(smollm2_path):
    backend = sgl.Runtime(smollm2_path, device="cpu", max_total_tokens=16384)
    before = sgl.global_config.default_backend
    sgl.set_default_backend(backend)
    yield backend
    sgl.set_default_backend(before)
    backend.engine.check_invariants()
    backend.shutdown()


def _example(name: str) -> dict:
    path = EXAMPLES / f"{name}.py"
    lines = path.read_text().splitlines()
    ours = [ln for ln in lines if "sgl_adapters" in ln]
    assert ours == [IMPORT_LINE], "only the import line may differ from an SGLang program"
    return runpy.run_path(str(path))


def test_examples_run_unchanged_except_the_import_line(rt):
    assert _example("few_shot_select")["main"]() == ["positive", "negative"]

    out = _example("json_extraction")["main"]()
    module = _example("json_extraction")
    jsonschema.validate(out["person"], module["PERSON_SCHEMA"])
    assert out["person"]["name"] == out["name"] == "Alice" and int(out["age"]) == 30

    tot = _example("tree_of_thought")["main"](max_tokens=12)
    assert len(tot["thoughts"]) == 3 and set(tot["verdicts"]) <= {"yes", "no"}
    assert isinstance(tot["answer"], str)

    agent = _example("chat_agent")
    state = agent["main"](max_tokens=8)
    assert state.error() is None and state["tool"] == "the calculator"
    assert agent["calculate"](state["expression"]) == 51
    assert "51" in state["answer"]
    roles = [m["role"] for m in state.messages()]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]


def test_parallel_decoding_with_fork_item_assignment(rt):
    """SGLang's test_parallel_decoding idiom: `forks[i] += ...` then `forks[i][...]`."""
    fork_size = 3

    @sgl.function
    def parallel_decoding(s, topic):
        s += "USER: Give some tips for " + topic + ".\n"
        s += "ASSISTANT: Okay. Here are " + str(fork_size) + " concise tips:\n"
        for i in range(1, 1 + fork_size):
            s += f"{i}." + sgl.gen(max_tokens=8, stop=[".", "\n"]) + ".\n"
        forks = s.fork(fork_size)
        for i in range(fork_size):
            forks[i] += f"Now, I expand tip {i + 1} into a detailed paragraph:\nTip {i + 1}:"
            forks[i] += sgl.gen("detailed_tip", 8, stop=["\n\n"])
        forks.join()
        for i in range(fork_size):
            s += f"Tip {i + 1}:" + forks[i]["detailed_tip"] + "\n"
        s += "\nIn summary," + sgl.gen("summary", max_tokens=8)

    state = parallel_decoding.run(topic="writing a good blog post", **GREEDY)
    assert state.error() is None and isinstance(state["summary"], str)
    assert len(state["detailed_tip"]) == fork_size
    for tip in state["detailed_tip"]:
        assert tip in state.text()


def test_stop_regex_stops_a_count(rt):
    @sgl.function
    def count(s):
        s += "Count from 1 to 20: 1, 2, 3," + sgl.gen("rest", max_tokens=40, stop_regex=r"\b9\b")

    state = count.run(**GREEDY)
    assert "8" in state["rest"] and "9" not in state["rest"]
    assert state.get_meta_info("rest")["finish_reason"] == {"type": "stop", "matched": "9"}


def test_return_text_in_logprobs_spells_the_output(rt):
    @sgl.function
    def prog(s):
        s += "The capital of France is" + sgl.gen(
            "x", max_tokens=6, return_logprob=True, return_text_in_logprobs=True
        )

    state = prog.run(**GREEDY)
    entries = state.get_meta_info("x")["output_token_logprobs"]
    spelled = "".join(e[2] for e in entries)
    assert spelled.startswith(state["x"]) and all(isinstance(e[2], str) for e in entries)


@pytest.fixture(scope="module")
def our_server(rt):
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
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)


def test_runtime_endpoint_takes_the_served_models_template(rt, our_server):
    remote = sgl.RuntimeEndpoint(our_server)
    try:
        assert remote.get_chat_template().role_prefix_and_suffix == (
            rt.chat_template.role_prefix_and_suffix
        )
        assert "User:" not in remote.get_chat_template().role_prefix_and_suffix["user"][0]

        @sgl.function
        def chat(s):
            s += sgl.user("What is the capital of France?")
            s += sgl.assistant(sgl.gen("answer", max_tokens=8))

        assert chat.run(backend=remote, **GREEDY).text() == chat.run(backend=rt, **GREEDY).text()
    finally:
        remote.shutdown()


def test_get_server_info_over_runtime_endpoint(rt, our_server):
    """Needs the server's /get_server_info route (issue 14)."""
    remote = sgl.RuntimeEndpoint(our_server)
    try:
        info = sgl.get_server_info(remote)
        assert re.search("smollm2", str(info.get("model_path", "")), re.I)
        local = sgl.get_server_info(rt)  # in-process: the full path; the server hides folders
        assert Path(local["model_path"]).name == Path(info["model_path"]).name
        assert info["internal_states"] and "cached_tokens" in info["internal_states"][0]
    finally:
        remote.shutdown()


def test_text_async_iter_meta_over_runtime_endpoint(rt, our_server):
    """Streaming with incremental logprobs gives the same pieces in-process and over HTTP."""
    import asyncio

    @sgl.function
    def story(s):
        s += "Once upon a time" + sgl.gen(
            "x", max_tokens=10, return_logprob=True, return_text_in_logprobs=True
        )

    async def consume(state):
        return [item async for item in state.text_async_iter("x", return_meta_data=True)]

    remote = sgl.RuntimeEndpoint(our_server)
    try:
        results = []
        for backend in (rt, remote):
            state = story.run(backend=backend, stream=True, **GREEDY)
            items = asyncio.run(consume(state))
            entries = [e for _, m in items for e in m["output_token_logprobs"]]
            assert "".join(t for t, _ in items) == state["x"]
            assert [e[1] for e in entries] == [
                e[1] for e in state.get_meta_info("x")["output_token_logprobs"]
            ]
            assert all(isinstance(e[2], str) for e in entries)
            results.append((state["x"], [e[1] for e in entries]))
        assert results[0] == results[1]
    finally:
        remote.shutdown()
