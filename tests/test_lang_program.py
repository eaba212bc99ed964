"""sgl_adapters.lang program structure on the tiny model: roles, chat templates, fork/join,
copy, var_scope, streaming, run_batch, errors, defaults, tracing."""

from __future__ import annotations

import asyncio
import threading

import pytest

import sgl_adapters.lang as sgl
from sgl_adapters.lang import chat_template as templates

GREEDY = {"temperature": 0.0}


@pytest.fixture
def rt(make_engine, tiny_llama):
    backend = sgl.Runtime(engine=make_engine(tiny_llama))
    yield backend
    backend.shutdown()


def test_roles_render_the_model_chat_template(rt):
    @sgl.function
    def chat(s):
        s += sgl.system("Be brief.")
        s += sgl.user("Hi!")
        s += sgl.assistant(sgl.gen("a1", max_tokens=5))
        with s.user():
            s += "And "
            s += "then?"
        s += sgl.assistant_begin()
        s += sgl.gen("a2", max_tokens=5)
        s += sgl.assistant_end()

    state = chat.run(backend=rt, **GREEDY)
    msgs = state.messages()
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[0]["content"] == "Be brief."
    assert msgs[3]["content"] == "And then?"
    assert msgs[2]["content"] == state["a1"].lstrip()
    assert msgs[4]["content"] == state["a2"].lstrip()
    expected = rt.tokenizer.apply_chat_template(
        [
            {"role": m["role"], "content": c}
            for m, c in zip(msgs, _raw_contents(state), strict=True)
        ],
        tokenize=False,
    )
    assert state.text() == expected


def _raw_contents(state):
    return [
        "Be brief.",
        "Hi!",
        state["a1"],
        "And then?",
        state["a2"],
    ]


def test_chat_template_default_system_prompt(tiny_llama):
    from sgl_engine.testing import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    tok.chat_template = (
        "{% if messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a bot.<|im_end|>\n' }}{% endif %}" + tok.chat_template
    )
    template = templates.from_tokenizer(tok)
    assert template.default_system_prompt == "You are a bot."
    assert template.get_prefix_and_suffix("user") == ("<|im_start|>user\n", "<|im_end|>\n")

    class Echo(sgl.LangBackend):
        tokenizer = tok
        chat_template = template

    @sgl.function
    def prog(s):
        s += sgl.user("Hello")

    state = prog.run(backend=Echo())
    assert state.text() == tok.apply_chat_template(
        [{"role": "user", "content": "Hello"}], tokenize=False
    )
    assert state.messages()[0] == {"role": "system", "content": "You are a bot."}


def test_plain_template_without_chat_template():
    assert templates.from_tokenizer(None) is templates.PLAIN


def test_fork_join_shares_the_prefix(rt):
    @sgl.function
    def tot(s):
        s += "Large language models generate text one token at a time. " * 3
        forks = s.fork(3)
        forks += lambda i: f"Idea {i}:"
        forks += sgl.gen("idea", max_tokens=4)
        forks.join()
        s += "Best: " + sgl.gen("best", max_tokens=3)

    state = tot.run(backend=rt, **GREEDY)
    assert isinstance(state["idea"], list) and len(state["idea"]) == 3
    metas = [None] * 3
    for i in range(3):
        ref = rt.engine.generate(
            "Large language models generate text one token at a time. " * 3 + f"Idea {i}:",
            {"max_new_tokens": 4, "temperature": 0},
        )
        assert state["idea"][i] == ref["text"]
        metas[i] = ref["meta_info"]
    assert all(m["cached_tokens"] > 0 for m in metas)
    assert "Idea" not in state.text()


def test_fork_branch_reads_and_concat_join(rt):
    @sgl.function
    def prog(s):
        s += "A radix tree shares prefixes. "
        forks = s.fork(2)
        for i, f in enumerate(forks):
            f += f"[{i}]" + sgl.gen("x", max_tokens=2)
        texts = [f["x"] for f in forks]
        forks.join(mode="concate_and_append")
        s["seen"] = texts

    state = prog.run(backend=rt, **GREEDY)
    a, b = state["seen"]
    assert state.text() == f"A radix tree shares prefixes. [0]{a}[1]{b}"


