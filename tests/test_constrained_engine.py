"""Constrained decoding through the engine, jump-forward on and off, on a tiny random model.

Properties: every output sampled at temperature 1.0 fully matches its regex / validates against
its schema. Greedy reference: every *sampled* token (logprob not None) is the masked argmax of
transformers' logits given the engine's own token history, so jump-forward changes only which
tokens spell the forced text (the retokenisation rule of `sgl_engine.grammar.jump_forward`);
where the grammar leaves no choice the text is identical with and without it. Errors stay per
request and never hang.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sgl_engine.errors import InvalidRequestError

OCTET = r"(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
REGEXES = {
    "ipv4": rf"({OCTET}\.){{3}}{OCTET}",
    "email": r"[a-z0-9._%+-]{1,12}@[a-z0-9-]{1,10}(\.[a-z0-9-]{1,8}){0,2}\.[a-z]{2,4}",
    "iso_date": r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])",
    "int": r"-?(0|[1-9]\d{0,6})",
    "float": r"-?(0|[1-9]\d{0,4})\.\d{1,4}",
    "enum": r"(red|green|blue|yellow)",
    "alternation": r"(yes|no|maybe)( \d{1,3})?|N/A",
}
SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 10},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"},
        },
        "required": ["name", "age", "email"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 0, "maximum": 9999},
                    "tags": {
                        "type": "array",
                        "items": {"enum": ["a", "b", "c"]},
                        "minItems": 1,
                        "maxItems": 3,
                    },
                },
                "required": ["id", "tags"],
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
    },
    "bounded_array": {
        "type": "array",
        "items": {"type": "integer", "minimum": -10, "maximum": 10},
        "minItems": 2,
        "maxItems": 4,
    },
    "enums": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", 1, None]},
            "kind": {"const": "fixed"},
            "size": {"type": "string", "enum": ["S", "M", "L"]},
        },
        "required": ["color", "kind", "size"],
    },
    "optional": {
        "type": "object",
        "properties": {
            "a": {"type": "string", "maxLength": 6},
            "b": {"type": "integer", "exclusiveMinimum": -5, "maximum": 99},
            "c": {"type": "boolean"},
        },
    },
    "patterns": {
        "type": "object",
        "properties": {
            "date": {"type": "string", "pattern": "^\\d{4}-\\d{2}-\\d{2}$"},
            "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2,4}$"},
        },
        "required": ["date", "code"],
    },
}
PROMPT = "Answer in the requested format:"
SAMPLE = {"temperature": 1.0, "max_new_tokens": 256}
PROPERTY = settings(
    max_examples=5,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
JF = pytest.mark.parametrize("jump", [False, True], ids=["sampled", "jump_forward"])


@pytest.fixture(scope="module")
def engines(tiny_llama):
    """One engine per jump-forward setting, shared by the module; leak-checked at the end."""
    from sgl_engine import Engine

    engs = {
        jf: Engine(tiny_llama, device="cpu", max_total_tokens=8192, enable_jump_forward=jf)
        for jf in (False, True)
    }
    yield engs
    try:
        for eng in engs.values():
            eng.check_invariants()
    finally:
        for eng in engs.values():
            eng.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def _batch(eng, constraints: list[dict], seed: int) -> list[dict]:
    sps = [{**SAMPLE, **c, "seed": seed + i} for i, c in enumerate(constraints)]
    return eng.generate([PROMPT] * len(sps), sps)


@JF
@PROPERTY
@given(seed=st.integers(0, 2**30))
def test_sampled_regex_outputs_fully_match(engines, jump, seed):
    names = sorted(REGEXES)
    outs = _batch(engines[jump], [{"regex": REGEXES[n]} for n in names], seed)
    for name, out in zip(names, outs, strict=True):
        assert out["meta_info"]["finish_reason"]["type"] == "stop", (name, out)
        assert re.fullmatch(REGEXES[name], out["text"]), (name, out["text"])


@JF
@PROPERTY
@given(seed=st.integers(0, 2**30))
def test_sampled_json_outputs_validate(engines, jump, seed):
    names = sorted(SCHEMAS)
    before = engines[jump].metrics()["forced_tokens"]
    outs = _batch(engines[jump], [{"json_schema": SCHEMAS[n]} for n in names], seed)
    for name, out in zip(names, outs, strict=True):
        assert out["meta_info"]["finish_reason"]["type"] == "stop", (name, out)
        jsonschema.validate(json.loads(out["text"]), SCHEMAS[name])
    forced = engines[jump].metrics()["forced_tokens"] - before
    assert (forced > 0) == jump
    assert sum(out["meta_info"]["forced_tokens"] for out in outs) == forced


def _check_against_reference(eng, model, prompt_ids, out, constraint, greedy: bool) -> None:
    """Replays the output through a fresh matcher. Every sampled token (logprob not None) is
    allowed by the grammar and its reported logprob equals the reference's given the output so
    far (stale KV after a retokenised tail would break this); under greedy it is also the
    masked argmax. Forced tokens are accepted by the grammar; the grammar ends terminated."""
    from sgl_engine.grammar import Constraint, allocate_bitmask, bitmask_to_bool

    compiler = eng.grammar
    matcher = compiler.matcher(compiler.compile(Constraint.from_request(**constraint)))
    ids = out["output_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + ids])).logits[0, len(prompt_ids) - 1 :]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    bitmask = allocate_bitmask(1, compiler.vocab_size)
    for i, (lp, token, _) in enumerate(out["meta_info"]["output_token_logprobs"]):
        assert token == ids[i]
        if lp is not None:
            matcher.fill_bitmask(bitmask, 0)
            allowed = bitmask_to_bool(bitmask, compiler.vocab_size)[0]
            assert allowed[token], (i, token)
            assert abs(lp - float(logprobs[i, token])) < 1e-3, (i, lp, float(logprobs[i, token]))
            if greedy:
                row = logits[i, : compiler.vocab_size].masked_fill(~allowed, float("-inf"))
                assert row[token] >= row.max() - 1e-4, (i, token, int(row.argmax()))
        assert matcher.accept_token(token), (i, token)
    assert matcher.is_terminated()


GREEDY_CONSTRAINTS = [{"regex": REGEXES["email"]}, {"regex": REGEXES["ipv4"]}] + [
    {"json_schema": SCHEMAS[n]} for n in ("person", "nested", "enums")
]
SHARED_PREFIX_CHOICES = {
    "choices": ["The quick brown fox", "The quick brown dog", "The lazy dog", "A radix tree"]
}


@JF
def test_greedy_tokens_are_masked_argmax_of_reference(engines, reference, jump):
    eng = engines[jump]
    sps = [{"temperature": 0, "max_new_tokens": 200, **c} for c in GREEDY_CONSTRAINTS]
    outs = eng.generate([PROMPT] * len(sps), sps, return_logprob=True)
    prompt_ids = eng.tokenizer.encode(PROMPT)
    forced = 0
    for c, out in zip(GREEDY_CONSTRAINTS, outs, strict=True):
        assert out["meta_info"]["finish_reason"]["type"] == "stop"
        _check_against_reference(eng, reference, prompt_ids, out, c, greedy=True)
        forced += sum(lp is None for lp, _, _ in out["meta_info"]["output_token_logprobs"])
    assert (forced > 0) == jump


@JF
@PROPERTY
@given(seed=st.integers(0, 2**30))
def test_sampled_logprobs_match_reference_after_retokenisation(engines, reference, jump, seed):
    """Samples at temperature 1.0 where retokenisation drops tokens (shared-prefix choices,
    schemas): the KV the next step reads must be that of the retokenised tail."""
    eng = engines[jump]
    constraints = [SHARED_PREFIX_CHOICES] * 4 + [{"json_schema": SCHEMAS["person"]}] * 2
    before = eng.metrics()
    sps = [{**SAMPLE, **c, "seed": seed + i} for i, c in enumerate(constraints)]
    outs = eng.generate([PROMPT] * len(sps), sps, return_logprob=True)
    after = eng.metrics()
    prompt_ids = eng.tokenizer.encode(PROMPT)
    for c, out in zip(constraints, outs, strict=True):
        _check_against_reference(eng, reference, prompt_ids, out, c, greedy=False)
    forced = after["forced_tokens"] - before["forced_tokens"]
    saved = after["forward_passes_saved"] - before["forward_passes_saved"]
    assert (forced > 0) == jump and saved <= forced


def test_retokenisation_drops_happen_and_free_their_kv(engines, reference):
    """Over a few seeds some jump drops sampled tokens (forced > passes saved); the module's
    engines are leak-checked at teardown and the logprobs match the reference."""
    eng = engines[True]
    before = eng.metrics()
    for seed in range(4):
        sps = [{**SAMPLE, **SHARED_PREFIX_CHOICES, "seed": 100 * seed + i} for i in range(6)]
        for out in eng.generate([PROMPT] * 6, sps, return_logprob=True):
            prompt_ids = eng.tokenizer.encode(PROMPT)
            _check_against_reference(
                eng, reference, prompt_ids, out, SHARED_PREFIX_CHOICES, greedy=False
            )
    after = eng.metrics()
    forced = after["forced_tokens"] - before["forced_tokens"]
    saved = after["forward_passes_saved"] - before["forward_passes_saved"]
    assert forced > saved > 0


FULLY_FORCED = [
    {"choices": ["The quick brown fox jumps over the lazy dog"]},
    {"regex": r"ID-0042: \{ok\}"},
    {"json_schema": {"type": "object", "properties": {"kind": {"const": "fixed"}}}},
    {"json_schema": {"enum": ["only one value here"]}},
]


def test_greedy_text_equal_with_and_without_jump_forward(engines):
    """Where the grammar leaves no choice, the text is the same; jump-forward spells it with
    the tokenizer's own tokens (up to 4 trailing tokens retokenised) in fewer forward passes."""
    sps = [{"temperature": 0, "max_new_tokens": 64, **c} for c in FULLY_FORCED]
    passes = {}
    outs = {}
    for jf, eng in engines.items():
        before = eng.metrics()["forward_passes"]
        outs[jf] = eng.generate([PROMPT] * len(sps), sps)
        passes[jf] = eng.metrics()["forward_passes"] - before
    tok = engines[True].tokenizer
    for off, on in zip(outs[False], outs[True], strict=True):
        assert on["text"] == off["text"]
        assert tok.decode(on["output_ids"][:-1]) == tok.decode(off["output_ids"][:-1])
        assert on["output_ids"][:-1] == tok.encode(on["text"], add_special_tokens=False)
        assert on["meta_info"]["finish_reason"] == off["meta_info"]["finish_reason"]
    assert passes[True] < passes[False]
    metrics = engines[True].metrics()
    assert metrics["forced_tokens"] > 0 and metrics["forward_passes_saved"] > 0


