"""The `http` backend plugin against our server: same results as the in-process `local`
backend, one prefill per shared prefix, scoring, streaming, errors, plugin registration."""

from __future__ import annotations

import asyncio

import pytest
from sgl_engine.server import ServerThread, create_app
from sgl_plugins.builtin import http as http_plugin
from sgl_plugins.builtin.local import LocalBackend
from sgl_plugins.manager import PluginManager

from sgl_adapters.graph import CallGraph

GREEDY = {"temperature": 0, "max_new_tokens": 6}
PREFIX = "Question: What is the capital of France? Answer: Paris. Question: "
SUFFIXES = ["What is two plus two?", "A radix tree?", "The quick brown fox?"]


@pytest.fixture(scope="module")
def backends(tiny_llama):
    from sgl_engine import Engine

    eng = Engine(tiny_llama, device="cpu", max_total_tokens=4096)
    with ServerThread(create_app(eng, api_key="k")) as srv:
        remote = http_plugin.HttpBackend(srv.base_url, api_key="k")
        yield eng, LocalBackend(engine=eng), remote
        remote.close()
    eng.check_invariants()
    eng.shutdown()


def test_graph_results_equal_local(backends):
    _, local, remote = backends
    graph = CallGraph.from_prompts([PREFIX + s for s in SUFFIXES], sampling_params=GREEDY)
    want = local.run_graph(graph)
    got = remote.run_graph(graph)
    assert [r.text for r in got] == [r.text for r in want]
    assert [r.output_ids for r in got] == [r.output_ids for r in want]
    assert [r.finish_reason for r in got] == [r.finish_reason for r in want]
    assert [r.text for r in asyncio.run(remote.arun_graph(graph))] == [r.text for r in want]


def test_shared_prefix_is_prefilled_once_cold(backends):
    eng, _, remote = backends
    tok = eng.tokenizer
    prompts = [PREFIX + s for s in SUFFIXES]
    assert remote.flush_cache()
    before = remote.metrics()["prefill_tokens"]
    remote.run_graph(CallGraph.from_prompts(prompts, sampling_params=GREEDY))
    spent = remote.metrics()["prefill_tokens"] - before
    ids = [tok.encode(p) for p in prompts]
    shared = min(
        next(i for i, (a, b) in enumerate(zip(x, ids[0], strict=False)) if a != b) for x in ids[1:]
    )
    dedup = shared + sum(len(x) - shared for x in ids)
    assert spent <= dedup < sum(len(x) for x in ids)


def test_score_equals_local(backends):
    _, local, remote = backends
    conts = [" Paris.", " Rome.", " 4"]
    want = local.score("Answer:", conts)
    got = remote.score("Answer:", conts)
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        assert g.logprob_sum == pytest.approx(w.logprob_sum, abs=1e-4)


def test_stream_and_astream_concatenate_to_generate(backends):
    _, _, remote = backends
    params = {**GREEDY, "max_new_tokens": 12}
    full = remote.generate("The quick brown fox", params)
    chunks = list(remote.stream("The quick brown fox", params))
    assert "".join(c.delta for c in chunks) == full.text
    assert chunks[-1].finish_reason == full.finish_reason and chunks[-1].usage is not None

    async def collect():
        return [c async for c in remote.astream("The quick brown fox", params)]

    assert "".join(c.delta for c in asyncio.run(collect())) == full.text


def test_constrained_leaf_and_bad_request(backends):
    _, _, remote = backends
    out = remote.generate("Pick:", {"max_new_tokens": 8}, choices=("yes", "no"))
    assert out.text in ("yes", "no")
    with pytest.raises(ValueError, match="top_p"):
        remote.generate("hi", {"top_p": 5})


def test_registered_through_the_hook(backends):
    _, _, remote = backends
    manager = PluginManager()
    assert manager.register(http_plugin, "http", builtin=True)
    spec = manager.backends()["http"]
    assert "prefix_dedup" in spec.capabilities
    backend = manager.get_backend("http", base_url=remote.base_url, api_key="k")
    try:
        assert backend.generate("A radix", GREEDY).text == remote.generate("A radix", GREEDY).text
    finally:
        backend.close()