def test_copy_and_var_scope(rt):
    @sgl.function
    def prog(s):
        s += "Start. "
        with s.var_scope("scoped"):
            s += "inside " + sgl.gen("g", max_tokens=2)
        with s.copy() as c:
            c += "copy " + sgl.gen("c", max_tokens=2)
        s += " end"

    state = prog.run(backend=rt, **GREEDY)
    assert state["scoped"] == "inside " + state["g"]
    assert state["c"] == [state["c"][0]]
    assert state.text() == "Start. inside " + state["g"] + " end"


def test_text_iter_streams_a_variable(rt):
    @sgl.function
    def prog(s):
        s += "The quick brown fox"
        s += sgl.gen("a", max_tokens=10, min_tokens=10)
        s += "!"

    state = prog.run(backend=rt, stream=True, **GREEDY)
    pieces = list(state.text_iter("a"))
    assert len(pieces) > 1
    assert "".join(pieces) == state["a"]
    assert "".join(state.text_iter()) == state.text()

    async def collect():
        st = prog.run(backend=rt, stream=True, **GREEDY)
        return [p async for p in st.text_async_iter("a")], st

    pieces2, st2 = asyncio.run(collect())
    assert "".join(pieces2) == st2["a"] == state["a"]


def test_text_iter_without_stream_yields_the_value_once(rt):
    @sgl.function
    def prog(s):
        s += "Hi" + sgl.gen("a", max_tokens=3)

    state = prog.run(backend=rt, **GREEDY)
    assert list(state.text_iter("a")) == [state["a"]]


def test_run_batch_equals_sequential_and_prewarms(rt, make_engine, tiny_llama):
    shots = "Question: What is the capital of France? Answer: Paris.\n" * 6

    @sgl.function
    def fewshot(s, q):
        s += shots + "Question: " + q + " Answer:"
        s += sgl.gen("a", max_tokens=4, stop="\n")

    qs = ["two plus two?", "a radix tree?", "the quick fox?", "a dog?"]
    states = fewshot.run_batch([{"q": q} for q in qs], backend=rt, num_threads=4, **GREEDY)
    metrics = rt.metrics()
    cold = sgl.Runtime(engine=make_engine(tiny_llama))
    singles = [fewshot.run(q=q, backend=cold, **GREEDY)["a"] for q in qs]
    assert [s["a"] for s in states] == singles
    prefix_len = len(rt.tokenizer.encode(shots + "Question: "))
    total = sum(len(rt.tokenizer.encode(shots + "Question: " + q + " Answer:")) for q in qs)
    assert metrics["prefill_tokens"] <= total - (len(qs) - 1) * prefix_len + 4 * len(qs)
    assert fewshot.run_batch([], backend=rt) == []
    positional = fewshot.run_batch([(q,) for q in qs[:2]], backend=rt, **GREEDY)
    assert [s["a"] for s in positional] == singles[:2]


def test_bind_and_default_backend(rt):
    @sgl.function
    def prog(s, a, b):
        s += a + b + sgl.gen("x", max_tokens=2)

    bound = prog.bind(a="The quick ")
    with pytest.raises(TypeError):
        prog.bind(zzz=1)
    previous = sgl.get_default_backend()
    sgl.set_default_backend(rt)
    try:
        state = bound.run(b="brown", **GREEDY)
        assert state.text().startswith("The quick brown")
        assert sgl.flush_cache() is True
    finally:
        sgl.set_default_backend(previous)


def test_no_backend_is_a_clear_error():
    @sgl.function
    def prog(s):
        s += "x"

    previous = sgl.get_default_backend()
    sgl.set_default_backend(None)
    try:
        with pytest.raises(ValueError, match="backend"):
            prog.run()
    finally:
        sgl.set_default_backend(previous)


def test_user_exception_surfaces_on_read_and_in_error(rt):
    @sgl.function
    def prog(s):
        s += "Hi" + sgl.gen("a", max_tokens=2)
        raise KeyError("boom in user code")

    state = prog.run(backend=rt)
    assert "boom in user code" in str(state.error())
    with pytest.raises(sgl.ProgramError, match="boom in user code"):
        state["never"]


