"""The plugin layer: manager loading rules, broken plugins, the local backend (fake and real
engine), the example third-party plugin, and `sgl-adapters plugins`."""

from __future__ import annotations

import asyncio
import json
import sys
import typing
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
from sgl_plugins import hookimpl
from sgl_plugins.backend import Backend, BackendBase, new_logprobs
from sgl_plugins.builtin import local
from sgl_plugins.builtin.local import EnginePool, LocalBackend, LocalBackendFactory
from sgl_plugins.manager import (
    BACKEND_MEMBERS,
    PluginLoadWarning,
    PluginManager,
    UnknownBackendError,
    get_plugin_manager,
)

from sgl_adapters.graph import CallGraph, LeafResult

EXAMPLE_PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "example-plugin"


class Echo(BackendBase):
    name = "echo"

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs

    def run_graph(self, graph):
        return [LeafResult(leaf.id, graph.prompt_text(leaf.node)) for leaf in graph.leaves]


def plugin(backends=(), templates=(), raises=None):
    """An in-test plugin object registering `backends` [(name, factory, caps)] and templates."""

    class Plugin:
        @hookimpl
        def register_backends(self, register):
            if raises is not None:
                raise raises
            for args in backends:
                register(*args)

        @hookimpl
        def register_chat_templates(self, register):
            for name, text in templates:
                register(name, text)

    return Plugin()


def manager(env=None, eps=(), builtins=()):
    return PluginManager(env or {}, entry_points=lambda: list(eps), builtins=builtins)


class FakeEntryPoint:
    """Duck-typed entry point that counts loads."""

    def __init__(self, name, obj, value=None):
        self.name, self.value, self.group = name, value or f"fake_{name}", "sgl_adapters"
        self.obj, self.loads, self.dist = obj, 0, None

    def load(self):
        self.loads += 1
        if isinstance(self.obj, BaseException):
            raise self.obj
        return self.obj


# -- manager ----------------------------------------------------------------------------------


def test_in_test_plugins_register_backends_and_templates():
    pm = manager()
    assert pm.register(plugin([("echo", Echo, ["generate"])], [("t", "{{ messages }}")]), "p")
    assert pm.backends()["echo"].capabilities == frozenset({"generate"})
    assert pm.backends()["echo"].plugin == "p"
    assert pm.chat_templates()["t"].template == "{{ messages }}"
    backend = pm.get_backend("echo", x=1)
    assert isinstance(backend, Echo) and backend.kwargs == {"x": 1}
    assert isinstance(backend, Backend)
    graph = CallGraph.from_prompts(["ab", "ac"])
    assert [r.text for r in backend.run_graph(graph)] == ["ab", "ac"]
    [info] = pm.list_plugins()
    assert (info.name, info.backends, info.chat_templates) == ("p", ("echo",), ("t",))
    assert pm.errors == []


def test_backend_members_list_the_protocol():
    assert set(BACKEND_MEMBERS) == set(typing._get_protocol_attrs(Backend))


def test_builtins_load_through_the_same_hooks():
    from sgl_plugins.builtin import http, openai_compat, ray

    pm = PluginManager({}, entry_points=lambda: []).load()
    assert pm.errors == []
    assert pm.hooks.get_plugin("local") is local and pm.hooks.get_plugin("http") is http
    impls = [impl.plugin for impl in pm.hooks.hook.register_backends.get_hookimpls()]
    assert sorted(impls, key=lambda m: m.__name__) == [http, local, openai_compat, ray]
    spec = pm.backends()["local"]
    assert isinstance(spec.factory, LocalBackendFactory) and "prefix_dedup" in spec.capabilities
    assert set(pm.backends()) == {"local", "http", "openai", "ray"}
    infos = pm.list_plugins()
    assert [(i.name, i.builtin, i.module) for i in infos] == [
        ("families", True, "sgl_plugins.builtin.families"),
        ("http", True, "sgl_plugins.builtin.http"),
        ("local", True, "sgl_plugins.builtin.local"),
        ("openai", True, "sgl_plugins.builtin.openai_compat"),
        ("ray", True, "sgl_plugins.builtin.ray"),
    ]
    assert "chatml" in pm.chat_templates()
    assert {"qwen3", "llama3", "mistral", "smollm2", "hermes"} <= set(pm.model_families().names())


