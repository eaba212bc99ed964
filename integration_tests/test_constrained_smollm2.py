"""Constrained decoding on the embedded SmolLM2-135M-Instruct, jump-forward on and off.

The same properties as tests/test_constrained_engine.py on a real model: sampled outputs fully
match / validate; sampled tokens' logprobs (and greedy argmax) agree with transformers under
the grammar mask given the engine's own tokens; fully forced text is identical with and without
jump-forward, in fewer forward passes; bad constraints fail per request.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

OCTET = r"(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
REGEXES = {
    "ipv4": rf"({OCTET}\.){{3}}{OCTET}",
    "email": r"[a-z0-9._%+-]{1,12}@[a-z0-9-]{1,10}\.(com|org|net)",
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
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"},
        },
        "required": ["name", "age", "email"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "city": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 20},
                    "tags": {
                        "type": "array",
                        "items": {"enum": ["big", "old", "coastal"]},
                        "minItems": 1,
                        "maxItems": 3,
                    },
                },
                "required": ["name", "tags"],
            },
            "capital": {"type": "boolean"},
            "population_millions": {"type": "integer", "minimum": 0, "maximum": 50},
        },
        "required": ["city", "capital"],
    },
    "enums": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "kind": {"const": "fixed"},
            "note": {"type": ["string", "null"], "maxLength": 12},
        },
        "required": ["color", "kind", "note"],
    },
}
SAMPLE = {"temperature": 1.0, "max_new_tokens": 160}


@pytest.fixture(scope="module")
def engines(smollm2_path):
    from sgl_engine import Engine

    engs = {
        jf: Engine(smollm2_path, device="cpu", max_total_tokens=16384, enable_jump_forward=jf)
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
def reference(smollm2_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()


def _prompt(eng, what: str) -> str:
    return eng.apply_chat_template([{"role": "user", "content": f"Reply with {what}."}])


def _check_against_reference(eng, model, prompt, out, constraint, greedy: bool) -> None:
    from sgl_engine.grammar import Constraint, allocate_bitmask, bitmask_to_bool

    compiler = eng.grammar
    matcher = compiler.matcher(compiler.compile(Constraint.from_request(**constraint)))
    prompt_ids, ids = eng.tokenizer.encode(prompt), out["output_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + ids])).logits[0, len(prompt_ids) - 1 :]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    bitmask = allocate_bitmask(1, compiler.vocab_size)
    for i, (lp, token, _) in enumerate(out["meta_info"]["output_token_logprobs"]):
        if lp is not None:
            matcher.fill_bitmask(bitmask, 0)
            allowed = bitmask_to_bool(bitmask, compiler.vocab_size)[0]
            assert allowed[token], (i, token)
            assert abs(lp - float(logprobs[i, token])) < 2e-2, (i, lp, float(logprobs[i, token]))
            if greedy:
                row = logits[i, : compiler.vocab_size].masked_fill(~allowed, float("-inf"))
                assert row[token] >= row.max() - 1e-2, (i, token, int(row.argmax()))
        assert matcher.accept_token(token), (i, token)
    assert matcher.is_terminated()


@pytest.mark.parametrize("jump", [False, True], ids=["sampled", "jump_forward"])
def test_sampled_outputs_match_and_agree_with_reference(engines, reference, jump):
    eng = engines[jump]
    cases = [(f"a {n.replace('_', ' ')}", {"regex": r}) for n, r in REGEXES.items()]
    cases += [(f"JSON describing a {n}", {"json_schema": s}) for n, s in SCHEMAS.items()]
    cases = cases * 2
    prompts = [_prompt(eng, what) for what, _ in cases]
    sps = [{**SAMPLE, **c, "seed": 11 + i} for i, (_, c) in enumerate(cases)]
    before = eng.metrics()
    outs = eng.generate(prompts, sps, return_logprob=True)
    after = eng.metrics()
    for (what, c), prompt, out in zip(cases, prompts, outs, strict=True):
        assert out["meta_info"]["finish_reason"]["type"] == "stop", (what, out)
        if "regex" in c:
            assert re.fullmatch(c["regex"], out["text"]), (what, out["text"])
        else:
            jsonschema.validate(json.loads(out["text"]), c["json_schema"])
        _check_against_reference(eng, reference, prompt, out, c, greedy=False)
    assert (after["forced_tokens"] > before["forced_tokens"]) == jump


def test_greedy_agrees_with_reference_and_forced_text_is_identical(engines, reference):
    eng_on, eng_off = engines[True], engines[False]
    schema = SCHEMAS["person"]
    prompt = _prompt(eng_on, "JSON describing a person")
    greedy = {"temperature": 0, "max_new_tokens": 96, "json_schema": schema}
    for eng in (eng_on, eng_off):
        out = eng.generate(prompt, greedy, return_logprob=True)
        jsonschema.validate(json.loads(out["text"]), schema)
        _check_against_reference(eng, reference, prompt, out, {"json_schema": schema}, True)
    forced = {"regex": r"The answer is: \{\"status\": \"ok\"\}", "temperature": 0}
    passes = {}
    texts = {}
    for jf, eng in engines.items():
        before = eng.metrics()["forward_passes"]
        texts[jf] = eng.generate(prompt, {**forced, "max_new_tokens": 48})["text"]
        passes[jf] = eng.metrics()["forward_passes"] - before
    assert texts[True] == texts[False] == 'The answer is: {"status": "ok"}'
    assert passes[True] < passes[False]


def test_bad_constraints_fail_per_request(engines):
    eng = engines[True]
    prompt = _prompt(eng, "a number")
    sps = [
        {"regex": "(", "max_new_tokens": 8},
        {"json_schema": {"type": "nonsense"}},
        {"regex": "a{80}", "max_new_tokens": 6},
        {"regex": REGEXES["int"], "max_new_tokens": 16, "temperature": 0},
    ]
    outs = eng.generate([prompt] * len(sps), sps)
    reasons = [o["meta_info"]["finish_reason"] for o in outs]
    assert reasons[0]["type"] == reasons[1]["type"] == "abort"
    assert "invalid regex" in reasons[0]["message"]
    assert "invalid json_schema" in reasons[1]["message"]
    assert reasons[2]["type"] == "length" and len(outs[2]["output_ids"]) == 6
    assert re.fullmatch(REGEXES["int"], outs[3]["text"])