@JF
def test_per_request_errors_leave_the_batch_unaffected(engines, jump):
    eng = engines[jump]
    plain = {"temperature": 0, "max_new_tokens": 8}
    alone = eng.generate(PROMPT, plain)
    sps = [
        {"regex": "("},
        {"json_schema": {"type": "nonsense"}},
        {"json_schema": {"type": "array", "minItems": 3, "maxItems": 1}},
        {"regex": "[^\\x00-\\U0010FFFF]"},
        {"ebnf": "root ::= undefined_rule"},
        {"regex": "a{50}", "max_new_tokens": 5},
        {"regex": REGEXES["ipv4"], "temperature": 0, "max_new_tokens": 64},
        plain,
    ]
    outs = eng.generate([PROMPT] * len(sps), sps)
    reasons = [o["meta_info"]["finish_reason"] for o in outs]
    for r in reasons[:5]:
        assert r["type"] == "abort" and r["message"].startswith("invalid constraint: ")
    assert "regex" in reasons[0]["message"] and "json_schema" in reasons[1]["message"]
    assert "unsatisfiable" in reasons[3]["message"]
    assert reasons[5]["type"] == "length" and len(outs[5]["output_ids"]) == 5
    assert outs[5]["text"] == "a" * len(outs[5]["text"]) and outs[5]["text"]
    assert reasons[6]["type"] == "stop" and re.fullmatch(REGEXES["ipv4"], outs[6]["text"])
    assert outs[7]["output_ids"] == alone["output_ids"]