def test_a_plugin_family_is_detected_before_the_builtins():
    from sgl_engine.families import HERMES, ModelFamily

    class Families:
        @hookimpl
        def register_model_families(self, register):
            register(ModelFamily("acme", HERMES, template_markers=("<acme>",), priority=99))

    pm = PluginManager({}, entry_points=lambda: []).load()
    assert pm.register(Families(), "acme-plugin")
    registry = pm.model_families()
    assert registry.detect("<acme> <tool_call> <think>").name == "acme"
    assert registry.detect("<tool_call> <think>").name == "qwen3"
    infos = {i.name: i for i in pm.list_plugins()}
    assert infos["acme-plugin"].model_families == ("acme",)
    with pytest.warns(PluginLoadWarning, match="already registered by plugin 'acme-plugin'"):
        assert not pm.register(Families(), "copy")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (plugin(raises=RuntimeError("boom")), "RuntimeError: boom"),
        (plugin([("x", "not callable", ["generate"])]), "factory 'not callable' is not callable"),
        (plugin([("x", Echo, "generate")]), "capabilities must be an iterable of names"),
        (plugin([("bad name", Echo)]), "'bad name' is not a valid name"),
        (plugin([("echo", Echo)]), "'echo' is already registered by plugin 'good'"),
        (plugin([("x", Echo), ("x", Echo)]), "'x' is registered twice"),
        (plugin(templates=[("t2", "")]), "template must be a non-empty string"),
        (
            plugin(templates=[("t", "x")]),
            "chat template 't' is already registered by plugin 'good'",
        ),
    ],
)
def test_bad_registrations_reject_the_whole_plugin(bad, message):
    pm = manager(eps=[FakeEntryPoint("good", plugin([("echo", Echo)], [("t", "x")]))])
    pm.load()
    with pytest.warns(PluginLoadWarning, match="'broken'"):
        assert not pm.register(bad, "broken", entry_point="broken = pkg.mod")
    [err] = pm.errors
    assert err.plugin == "broken" and err.entry_point == "broken = pkg.mod"
    assert message in err.message
    assert "plugin 'broken' (entry point broken = pkg.mod)" in str(err)
    assert not pm.hooks.has_plugin("broken")
    assert [p.name for p in pm.list_plugins()] == ["good"]
    assert set(pm.backends()) == {"echo"} and pm.backends()["echo"].plugin == "good"
    assert pm.get_backend("echo").run_graph(CallGraph.from_prompts(["z"]))[0].text == "z"


def test_broken_plugins_by_kind_leave_the_others_working():
    class Typo:
        @hookimpl
        def register_backend(self, register):  # singular: not a hook
            register("typo", Echo)

    class WrongArgs:
        @hookimpl
        def register_backends(self, register, extra):
            register("wrong", Echo)

    eps = [
        FakeEntryPoint("missing", ModuleNotFoundError("No module named 'nope'"), "nope"),
        FakeEntryPoint("typo", Typo()),
        FakeEntryPoint("wrongargs", WrongArgs()),
        FakeEntryPoint("empty", object()),
        FakeEntryPoint("good", plugin([("echo", Echo)])),
    ]
    pm = manager(eps=eps)
    with pytest.warns(PluginLoadWarning) as caught:
        pm.load()
    by_plugin = {e.plugin: e for e in pm.errors}
    assert set(by_plugin) == {"missing", "typo", "wrongargs", "empty"}
    assert len(caught) == 4
    assert (
        "import failed" in by_plugin["missing"].message and "nope" in by_plugin["missing"].message
    )
    assert by_plugin["missing"].entry_point == "missing = nope"
    assert "unknown hook(s) register_backend" in by_plugin["typo"].message
    assert "cannot be registered" in by_plugin["wrongargs"].message
    assert "implements no sgl_adapters hook" in by_plugin["empty"].message
    assert set(pm.backends()) == {"echo"}
    assert [p.name for p in pm.list_plugins()] == ["good"]
    with pytest.raises(UnknownBackendError, match="available: echo.*'typo'"):
        pm.get_backend("typo")


