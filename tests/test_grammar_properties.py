"""Property tests: random walks under the grammar mask always produce matching output.

Logits are random (torch.randn, seeded by hypothesis) at temperature 1.0; after a few steps a
bonus goes to the stop token and to punctuation (most to tokens that close strings, arrays and
objects) so walks end quickly. Jump-forward on and off; the output must fully match the regex /
validate against the schema, and the matcher must have accepted exactly the output tokens.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sgl_engine.grammar import (
    Constraint,
    GrammarCompiler,
    allocate_bitmask,
    apply_bitmask,
    jump_forward,
)
from sgl_engine.testing import make_tiny_tokenizer

VOCAB = 512
WARMUP_STEPS = 8
MAX_STEPS = 400
SEEDS = st.integers(min_value=0, max_value=2**31 - 1)
PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, database=None)

OCTET = r"(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
REGEXES = {
    "ipv4": rf"({OCTET}\.){{3}}{OCTET}",
    "email": r"[a-z0-9._%+-]{1,20}@[a-z0-9-]{1,15}(\.[a-z0-9-]{1,15}){0,2}\.[a-z]{2,6}",
    "iso_date": r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])",
    "int": r"-?(0|[1-9]\d*)",
    "float": r"-?(0|[1-9]\d*)\.\d+([eE][+-]?\d{1,3})?",
    "enum": r"(red|green|blue|yellow)",
    "alternation": r"(yes|no|maybe)( \d{1,3})?|N/A",
    "phone": r"\(\d{3}\) \d{3}-\d{4}",
    "unicode": r"(café|naïve|你好) [a-z]{1,4}!",
}

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"},
        },
        "required": ["name", "age"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "tags": {
                        "type": "array",
                        "items": {"type": "string", "enum": ["a", "b", "c"]},
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
    "bounded_numbers": {
        "type": "array",
        "items": {"type": "number", "minimum": -10, "maximum": 10},
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
    "all_optional": {
        "type": "object",
        "properties": {
            "a": {"type": "string"},
            "b": {"type": "integer", "exclusiveMinimum": -5, "maximum": 99},
            "c": {"type": "boolean"},
        },
    },
    "string_patterns": {
        "type": "object",
        "properties": {
            "date": {"type": "string", "pattern": "^\\d{4}-\\d{2}-\\d{2}$"},
            "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2,4}$"},
        },
        "required": ["date", "code"],
    },
    "nullable_list": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                "maxItems": 5,
            },
            "note": {"type": ["string", "null"]},
        },
        "required": ["items"],
    },
}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def compiler(tokenizer):
    compiler = GrammarCompiler(tokenizer, VOCAB)
    yield compiler
    compiler.shutdown()


@pytest.fixture(scope="module")
def closer_bonus(tokenizer) -> torch.Tensor:
    """+30 on the stop token, +10 on tokens of closing characters only, +4 on other
    punctuation-only tokens except openers."""
    bonus = torch.zeros(VOCAB)
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if text and set(text) <= set('"}])'):
            bonus[token_id] = 10.0
        elif text and all(_is_punct(c) for c in text) and not set(text) & set("{[("):
            bonus[token_id] = 4.0
    bonus[tokenizer.eos_token_id] = 30.0
    return bonus


def _is_punct(char: str) -> bool:
    return char.isascii() and not char.isalnum() and not char.isspace()


def random_walk(compiler, tokenizer, constraint, seed, bonus, use_jump_forward):
    """Sample under the mask until the matcher terminates; returns (output ids, forced count)."""
    matcher = compiler.matcher(compiler.compile(constraint))
    generator = torch.Generator().manual_seed(seed)
    bitmask = allocate_bitmask(1, VOCAB)
    output: list[int] = []
    forced = 0
    for step in range(MAX_STEPS):
        if use_jump_forward:
            jump = jump_forward(matcher, tokenizer, output)
            if jump is not None:
                output = output[: len(output) - jump.num_dropped] + list(jump.new_tokens)
                forced += len(jump.new_tokens)
        matcher.fill_bitmask(bitmask, 0)
        logits = torch.randn(1, VOCAB, generator=generator)
        if step >= WARMUP_STEPS:
            logits += bonus
        apply_bitmask(logits, bitmask)
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        assert matcher.accept_token(token), f"masked sampling drew a rejected token {token}"
        if matcher.is_terminated():
            assert token in compiler.stop_token_ids
            assert_replays(compiler, matcher.compiled, output + [token])
            return output, forced
        output.append(token)
    raise AssertionError(f"walk did not terminate in {MAX_STEPS} steps: {output}")


def assert_replays(compiler, compiled, ids):
    """A fresh matcher accepts exactly these ids and terminates: jump-forward kept it in sync."""
    fresh = compiler.matcher(compiled)
    assert all(fresh.accept_token(t) for t in ids)
    assert fresh.is_terminated()


@pytest.mark.parametrize("use_jump_forward", [False, True], ids=["sampled", "jump_forward"])
@pytest.mark.parametrize("name", sorted(REGEXES))
@PROPERTY_SETTINGS
@given(seed=SEEDS)
def test_regex_walk_fully_matches(compiler, tokenizer, closer_bonus, name, use_jump_forward, seed):
    pattern = REGEXES[name]
    output, _ = random_walk(
        compiler, tokenizer, Constraint("regex", pattern), seed, closer_bonus, use_jump_forward
    )
    text = tokenizer.decode(output)
    assert re.fullmatch(pattern, text), (name, text)


@pytest.mark.parametrize("use_jump_forward", [False, True], ids=["sampled", "jump_forward"])
@pytest.mark.parametrize("name", sorted(SCHEMAS))
@PROPERTY_SETTINGS
@given(seed=SEEDS)
def test_json_schema_walk_validates(
    compiler, tokenizer, closer_bonus, name, use_jump_forward, seed
):
    schema = SCHEMAS[name]
    constraint = Constraint.from_request(json_schema=schema)
    output, _ = random_walk(compiler, tokenizer, constraint, seed, closer_bonus, use_jump_forward)
    text = tokenizer.decode(output)
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("use_jump_forward", [False, True], ids=["sampled", "jump_forward"])
@settings(max_examples=15, deadline=None, database=None)
@given(seed=SEEDS)
def test_json_object_and_choices_walks(compiler, tokenizer, closer_bonus, use_jump_forward, seed):
    any_object = Constraint.from_request(response_format={"type": "json_object"})
    output, _ = random_walk(compiler, tokenizer, any_object, seed, closer_bonus, use_jump_forward)
    assert isinstance(json.loads(tokenizer.decode(output)), dict)

    options = ["yes", "yesterday", "no", "n/a", "你好"]
    choices = Constraint.from_request(choices=options)
    output, _ = random_walk(compiler, tokenizer, choices, seed, closer_bonus, use_jump_forward)
    assert tokenizer.decode(output) in options


@settings(max_examples=10, deadline=None, database=None)
@given(seed=SEEDS)
def test_jump_forward_forces_schema_keys(compiler, tokenizer, closer_bonus, seed):
    """With required keys, jump-forward appends tokens; the outputs still validate."""
    schema = SCHEMAS["enums"]
    constraint = Constraint.from_request(json_schema=schema)
    output, forced = random_walk(compiler, tokenizer, constraint, seed, closer_bonus, True)
    assert forced >= len(tokenizer.encode('{"color": '))
    jsonschema.validate(json.loads(tokenizer.decode(output)), schema)