def test_two_constraints_or_bad_types_raise_before_submitting(engines):
    eng = engines[True]
    with pytest.raises(InvalidRequestError):
        eng.generate([PROMPT, PROMPT], [{"regex": "a"}, {"regex": "a", "choices": ["a"]}])
    with pytest.raises(InvalidRequestError):
        eng.generate(PROMPT, {"choices": []})


@JF
def test_empty_regex_is_a_constraint_not_ignored(engines, jump):
    out = engines[jump].generate(PROMPT, {"regex": "", "max_new_tokens": 8})
    assert out["text"] == "" and out["meta_info"]["finish_reason"]["type"] == "stop"


@JF
def test_grammar_wins_over_min_new_tokens(engines, jump):
    out = engines[jump].generate(
        PROMPT, {"choices": ["yes"], "min_new_tokens": 10, "max_new_tokens": 20}
    )
    eos = engines[jump].tokenizer.eos_token_id
    assert out["text"] == "yes"
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": eos}


@JF
def test_stop_strings_and_max_new_tokens_apply_to_forced_text(engines, jump):
    eng = engines[jump]
    stop = eng.generate(
        PROMPT, {"regex": r"hello world, (yes|no)", "stop": "world", "max_new_tokens": 32}
    )
    assert stop["text"] == "hello " and stop["meta_info"]["finish_reason"]["matched"] == "world"
    for n in (1, 3, 6):
        out = eng.generate(PROMPT, {"regex": "The quick brown fox jumps", "max_new_tokens": n})
        assert len(out["output_ids"]) == n
        assert out["meta_info"]["finish_reason"]["type"] == "length"
        assert "The quick brown fox jumps".startswith(out["text"])