def test_load_is_idempotent_and_allowlisted():
    eps = [FakeEntryPoint(n, plugin([(n, Echo)])) for n in ("foo", "bar")]
    pm = manager({"SGL_ADAPTERS_PLUGINS": " foo , ghost"}, eps, local_builtin())
    with pytest.warns(PluginLoadWarning, match="'ghost'.*not installed"):
        pm.load()
    pm.load()
    assert [ep.loads for ep in eps] == [1, 0]
    assert set(pm.backends()) == {"foo"}
    assert [e.plugin for e in pm.errors] == ["ghost"]


def local_builtin():
    return (("local", "sgl_plugins.builtin.local"),)


def test_env_switches():
    def names(env):
        eps = [FakeEntryPoint("foo", plugin([("foo", Echo)]))]
        return sorted(manager(env, eps, local_builtin()).load().backends())

    assert names({}) == ["foo", "local"]
    assert names({"SGL_ADAPTERS_LOAD_PLUGINS": "0"}) == ["local"]
    assert names({"SGL_ADAPTERS_PLUGINS": "foo"}) == ["foo"]
    assert names({"SGL_ADAPTERS_PLUGINS": ""}) == []


def test_builtin_found_again_as_entry_point_is_loaded_once():
    ep = EntryPoint("local", "sgl_plugins.builtin.local", "sgl_adapters")
    pm = manager(eps=[ep], builtins=local_builtin()).load()
    assert pm.errors == []
    [info] = pm.list_plugins()
    assert info.entry_point == "local = sgl_plugins.builtin.local" and info.builtin


def test_real_import_error_names_the_entry_point(tmp_path, monkeypatch):
    (tmp_path / "broken_sgl_plugin.py").write_text("import not_a_module_xyz\n")
    (tmp_path / "fine_sgl_plugin.py").write_text(
        "from sgl_plugins import hookimpl\n"
        "from sgl_plugins.backend import BackendBase\n"
        "class B(BackendBase):\n    name = 'fine'\n"
        "@hookimpl\ndef register_backends(register):\n    register('fine', B)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [
        EntryPoint("broken", "broken_sgl_plugin", "sgl_adapters"),
        EntryPoint("fine", "fine_sgl_plugin", "sgl_adapters"),
    ]
    pm = manager(eps=eps)
    with pytest.warns(
        PluginLoadWarning, match=r"'broken' \(entry point broken = broken_sgl_plugin"
    ):
        pm.load()
    assert "not_a_module_xyz" in pm.errors[0].message
    assert pm.get_backend("fine").name == "fine"
    assert [p.module for p in pm.list_plugins()] == ["fine_sgl_plugin"]


def test_get_backend_errors_name_the_plugin():
    def boom(**kwargs):
        raise OSError("no such model")

    pm = manager()
    pm.register(plugin([("notabackend", lambda: object()), ("boom", boom)]), "odd")
    with pytest.raises(TypeError, match="'notabackend' of plugin 'odd'.*lacks Backend members"):
        pm.get_backend("notabackend")
    with pytest.raises(OSError) as info:
        pm.get_backend("boom")
    assert "plugin 'odd'" in info.value.__notes__[0]
    with pytest.raises(UnknownBackendError, match="no sgl-adapters backend named 'local'"):
        pm.get_backend()


def test_get_plugin_manager_is_cached_and_fresh_managers_are_independent():
    assert get_plugin_manager() is get_plugin_manager()
    assert PluginManager() is not PluginManager()
    assert not PluginManager()._loaded


# -- local backend against a fake engine that follows the engine contract --------------------


def fake_logprob(position: int, token: int) -> float:
    return -0.5 - 0.25 * (position % 3) - token / 1000


