"""CallGraph: trie construction against brute force, hand-built graphs, leaf rules, execution."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sgl_plugins.backend import BackendBase

from sgl_adapters.graph import CallGraph, LeafResult, Usage


@pytest.fixture(scope="module")
def tokenizer():
    from sgl_engine.testing import make_tiny_tokenizer

    return make_tiny_tokenizer()


def lcp(a, b) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def seg_len(node) -> int:
    return len(node.token_ids) if node.token_ids is not None else len(node.text)


def check_trie(graph: CallGraph, seqs) -> None:
    """Leaf i spells seq i; the LCA of two leaves sits at their longest common prefix; the trie
    is compressed (no empty segment, no unary node without leaves, distinct first elements)."""
    assert [leaf.id for leaf in graph.leaves] == list(range(len(seqs)))
    for leaf, seq in zip(graph.leaves, seqs, strict=True):
        spelled = []
        for node in graph.path(leaf.node):
            spelled.extend(node.token_ids if node.token_ids is not None else node.text)
        assert spelled == list(seq)
    for i, j in itertools.combinations(range(len(seqs)), 2):
        pi = graph.path(graph.leaf(i).node)
        pj = graph.path(graph.leaf(j).node)
        common = [a for a, b in zip(pi, pj, strict=False) if a.id == b.id]
        assert sum(seg_len(n) for n in common) == lcp(seqs[i], seqs[j]), (i, j)
    for node in graph.nodes[1:]:
        assert seg_len(node) > 0
        kids = graph.children(node.id)
        assert len(kids) >= 2 or graph.leaves_at(node.id) or not kids
    for node in graph.nodes:
        firsts = [
            (n.token_ids or n.text)[0] for n in (graph.node(k) for k in graph.children(node.id))
        ]
        assert len(firsts) == len(set(firsts))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=1, max_size=8))
def test_token_trie_matches_brute_force_lcp(seqs):
    graph = CallGraph.from_prompts(seqs)
    check_trie(graph, seqs)
    assert graph.leaf_inputs() == ("ids", [list(s) for s in seqs])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="ab ", min_size=1, max_size=12), min_size=1, max_size=8))
def test_character_trie_without_tokenizer(prompts):
    graph = CallGraph.from_prompts(prompts)
    check_trie(graph, prompts)
    assert graph.leaf_inputs() == ("text", list(prompts))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(alphabet="The fox quick", min_size=1, max_size=30), min_size=1, max_size=6))
def test_tokenized_trie_matches_encode(tokenizer, prompts):
    graph = CallGraph.from_prompts(prompts, tokenizer)
    seqs = [tokenizer.encode(p) for p in prompts]
    check_trie(graph, seqs)
    kind, inputs = graph.leaf_inputs(tokenizer)
    assert kind == "ids" and inputs == seqs


def test_shared_prefixes_of_a_few_shot_batch(tokenizer):
    head = "Question: What is the capital of France? Answer: Paris.\n"
    prompts = [head + "Question: two plus two?", head + "Question: the fox?", "unrelated"]
    graph = CallGraph.from_prompts(prompts, tokenizer, {"max_new_tokens": 4})
    shared = graph.shared_prefixes()
    ids = [tokenizer.encode(p) for p in prompts]
    assert [s.num_leaves for s in shared] == [2]
    assert shared[0].num_tokens == lcp(ids[0], ids[1])
    assert tokenizer.encode(shared[0].text) == ids[0][: shared[0].num_tokens]
    assert graph.shared_prefix_waves() == [[shared[0].node]]
    assert all(leaf.sampling_params == {"max_new_tokens": 4} for leaf in graph.leaves)


def test_hand_built_graph_and_waves(tokenizer):
    g = CallGraph()
    sys_node = g.add_node(g.root, "System: be brief.\n")
    shot = g.add_node(sys_node, "Q: 1+1? A: 2\n")
    q1 = g.add_node(shot, "Q: 2+2? A:")
    q2 = g.add_node(shot, "Q: 3+3? A:")
    other = g.add_node(sys_node, "Q: hi? A:")
    leaves = [g.add_leaf(n, {"max_new_tokens": 2}, metadata={"q": n}) for n in (q1, q2, other)]
    assert g.prompt_text(q1) == "System: be brief.\nQ: 1+1? A: 2\nQ: 2+2? A:"
    assert g.leaf_inputs()[0] == "text"
    assert [s.node for s in g.shared_prefixes()] == [sys_node, shot]
    assert g.shared_prefix_waves() == [[sys_node], [shot]]
    assert g.leaf(leaves[2]).metadata == {"q": other}
    ids_node = g.add_node(q1, token_ids=[5, 6])
    g.add_leaf(ids_node)
    with pytest.raises(ValueError, match="tokenizer"):
        g.leaf_inputs()
    kind, inputs = g.leaf_inputs(tokenizer)
    assert kind == "ids"
    expected = []
    for i, text in enumerate(["System: be brief.\n", "Q: 1+1? A: 2\n", "Q: 2+2? A:"]):
        expected += tokenizer.encode(text, add_special_tokens=i == 0)
    assert inputs[3] == expected + [5, 6]


def test_leaf_constraint_rules():
    g = CallGraph()
    n = g.add_node(g.root, "x")
    leaf = g.leaf(g.add_leaf(n, {"regex": "[0-9]+", "temperature": 0}))
    assert leaf.constraint == ("regex", "[0-9]+")
    assert leaf.sampling_params == {"temperature": 0}
    assert leaf.request_params() == {"temperature": 0, "regex": "[0-9]+"}
    choice = g.leaf(g.add_leaf(n, choices=["yes", "no"]))
    assert choice.request_params() == {"choices": ["yes", "no"]}
    with pytest.raises(ValueError, match="at most one constraint"):
        g.add_leaf(n, {"regex": "a"}, json_schema={"type": "object"})
    with pytest.raises(ValueError, match="both"):
        g.add_leaf(n, {"ebnf": "root ::= 'a'"}, ebnf="root ::= 'b'")
    with pytest.raises(ValueError, match="n > 1"):
        g.add_leaf(n, {"n": 3})
    with pytest.raises(ValueError, match="empty"):
        g.add_leaf(n, choices=[])
    with pytest.raises(KeyError):
        g.add_leaf(99)
    with pytest.raises(ValueError, match="text or token_ids"):
        g.add_node(n)
    with pytest.raises(ValueError, match="2 sampling_params for 3 prompts"):
        CallGraph.from_prompts(["a", "b", "c"], sampling_params=[{}, {}])


class PromptEcho(BackendBase):
    """Answers each leaf with its prompt's length; records what it was given."""

    name = "echo"

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.calls: list[CallGraph] = []

    def run_graph(self, graph):
        self.calls.append(graph)
        kind, prompts = graph.leaf_inputs(self.tokenizer)
        return [
            LeafResult(leaf.id, str(len(p)), usage=Usage(len(p), 1), metadata=leaf.metadata)
            for leaf, p in zip(graph.leaves, prompts, strict=True)
        ]