def test_bad_request_surfaces_without_hanging(rt):
    @sgl.function
    def prog(s):
        s += "Hi" + sgl.gen("a", max_tokens=-3)
        s += sgl.gen("b", max_tokens=2)

    state = prog.run(backend=rt)
    with pytest.raises(sgl.ProgramError, match="max_new_tokens"):
        state["b"]
    assert "max_new_tokens" in str(state.error())
    stream_state = prog.run(backend=rt, stream=True)
    with pytest.raises(sgl.ProgramError, match="max_new_tokens"):
        list(stream_state.text_iter("a"))


def test_backend_failure_surfaces_in_every_branch():
    class Broken(sgl.LangBackend):
        def request(self, data):
            raise ConnectionError("backend went away")

        def request_stream(self, data):
            raise ConnectionError("backend went away")

    @sgl.function
    def prog(s):
        s += "x"
        forks = s.fork(2)
        forks += sgl.gen("y", max_tokens=2)
        forks.join()

    done = threading.Event()
    result = {}

    def target():
        result["state"] = prog.run(backend=Broken())
        result["state"].sync()
        done.set()

    threading.Thread(target=target, daemon=True).start()
    assert done.wait(30), "program hung on a failing backend"
    state = result["state"]
    assert "backend went away" in str(state.error())
    with pytest.raises(sgl.ProgramError, match="backend went away"):
        state["y"]


def test_trace_builds_the_call_graph(rt):
    @sgl.function
    def prog(s, q):
        s += sgl.system("You answer questions.")
        s += sgl.user(q)
        forks = s.fork(3)
        for i, f in enumerate(forks):
            f += sgl.assistant(f"Draft {i}: " + sgl.gen("draft", max_tokens=8))
        forks.join()
        s += sgl.select("verdict", ["good", "bad"])

    graph = prog.trace(q="What is a radix tree?", backend=rt)
    leaves = graph.leaves
    assert [leaf.metadata["kind"] for leaf in leaves] == ["gen", "gen", "gen", "select"]
    assert [leaf.metadata["name"] for leaf in leaves] == ["draft"] * 3 + ["verdict"]
    assert leaves[3].choices == ("good", "bad")
    assert all(leaf.metadata["depends_on"] == [] for leaf in leaves[:3])
    assert leaves[0].sampling_params["max_new_tokens"] == 8
    shared = rt.chat_template.get_prefix_and_suffix
    prefix = (
        shared("system")[0]
        + "You answer questions."
        + shared("system")[1]
        + shared("user")[0]
        + "What is a radix tree?"
        + shared("user")[1]
    )
    top = graph.shared_prefixes()[0]
    assert top.num_leaves == 4
    assert top.text.startswith(prefix)
    for i, leaf in enumerate(leaves[:3]):
        assert graph.prompt_text(leaf.node, rt.tokenizer) == (
            prefix + shared("assistant")[0] + f"Draft {i}: "
        )


def test_trace_batch_finds_the_prefix_shared_across_programs(rt):
    @sgl.function
    def prog(s, q):
        s += "Shared instructions for every question. " + q + sgl.gen("a", max_tokens=2)
        s += " then " + sgl.gen("b", max_tokens=2)

    graph = prog.trace_batch([{"q": "one?"}, {"q": "two?"}], backend=rt)
    assert [leaf.metadata["program"] for leaf in graph.leaves] == [0, 0, 1, 1]
    assert [leaf.metadata["depends_on"] for leaf in graph.leaves] == [[], ["a"], [], ["a"]]
    top = graph.shared_prefixes()[0]
    assert top.text.startswith("Shared instructions for every question.")
    assert top.num_leaves == 4


def test_runtimes_on_one_model_share_one_engine(tiny_llama):
    import sgl_adapters.lang as sgl

    a = sgl.Runtime(tiny_llama, device="cpu", max_total_tokens=2048)
    b = sgl.Runtime(tiny_llama, device="cpu", max_total_tokens=2048)
    try:
        assert a.engine is b.engine
    finally:
        a.shutdown()
        b.shutdown()