class FakeEngine:
    """Answers with the reversed prompt ids; prompt logprobs from `fake_logprob`."""

    def __init__(self, tokenizer, model_path=None, **config):
        self.tokenizer, self.model_path, self.config = tokenizer, model_path, config
        self.calls: list[dict] = []
        self.shut = 0

    def _one(self, ids, params, return_logprob, start):
        n = params.get("max_new_tokens", 128)
        out = list(reversed(ids))[:n]
        meta = {
            "prompt_tokens": len(ids),
            "completion_tokens": len(out),
            "cached_tokens": 0,
            "finish_reason": {"type": "length", "matched": None},
        }
        if return_logprob:
            meta["input_token_logprobs"] = [
                (None if p == 0 else fake_logprob(p, ids[p]), ids[p], None)
                for p in range(max(start, 0), len(ids))
            ]
            meta["output_token_logprobs"] = [(-1.0, t, None) for t in out]
        return {"text": self.tokenizer.decode(out), "output_ids": out, "meta_info": meta}

    def generate(
        self,
        prompt=None,
        sampling_params=None,
        input_ids=None,
        return_logprob=False,
        logprob_start_len=-1,
        top_logprobs_num=0,
        stream=False,
        rid=None,
    ):
        call = dict(prompt=prompt, input_ids=input_ids, sampling_params=sampling_params)
        self.calls.append(call)
        single = not isinstance(sampling_params, list)
        ids = input_ids if input_ids is not None else prompt
        ids = [ids] if single else ids
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else p for p in ids]
        n = len(ids)

        def per(v):
            return v if isinstance(v, list) else [v] * n

        args = zip(
            ids,
            per(sampling_params or {}),
            per(return_logprob),
            per(logprob_start_len),
            strict=True,
        )
        outs = [self._one(*a) for a in args]
        if stream:
            return self._chunks(outs[0])
        return outs[0] if single else outs

    def score(self, prefix, continuations):
        """`Engine.score`'s own planning around this fake's `generate`."""
        from sgl_engine.scoring import plan_scores

        def encode(texts):
            return [self.tokenizer.encode(t) for t in texts]

        plan = plan_scores(prefix, continuations, encode, lambda text, field: None, 1 << 30)
        return plan.results(self.generate(**plan.request().forwarded()))

    def _chunks(self, out):
        ids = out["output_ids"]
        for i in range(1, len(ids) + 1):
            meta = dict(out["meta_info"]) if i == len(ids) else {"finish_reason": None}
            yield {
                "text": self.tokenizer.decode(ids[:i]),
                "output_ids": ids[:i],
                "delta": self.tokenizer.decode(ids[i - 1 : i]),
                "meta_info": meta,
            }

    async def async_generate(self, **kwargs):
        out = self.generate(**kwargs)
        if kwargs.get("stream"):

            async def agen():
                for chunk in out:
                    yield chunk

            return agen()
        return out

    def apply_chat_template(self, messages, add_generation_prompt=True, tools=None):
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, tools=tools
        )

    def metrics(self):
        return {"calls": len(self.calls)}

    def shutdown(self):
        self.shut += 1


@pytest.fixture(scope="module")
def tokenizer():
    from sgl_engine.testing import make_tiny_tokenizer

    return make_tiny_tokenizer()


def test_local_backend_submits_a_graph_as_one_batch(tokenizer):
    engine = FakeEngine(tokenizer)
    backend = LocalBackend(engine=engine)
    prompts = ["The quick brown fox", "The quick brown dog", "A radix tree"]
    graph = CallGraph.from_prompts(prompts, tokenizer, {"max_new_tokens": 3}, metadata={"m": 1})
    graph.add_leaf(graph.leaf(0).node, {"max_new_tokens": 2}, regex="[a-z]+", return_logprob=True)
    results = backend.run_graph(graph)
    [call] = engine.calls
    ids = [tokenizer.encode(p) for p in prompts]
    assert call["input_ids"] == [*ids, ids[0]]
    assert call["sampling_params"][3] == {"max_new_tokens": 2, "regex": "[a-z]+"}
    expect = [list(reversed(i))[:3] for i in ids] + [list(reversed(ids[0]))[:2]]
    assert [list(r.output_ids) for r in results] == expect
    assert [r.text for r in results] == [tokenizer.decode(e) for e in expect]
    assert results[0].metadata == {"m": 1} and results[0].finish_reason == "length"
    assert results[0].usage.prompt_tokens == len(ids[0]) and results[0].logprobs is None
    assert results[3].logprobs == (-1.0, -1.0)
    assert backend.run_graph(CallGraph()) == []