def test_forced_tokens_report_no_logprob_and_stream_consistently(engines):
    eng = engines[True]
    sp = {"json_schema": SCHEMAS["person"], "temperature": 1.0, "seed": 7, "max_new_tokens": 128}
    out = eng.generate(PROMPT, sp, return_logprob=True, top_logprobs_num=2)
    meta = out["meta_info"]
    lps = [lp for lp, _, _ in meta["output_token_logprobs"]]
    assert len(lps) == len(out["output_ids"]) == len(meta["output_top_logprobs"])
    assert lps[0] is None and any(lp is not None for lp in lps)
    for lp, top in zip(lps, meta["output_top_logprobs"], strict=True):
        assert (lp is None) == (top is None)
    chunks = list(eng.generate(PROMPT, sp, stream=True))
    assert "".join(c["delta"] for c in chunks) == chunks[-1]["text"] == out["text"]
    assert chunks[-1]["output_ids"] == out["output_ids"]


@PROPERTY
@given(seed=st.integers(0, 2**30))
def test_choices_with_shared_prefixes_retokenise_correctly(engines, seed):
    choices = SHARED_PREFIX_CHOICES["choices"]
    outs = _batch(engines[True], [SHARED_PREFIX_CHOICES] * 4, seed)
    tok = engines[True].tokenizer
    for out in outs:
        assert out["text"] in choices
        assert tok.decode(out["output_ids"], skip_special_tokens=True) == out["text"]


def test_jump_forward_leaves_the_shared_tokenizer_state_alone(engines):
    """Callers tokenise their prompts on their own threads while the scheduler thread
    retokenises forced text with the same tokenizer. A per-call option such as
    `split_special_tokens=True` is stored on the shared Rust tokenizer, so a caller encoding
    at that moment had its special tokens spelled out: its prompt diverged at token 0 and
    reused no cached prefix (the cold duplicate `test_dspy.py`'s concurrent batch once saw).
    After forcing text, the flag must still be the tokenizer's default."""
    eng = engines[True]
    sp = {"json_schema": SCHEMAS["person"], "temperature": 0.0, "max_new_tokens": 64}
    out = eng.generate(PROMPT, sp)
    assert out["meta_info"]["forced_tokens"] > 0
    assert eng.tokenizer._tokenizer.encode_special_tokens is False