def test_from_messages_and_run_on_a_backend(tokenizer):
    backend = PromptEcho(tokenizer)
    system = {"role": "system", "content": "You answer in one word."}
    chats = [[system, {"role": "user", "content": q}] for q in ("Capital of France?", "2+2?")]
    graph = CallGraph.from_messages(chats, backend, {"max_new_tokens": 3}, metadata={"k": 1})
    rendered = [
        tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats
    ]
    ids = [tokenizer.encode(r) for r in rendered]
    assert graph.leaf_inputs(tokenizer)[1] == ids
    assert graph.shared_prefixes()[0].num_tokens == lcp(ids[0], ids[1])
    results = graph.run(backend)
    assert [r.text for r in results] == [str(len(i)) for i in ids]
    assert [r.metadata for r in results] == [{"k": 1}, {"k": 1}]
    assert backend.calls == [graph]
    single = backend.generate("hello", {"max_new_tokens": 1})
    assert single.text == "5"  # a text prompt stays text
    chunks = list(backend.stream("hello"))
    assert [c.finish_reason for c in chunks] == ["stop"] and chunks[0].text == single.text


def test_async_defaults_run_in_a_thread():
    backend = PromptEcho(None)

    async def main():
        results = await CallGraph.from_prompts(["ab", "abc"]).arun(backend)
        chunks = [c async for c in backend.astream("abcd")]
        return [r.text for r in results], [c.text for c in chunks]

    assert asyncio.run(main()) == (["2", "3"], ["4"])