def test_local_backend_stream_async_and_chat_template(tokenizer):
    engine = FakeEngine(tokenizer)
    backend = LocalBackend(engine=engine, chat_template=local.CHATML_TEMPLATE.replace("\\n", " "))
    chunks = list(backend.stream("The quick brown", {"max_new_tokens": 4}))
    full = backend.generate("The quick brown", {"max_new_tokens": 4})
    assert "".join(c.delta for c in chunks) == chunks[-1].text == full.text
    assert [c.finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert chunks[-1].usage == full.usage

    async def run():
        graph = CallGraph.from_prompts(["ab", "abc"], tokenizer, {"max_new_tokens": 2})
        results = await backend.arun_graph(graph)
        streamed = [c async for c in backend.astream("The quick brown", {"max_new_tokens": 4})]
        return results, streamed

    results, streamed = asyncio.run(run())
    again = backend.run_graph(
        CallGraph.from_prompts(["ab", "abc"], tokenizer, {"max_new_tokens": 2})
    )
    assert [r.text for r in results] == [r.text for r in again]
    assert [c.text for c in streamed] == [c.text for c in chunks]
    messages = [{"role": "user", "content": "hi"}]
    assert (
        backend.apply_chat_template(messages)
        == "<|im_start|>user hi<|im_end|> <|im_start|>assistant "
    )
    plain = LocalBackend(engine=engine)
    assert (
        plain.apply_chat_template(messages)
        == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_local_backend_scores_continuations(tokenizer):
    engine = FakeEngine(tokenizer)
    backend = LocalBackend(engine=engine)
    prefix = "Question: What is the capital of France? Answer:"
    conts = [" Paris", " London", " 4"]
    scores = backend.score(prefix, conts)
    [call] = engine.calls
    assert call["sampling_params"] == [{"max_new_tokens": 0}] * 3
    p_ids = tokenizer.encode(prefix)
    for text, score in zip(conts, scores, strict=True):
        full = tokenizer.encode(prefix + text)
        k = next(i for i in range(len(full)) if i >= len(p_ids) or full[i] != p_ids[i])
        expect = [fake_logprob(pos, full[pos]) for pos in range(k, len(full))]
        assert score.text == text and list(score.token_ids) == full[k:]
        assert score.num_tokens == len(expect)
        assert score.logprob_sum == pytest.approx(sum(expect))
        assert score.logprob_mean == pytest.approx(sum(expect) / len(expect))


def test_engine_pool_shares_and_releases():
    made = []

    def factory(model_path, **config):
        made.append(FakeEngine(None, model_path, **config))
        return made[-1]

    pool = EnginePool(factory)
    make = LocalBackendFactory(pool)
    a, b = make("m", device="cpu"), make("m", device="cpu")
    c = make("m", device="cpu", seed=1)
    assert a.engine is b.engine and a.engine is not c.engine and len(made) == 2
    a.close()
    a.close()
    assert made[0].shut == 0
    b.close()
    assert made[0].shut == 1 and len(pool) == 1
    assert make("m", device="cpu").engine is not made[0]
    make.close()
    assert made[1].shut == 1 and made[2].shut == 1 and len(pool) == 0


def test_manager_resolves_template_names_and_closes_pools(tokenizer):
    made = []

    class Owned:
        @hookimpl
        def register_backends(self, register):
            pool = EnginePool(lambda path, **cfg: made.append(FakeEngine(tokenizer)) or made[-1])
            register("pooled", LocalBackendFactory(pool), ["generate"])

    pm = manager(builtins=local_builtin()).load()
    pm.register(Owned(), "owned")
    backend = pm.get_backend("pooled", chat_template="chatml")
    assert backend.chat_template == local.CHATML_TEMPLATE
    assert pm.get_backend("pooled", chat_template="chatml").engine is backend.engine
    pm.close()
    assert made[0].shut == 1


# -- the example third-party plugin, registered from its source folder ------------------------


@pytest.fixture
def example_plugin(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE_PLUGIN))
    import sgl_example_plugin

    yield sgl_example_plugin
    sys.modules.pop("sgl_example_plugin", None)


def test_example_plugin_runs_graphs_and_counts_shared_prefixes(example_plugin):
    pm = manager()
    assert pm.register(example_plugin, "reverse")
    backend = pm.get_backend("reverse", chat_template="plain")
    head = "shared instructions: "
    prompts = [head + "abc", head + "xy", "other"]
    graph = CallGraph.from_prompts(prompts, backend.tokenizer, {"max_new_tokens": 100})
    results = graph.run(backend)
    assert [r.text for r in results] == [p[::-1] for p in prompts]
    assert [r.usage.cached_tokens for r in results] == [0, len(head), 0]
    assert backend.metrics()["prefill_tokens"] == len(head) + len("abc") + len("xy") + len("other")
    cut = backend.generate("hello world", {"max_new_tokens": 20, "stop": ["ow", "l"]})
    assert (cut.text, cut.finish_reason, cut.matched_stop) == ("d", "stop", "l")
    chats = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]]
    graph = CallGraph.from_messages(chats, backend)
    assert graph.shared_prefixes()[0].text == "user: "
    expect = [f"user: {c[0]['content']}\nassistant: "[::-1] for c in chats]
    assert [r.text for r in graph.run(backend)] == expect


