"""sgl_adapters.lang on the tiny random model: gen, select, roles, fork/join, scopes, streaming."""

from __future__ import annotations

import json
import math
import re

import jsonschema
import pytest
import torch

import sgl_adapters.lang as sgl

GREEDY = {"temperature": 0.0}


@pytest.fixture
def rt(make_engine, tiny_llama):
    backend = sgl.Runtime(engine=make_engine(tiny_llama))
    yield backend
    backend.shutdown()


@pytest.fixture(scope="module")
def hf_model(tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"], dtype=torch.float32)


def _ref_logprobs(model, ids: list[int], start: int) -> list[float]:
    """log p(ids[k] | ids[:k]) for k >= start, by a plain transformers forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return [lp[k - 1, ids[k]].item() for k in range(max(start, 1), len(ids))]


def test_gen_greedy_equals_engine_generate(rt):
    @sgl.function
    def prog(s, q):
        s += "Question: " + q + "\nAnswer:"
        s += sgl.gen("answer", max_tokens=12, stop="\n")
        s += " tail"

    state = prog.run(q="What is two plus two?", backend=rt, **GREEDY)
    ref = rt.engine.generate(
        "Question: What is two plus two?\nAnswer:",
        {"max_new_tokens": 12, "stop": "\n", "temperature": 0},
    )
    assert state["answer"] == ref["text"]
    assert state.text() == "Question: What is two plus two?\nAnswer:" + ref["text"] + " tail"
    meta = state.get_meta_info("answer")
    assert meta["completion_tokens"] == len(ref["output_ids"])
    assert state.error() is None


def test_min_and_max_tokens(rt):
    @sgl.function
    def prog(s):
        s += "The quick brown fox"
        s += sgl.gen("a", min_tokens=6, max_tokens=6, ignore_eos=False)
        s += sgl.gen("b", max_tokens=3)

    state = prog.run(backend=rt, **GREEDY)
    assert state.get_meta_info("a")["completion_tokens"] == 6
    assert state.get_meta_info("b")["completion_tokens"] <= 3


def test_gen_n_gives_a_list_and_program_defaults_apply(rt):
    @sgl.function
    def prog(s):
        s += "A radix tree"
        s += sgl.gen("many", n=3, temperature=1.0, seed=7)

    state = prog.run(backend=rt, max_new_tokens=4)
    assert isinstance(state["many"], list) and len(state["many"]) == 3
    metas = state.get_meta_info("many")
    assert all(m["completion_tokens"] <= 4 for m in metas)
    assert state.text() == "A radix tree" + state["many"][0]


def test_regex_json_and_dtypes_parse(rt):
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }

    @sgl.function
    def prog(s):
        s += "IP: " + sgl.gen("ip", regex=r"(\d{1,3}\.){3}\d{1,3}", max_tokens=24)
        s += "\nJSON: " + sgl.gen("js", json_schema=json.dumps(schema), max_tokens=64)
        s += "\nint: " + sgl.gen_int("i", max_tokens=6)
        s += "\nfloat: " + sgl.gen("f", dtype=float, max_tokens=8)
        s += "\nbool: " + sgl.gen("b", dtype=bool, max_tokens=4)
        s += "\nstr: " + sgl.gen_string("st", max_tokens=12)

    state = prog.run(backend=rt, **GREEDY)
    assert state.error() is None
    assert re.fullmatch(r"(\d{1,3}\.){3}\d{1,3}", state["ip"])
    jsonschema.validate(json.loads(state["js"]), schema)
    int(state["i"])
    float(state["f"])
    assert state["b"] in ("True", "False")
    if state.get_meta_info("st")["finish_reason"]["type"] == "stop":
        assert re.fullmatch(r"\"[\w\d\s]*\"", state["st"])


def test_bad_gen_argument_raises_at_construction():
    with pytest.raises(ValueError, match="regex"):
        sgl.gen("x", regex="(unclosed")
    with pytest.raises(ValueError, match="dtype"):
        sgl.gen("x", dtype=list)
    with pytest.raises(ValueError, match="at most one"):
        sgl.gen("x", regex="a", json_schema={"type": "string"})
    with pytest.raises(ValueError, match="choices"):
        sgl.select("x", [])


@pytest.mark.parametrize(
    ("prompt", "choices"),
    [
        ("Question: What is the capital of France? Answer:", [" Paris", " 4", " yes"]),
        ("The capital of France is Pa", ["ris", "x", "quick"]),  # token healing across "Pa"
    ],
)
def test_select_scores_match_transformers(rt, hf_model, prompt, choices):
    @sgl.function
    def prog(s):
        s += prompt + sgl.select("pick", choices)

    state = prog.run(backend=rt)
    meta = state.get_meta_info("pick")
    tok = rt.tokenizer
    prefix = tok.encode(prompt)
    expected = []
    for c, entries in zip(choices, meta["input_token_logprobs"], strict=True):
        full = tok.encode(prompt + c)
        start = 0
        while start < len(prefix) and prefix[start] == full[start]:
            start += 1
        ref = _ref_logprobs(hf_model, full, start)
        assert [e[1] for e in entries] == full[start:]
        assert [e[0] for e in entries] == pytest.approx(ref, abs=1e-3)
        assert "".join(e[2] for e in entries).endswith(c)
        expected.append(sum(ref) / len(ref))
    assert meta["normalized_prompt_logprobs"] == pytest.approx(expected, abs=1e-3)
    assert state["pick"] == choices[max(range(len(choices)), key=expected.__getitem__)]
    assert state.text() == prompt + state["pick"]


def test_token_healing_rescores_the_merged_boundary_token(rt):
    @sgl.function
    def prog(s):
        s += "The capital of France is Pa" + sgl.select("pick", ["ris", "x"])

    state = prog.run(backend=rt)
    entries = state.get_meta_info("pick")["input_token_logprobs"][0]
    tok = rt.tokenizer
    prefix = tok.encode("The capital of France is Pa")
    assert tok.decode([entries[0][1]]).startswith("P")  # the healed token starts in the prompt
    assert entries[0][1] not in prefix[-2:]


def test_unconditional_and_greedy_methods_end_to_end(rt, hf_model):
    choices = [" Paris", " the lazy dog"]

    @sgl.function
    def prog(s):
        s += "Answer:"
        s += sgl.select("u", choices, choices_method=sgl.unconditional_likelihood_normalized)
        s += "\nAnswer:"
        s += sgl.select("g", choices, choices_method=sgl.greedy_token_selection)

    state = prog.run(backend=rt)
    meta = state.get_meta_info("u")
    tok = rt.tokenizer
    for c, cond, uncond in zip(
        choices, meta["input_token_logprobs"], meta["unconditional_token_logprobs"], strict=True
    ):
        ids = [e[1] for e in cond]
        assert [e[1] for e in uncond] == ids
        ref = [0.0, *_ref_logprobs(hf_model, ids, 1)]
        assert [e[0] or 0.0 for e in uncond] == pytest.approx(ref, abs=1e-3)
        assert tok.decode(ids).endswith(c.strip())
    scores = meta["normalized_unconditional_prompt_logprobs"]
    assert state["u"] == choices[max(range(2), key=scores.__getitem__)]
    assert "greedy_logprob_matrix" in state.get_meta_info("g")
    assert state["g"] in choices


def test_choice_methods_on_known_inputs():
    def entries(*lps):
        return [[lp, i, "t"] for i, lp in enumerate(lps)]

    inputs = [entries(-1.0, -5.0), entries(-2.0), entries(-1.0, -0.5, -0.5)]
    norm = [-3.0, -2.0, -2.0 / 3]
    kw = dict(choices=["a", "b", "c"], input_token_logprobs=inputs, output_token_logprobs=[[]] * 3)
    assert sgl.token_length_normalized(normalized_prompt_logprobs=norm, **kw).decision == "c"
    greedy = sgl.greedy_token_selection(normalized_prompt_logprobs=norm, **kw)
    assert greedy.decision == "c"  # ties "a" at -1.0, then -0.5 beats -5.0
    assert greedy.meta_info["greedy_logprob_matrix"][1] == [-2.0, -2.0, -2.0]
    uncond = [entries(None, -1.0), entries(-4.0), entries(None, -0.5, -0.5)]
    out = sgl.unconditional_likelihood_normalized(
        normalized_prompt_logprobs=norm, unconditional_token_logprobs=uncond, **kw
    )
    assert out.meta_info["normalized_unconditional_prompt_logprobs"] == pytest.approx(
        [(-1.0 - 4.0) / 2, 2.0, -1.0 / 3]
    )
    assert out.decision == "b"
    with pytest.raises(ValueError):
        sgl.unconditional_likelihood_normalized(normalized_prompt_logprobs=norm, **kw)


def test_gen_with_choices_is_select(rt):
    @sgl.function
    def prog(s):
        s += "Answer:" + sgl.gen("x", choices=[" yes", " no"])

    state = prog.run(backend=rt)
    assert state["x"] in (" yes", " no")
    assert "normalized_prompt_logprobs" in state.get_meta_info("x")
    assert math.isfinite(max(state.get_meta_info("x")["normalized_prompt_logprobs"]))


def test_separate_reasoning_splits_a_gen_like_sglang(rt):
    @sgl.function
    def think(s):
        s += "Q: 1+1?\n"
        s += sgl.separate_reasoning(
            sgl.gen("answer", regex=r"<think>\nadd ones\n</think>\n\n2", max_tokens=40),
            model_type="qwen3",
        )

    state = think.run(backend=rt)
    assert state["answer"] == "2"
    assert state["answer_reasoning_content"] == "add ones"
    assert state.text().endswith("<think>\nadd ones\n</think>\n\n2")