# -- the CLI -----------------------------------------------------------------------------------


def test_cli_plugins_lists_what_is_loaded(monkeypatch, capsys):
    from sgl_adapters import cli

    monkeypatch.setenv("SGL_ADAPTERS_LOAD_PLUGINS", "0")
    monkeypatch.delenv("SGL_ADAPTERS_PLUGINS", raising=False)
    get_plugin_manager.cache_clear()
    try:
        assert cli.main(["plugins", "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert cli.main(["plugins"]) == 0
        table = capsys.readouterr().out.splitlines()
    finally:
        get_plugin_manager.cache_clear()
    entries = {p["name"]: p for p in data["plugins"]}
    assert set(entries) == {"local", "http", "openai", "ray", "families"} and data["errors"] == []
    assert entries["local"]["backends"] == ["local"]
    assert "qwen3" in entries["families"]["model_families"]
    assert entries["local"]["module"] == "sgl_plugins.builtin.local"
    assert table[0].split()[:4] == ["NAME", "VERSION", "DISTRIBUTION", "MODULE"]
    rows = {line.split()[0]: line for line in table[1:]}
    assert rows["local"].split()[1] == "(built-in)" and "sgl_plugins.builtin.local" in rows["local"]


# -- local backend on a tiny random model ------------------------------------------------------

HEAD = (
    "Question: What is the capital of France? Answer: Paris. Question: What is two plus two? "
    "Answer: 4. The quick brown fox jumps over the lazy dog. "
)
QUESTIONS = ["Question: What is a radix tree? Answer:", "Question: fox? Answer:", "yes no maybe"]


def test_graph_prefills_the_shared_prefix_once_and_matches_one_by_one(tiny_llama, make_engine):
    greedy = {"max_new_tokens": 8, "temperature": 0.0}
    prompts = [HEAD + q for q in QUESTIONS] + [HEAD + "A radix tree shares prefixes"]
    backend = LocalBackend(engine=make_engine(tiny_llama))
    graph = CallGraph.from_prompts(prompts, backend.tokenizer, greedy)
    shared = graph.shared_prefixes()[0]
    ids = [backend.tokenizer.encode(p) for p in prompts]
    suffixes = sum(len(i) - shared.num_tokens for i in ids)
    trie_tokens = sum(len(n.token_ids) for n in graph.nodes[1:])  # each node once
    assert shared.num_tokens >= 40 and shared.num_leaves == len(prompts)
    assert trie_tokens <= shared.num_tokens + suffixes
    results = backend.run_graph(graph)
    prefill = backend.metrics()["prefill_tokens"]
    assert prefill == trie_tokens, (prefill, trie_tokens, shared.num_tokens + suffixes)
    assert sum(r.usage.cached_tokens for r in results) >= (len(prompts) - 1) * (
        shared.num_tokens - 1
    )

    alone = make_engine(tiny_llama, disable_radix_cache=True)
    expected = [alone.generate(p, greedy) for p in prompts]
    assert alone.metrics()["prefill_tokens"] == sum(len(i) for i in ids)
    assert [list(r.output_ids) for r in results] == [e["output_ids"] for e in expected]
    assert [r.text for r in results] == [e["text"] for e in expected]
    assert [r.usage.prompt_tokens for r in results] == [len(i) for i in ids]


def test_local_scores_match_transformers(tiny_llama, make_engine):
    import torch
    from transformers import AutoModelForCausalLM

    backend = LocalBackend(engine=make_engine(tiny_llama))
    conts = [" Paris.", " London, maybe", " 4"]
    scores = backend.score(HEAD, conts)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = backend.tokenizer
    prefix_ids = tok.encode(HEAD)
    for text, score in zip(conts, scores, strict=True):
        full = tok.encode(HEAD + text)
        k = next(i for i in range(len(full)) if i >= len(prefix_ids) or full[i] != prefix_ids[i])
        with torch.no_grad():
            logits = model(torch.tensor([full])).logits[0].log_softmax(-1)
        ref = [logits[p - 1, full[p]].item() for p in range(k, len(full))]
        assert list(score.token_ids) == full[k:] and score.num_tokens == len(ref)
        assert score.logprob_sum == pytest.approx(sum(ref), abs=1e-3)
        assert score.logprob_mean == pytest.approx(sum(ref) / len(ref), abs=1e-3)


def test_local_stream_and_pool_through_the_manager(tiny_llama):
    pm = manager(builtins=local_builtin()).load()
    config = {"device": "cpu", "max_total_tokens": 2048}
    a = pm.get_backend("local", model_path=tiny_llama, **config)
    b = pm.get_backend(model_path=tiny_llama, **config)
    try:
        assert a.engine is b.engine
        params = {"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True}
        chunks = list(a.stream(HEAD, params))
        full = b.generate(HEAD, params)
        assert "".join(c.delta for c in chunks) == chunks[-1].text == full.text
        assert chunks[-1].finish_reason == full.finish_reason == "length"
        assert full.usage.cached_tokens > 0 and full.usage.completion_tokens == 6
        constrained = a.generate(HEAD, {"max_new_tokens": 5}, regex="[0-9]{3}")
        assert constrained.text.isdigit() and len(constrained.text) == 3
    finally:
        a.close()
        b.close()
        pm.close()
    assert not a.engine._thread.is_alive()


def test_close_skips_backend_classes_registered_as_factories():
    from sgl_plugins.manager import PluginManager

    manager = PluginManager(env={"SGL_ADAPTERS_LOAD_PLUGINS": "0"})
    manager.load()
    assert "http" in manager.backends()
    manager.close()
    manager.close()


def test_stream_logprobs_are_read_cumulative_or_incremental():
    """SGLang streams output logprobs cumulative (default) or new-only (incremental output);
    a StreamChunk gets the new ones either way."""
    a, b, c = (-0.5, 1, None), (-1.0, 2, None), (-2.0, 3, None)
    tops = [[a], [b], [c]]
    cumulative = {"output_token_logprobs": [a, b, c], "output_top_logprobs": tops}
    assert new_logprobs({**cumulative, "completion_tokens": 3}, 1) == ((b, c), ((b,), (c,)))
    incremental = {"output_token_logprobs": [c], "output_top_logprobs": [[c]]}
    assert new_logprobs({**incremental, "completion_tokens": 3}, 2) == ((c,), ((c,),))
    assert new_logprobs({"completion_tokens": 3}, 2) == ((), ())
