"""Grammar layer: constraints, compile errors and cache, matcher masks, bitmask helpers, the
UTF-8 guard and jump-forward retokenisation (tiny tokenizer, model vocab 512 > 400 tokens)."""

from __future__ import annotations

import importlib
import json
import threading

import pytest
import torch
import xgrammar as xgr
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from sgl_engine.errors import InvalidRequestError
from sgl_engine.grammar import (
    Constraint,
    GrammarCompiler,
    GrammarError,
    allocate_bitmask,
    apply_bitmask,
    bitmask_to_bool,
    jump_forward,
    jump_forward_tokens,
)
from sgl_engine.grammar.constraint import ANY_JSON_OBJECT
from sgl_engine.grammar.schema_compat import compat_schema_text
from sgl_engine.grammar.utf8_guard import BOUNDARY, scan
from sgl_engine.testing import make_tiny_tokenizer

VOCAB = 512
NAME_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def compiler(tok):
    compiler = GrammarCompiler(tok, VOCAB)
    yield compiler
    compiler.shutdown()


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def allowed_ids(matcher) -> set[int]:
    bitmask = allocate_bitmask(1, VOCAB)
    matcher.fill_bitmask(bitmask, 0)
    return set(bitmask_to_bool(bitmask, VOCAB)[0].nonzero().flatten().tolist())


def matcher_for(compiler, max_rollback_tokens: int = 16, **request):
    compiled = compiler.compile(Constraint.from_request(**request))
    return compiler.matcher(compiled, max_rollback_tokens=max_rollback_tokens)


# ---- constraints ---------------------------------------------------------------------------


class Person(BaseModel):
    name: str
    age: int


def test_from_request_normalises_each_kind():
    assert Constraint.from_request() is None
    assert Constraint.from_request(regex=r"\d+") == Constraint("regex", r"\d+")
    assert Constraint.from_request(ebnf='root ::= "a"') == Constraint("ebnf", 'root ::= "a"')
    choices = Constraint.from_request(choices=["yes", "no"])
    assert choices.kind == "choices" and choices.choice_list() == ["yes", "no"]
    schema = Person.model_json_schema()
    as_dict = Constraint.from_request(json_schema=schema)
    assert as_dict == Constraint.from_request(json_schema=json.dumps(schema, indent=2))
    assert as_dict == Constraint.from_request(json_schema=Person)
    assert json.loads(as_dict.value) == schema
    assert list(json.loads(as_dict.value)["properties"]) == ["name", "age"]
    assert hash(as_dict) == hash(Constraint.from_request(json_schema=Person))


def test_response_format_openai_shapes():
    assert Constraint.from_request(response_format={"type": "text"}) is None
    assert Constraint.from_request(response_format={"type": "json_object"}) == Constraint(
        "json_schema", ANY_JSON_OBJECT
    )
    wrapped = {"type": "json_schema", "json_schema": {"name": "p", "schema": NAME_SCHEMA}}
    assert Constraint.from_request(response_format=wrapped) == Constraint.from_request(
        json_schema=NAME_SCHEMA
    )
    with pytest.raises(InvalidRequestError) as err:
        Constraint.from_request(response_format={"type": "json_schema", "json_schema": {}})
    assert err.value.field == "response_format.json_schema.schema"
    with pytest.raises(InvalidRequestError) as err:
        Constraint.from_request(response_format={"type": "yaml"})
    assert err.value.field == "response_format.type" and "yaml" in str(err.value)


def test_two_constraints_are_an_error_naming_both():
    with pytest.raises(InvalidRequestError) as err:
        Constraint.from_request(regex="a", json_schema=NAME_SCHEMA)
    assert "regex" in str(err.value) and "json_schema" in str(err.value)
    assert err.value.field == "json_schema"
    with pytest.raises(InvalidRequestError) as err:
        Constraint.from_request(choices=["a"], response_format={"type": "json_object"})
    assert "choices" in str(err.value) and "response_format" in str(err.value)
    assert Constraint.from_request(regex="a", response_format={"type": "text"}).kind == "regex"


@pytest.mark.parametrize(
    ("request_fields", "field", "error"),
    [
        ({"choices": []}, "choices", InvalidRequestError),
        ({"choices": "yes"}, "choices", InvalidRequestError),
        ({"choices": ["a", 1]}, "choices", InvalidRequestError),
        ({"regex": 5}, "regex", InvalidRequestError),
        ({"json_schema": "{not json"}, "json_schema", GrammarError),
        ({"json_schema": [1, 2]}, "json_schema", GrammarError),
    ],
)
def test_malformed_request_fields(request_fields, field, error):
    with pytest.raises(error) as err:
        Constraint.from_request(**request_fields)
    assert err.value.field == field


# ---- compiler ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("constraint", "needle"),
    [
        (Constraint("regex", "(ab"), "parenthesis is not closed"),
        (Constraint("regex", "[z-a]"), "lower bound is larger than upper bound"),
        (Constraint("regex", r"[^\s\S]"), "unsatisfiable"),
        (Constraint("json_schema", '{"type":"foo"}'), 'Unsupported type "foo"'),
        (Constraint("json_schema", '{"type":"integer","minimum":5,"maximum":3}'), "minimum"),
        (Constraint("json_schema", '{"properties":{"a":{"$ref":"#/defs/x"}}}'), "defs"),
        (Constraint("ebnf", "root ::= missing"), 'Rule "missing" is not defined'),
        (Constraint("ebnf", 'root ::= "a" |'), "EBNF parser error"),
    ],
)
def test_compile_errors_are_grammar_errors_with_a_useful_message(compiler, constraint, needle):
    future = compiler.submit(constraint)
    with pytest.raises(GrammarError) as err:
        future.result(timeout=30)
    assert isinstance(err.value, InvalidRequestError)
    assert err.value.field == constraint.kind
    message = str(err.value)
    assert needle in message
    assert "/project/cpp" not in message and "Check failed" not in message


def test_cache_hit_returns_the_same_compiled_object(tok):
    compiler = GrammarCompiler(tok, VOCAB, cache_size=2)
    try:
        first = Constraint.from_request(json_schema=NAME_SCHEMA)
        compiled = compiler.compile(first)
        assert (
            compiler.submit(Constraint.from_request(json_schema=NAME_SCHEMA)).result() is compiled
        )
        assert compiler.cache_info()["hits"] == 1
        other = compiler.compile(Constraint("regex", "a+"))
        assert other is not compiled and other.constraint == Constraint("regex", "a+")
        compiler.compile(Constraint("regex", "b+"))  # evicts the least recently used: `first`
        assert compiler.compile(first) is not compiled
        bad = Constraint("regex", "(")
        failed = compiler.submit(bad)
        with pytest.raises(GrammarError):
            failed.result()
        assert compiler.submit(bad) is not failed  # failures are not cached
    finally:
        compiler.shutdown()


def test_compile_runs_off_thread_and_does_not_block_the_caller(tok):
    release = threading.Event()
    seen: list[str] = []

    class SlowCompiler(GrammarCompiler):
        def _compile_handle(self, constraint):
            seen.append(threading.current_thread().name)
            assert release.wait(timeout=30)
            return super()._compile_handle(constraint)

    compiler = SlowCompiler(tok, VOCAB)
    try:
        future = compiler.submit(Constraint("regex", "[0-9]+"))
        same = compiler.submit(Constraint("regex", "[0-9]+"))
        assert same is future and not future.done()
        release.set()
        compiled = future.result(timeout=30)
        assert compiled.constraint.value == "[0-9]+"
        assert seen == [seen[0]] and seen[0].startswith("grammar-compile")
        assert seen[0] != threading.current_thread().name
    finally:
        compiler.shutdown()
    with pytest.raises(RuntimeError):
        compiler.submit(Constraint("regex", "x"))


# ---- matcher -------------------------------------------------------------------------------


def test_bitmask_matches_a_reference_for_choices(compiler, tok):
    options = ["yes", "yesterday", "no", "maybe"]
    matcher = matcher_for(compiler, choices=options)
    stop = tok.eos_token_id
    texts = {i: tok.decode([i]) for i in range(len(tok)) if i not in tok.all_special_ids}

    def reference(done: str) -> set[int]:
        rest = [o[len(done) :] for o in options if o.startswith(done)]
        ids = {i for i, t in texts.items() if t and any(r.startswith(t) for r in rest)}
        return ids | ({stop} if done in options else set())

    assert allowed_ids(matcher) == reference("")
    for token in encode(tok, "yes"):
        assert matcher.accept_token(token)
    assert allowed_ids(matcher) == reference("yes") and matcher.can_finish()
    for token in encode(tok, "terday"):
        assert matcher.accept_token(token)
    assert allowed_ids(matcher) == {stop}
    assert all(i < len(tok) for i in reference(""))


def test_accept_reject_terminate(compiler, tok):
    matcher = matcher_for(compiler, regex="ab")
    a, b = encode(tok, "a")[0], encode(tok, "b")[0]
    assert not matcher.can_finish()
    assert not matcher.accept_token(b)
    assert not matcher.accept_token(450)  # model-vocab padding, beyond the tokenizer
    assert not matcher.accept_token(tok.eos_token_id)
    assert matcher.accept_token(a) and matcher.accept_token(b)
    assert matcher.can_finish() and not matcher.is_terminated()
    assert matcher.accept_token(tok.eos_token_id)
    assert matcher.is_terminated() and not matcher.can_finish()
    assert not matcher.accept_token(a)
    assert allowed_ids(matcher) == {tok.eos_token_id}
    assert matcher.jump_forward_string() == ""


def test_rollback_restores_the_mask_and_respects_its_limit(compiler, tok):
    matcher = matcher_for(compiler, max_rollback_tokens=2, regex=r"\d{4}-\d{2}")
    tokens = encode(tok, "2024-0")
    assert len(tokens) >= 3
    masks = [allowed_ids(matcher)]
    for token in tokens:
        assert matcher.accept_token(token)
        masks.append(allowed_ids(matcher))
    assert matcher.rollback_limit() == 2
    with pytest.raises(ValueError):
        matcher.rollback(3)
    matcher.rollback(1)
    assert allowed_ids(matcher) == masks[-2]
    matcher.rollback(1)
    assert allowed_ids(matcher) == masks[-3]
    assert matcher.accept_token(tokens[-2]) and allowed_ids(matcher) == masks[-2]


def test_accept_string_is_one_rollback_step(compiler):
    matcher = matcher_for(compiler, json_schema=NAME_SCHEMA)
    start = allowed_ids(matcher)
    assert matcher.accept_string('{"name": "Al')
    assert not matcher.accept_string("\x01")
    assert matcher.rollback_limit() == 1
    matcher.rollback(1)
    assert allowed_ids(matcher) == start


def test_apply_bitmask_sets_disallowed_logits_to_neg_inf(compiler):
    digits = matcher_for(compiler, regex=r"[0-9]+")
    word = matcher_for(compiler, regex=r"[a-z]+")
    bitmask = allocate_bitmask(3, VOCAB)
    digits.fill_bitmask(bitmask, 0)
    word.fill_bitmask(bitmask, 2)
    allowed = bitmask_to_bool(bitmask, VOCAB)
    assert allowed[1].all() and not allowed[0, 400:].any()
    logits = torch.randn(3, VOCAB)
    reference = logits.clone()
    apply_bitmask(logits, bitmask)
    assert torch.equal(logits[allowed], reference[allowed])
    assert torch.isneginf(logits[~allowed]).all()

    only_first = reference.clone()
    apply_bitmask(only_first, bitmask, rows=[0])
    assert torch.equal(only_first[0], logits[0]) and torch.equal(only_first[2], reference[2])

    half = reference.clone().to(torch.bfloat16)
    apply_bitmask(half, bitmask)
    assert torch.isneginf(half[~allowed]).all()
    with pytest.raises(ValueError):
        apply_bitmask(torch.zeros(3, VOCAB + 64), bitmask)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_apply_bitmask_on_cuda_matches_cpu(compiler):
    bitmask = allocate_bitmask(2, VOCAB)
    matcher_for(compiler, regex=r"[0-9]+").fill_bitmask(bitmask, 0)
    matcher_for(compiler, json_schema=NAME_SCHEMA).fill_bitmask(bitmask, 1)
    cpu = torch.randn(2, VOCAB)
    cuda = cpu.cuda()
    apply_bitmask(cpu, bitmask)
    apply_bitmask(cuda, bitmask)
    assert torch.equal(cuda.cpu(), cpu)
    assert torch.equal(
        bitmask_to_bool(bitmask.cuda(), VOCAB).cpu(), bitmask_to_bool(bitmask, VOCAB)
    )


@settings(max_examples=50, deadline=None, database=None)
@given(words=st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=6))
def test_bitmask_to_bool_unpacks_little_endian_bits(words):
    bitmask = torch.tensor([words], dtype=torch.int32)
    vocab = 32 * len(words) - 5
    expected = [bool((w >> b) & 1) for w in words for b in range(32)][:vocab]
    assert bitmask_to_bool(bitmask, vocab)[0].tolist() == expected


# ---- UTF-8 guard and xgrammar workarounds --------------------------------------------------

COMPLETIONS = (b"", b"\x80", b"\x80\x80", b"\x80\x80\x80", b"\xa0\x80", b"\x90\x80\x80")


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@settings(max_examples=300, deadline=None, database=None)
@given(data=st.binary(max_size=8))
def test_utf8_scan_accepts_exactly_the_valid_prefixes(data):
    state = scan(BOUNDARY, data)
    assert (state == BOUNDARY) == _decodes(data)
    assert (state is not None) == any(_decodes(data + c) for c in COMPLETIONS)


def test_guard_masks_surrogates_that_xgrammar_allows(compiler, tok):
    vocab = xgr.TokenizerInfo.from_huggingface(tok).decoded_vocab
    byte_ids = {bytes(b)[0]: i for i, b in enumerate(vocab) if len(b) == 1}
    assert len(byte_ids) == 256
    matcher = matcher_for(compiler, regex=r".{1,4}")
    assert matcher.accept_token(byte_ids[0xED])
    allowed = allowed_ids(matcher)
    assert all(byte_ids[b] in allowed for b in range(0x80, 0xA0))
    assert not any(byte_ids[b] in allowed for b in range(0xA0, 0xC0))
    assert not matcher.accept_token(byte_ids[0xB7])
    assert matcher.accept_token(byte_ids[0x9F]) and matcher.accept_token(byte_ids[0x80])
    matcher.rollback(2)
    assert not matcher.accept_token(byte_ids[0xA0])


def test_length_bounded_strings_reject_raw_control_characters(compiler):
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 5}}}
    matcher = matcher_for(compiler, json_schema=schema)
    assert matcher.accept_string('{"s": "ab')
    assert not matcher.accept_string("\x01")
    assert not matcher.accept_string("cdefg")
    patched = json.loads(compat_schema_text(json.dumps(schema)))
    assert patched["properties"]["s"] == {"type": "string", "pattern": "^[\\s\\S]{0,5}$"}
    const = {"const": {"type": "string", "maxLength": 2}}
    assert json.loads(compat_schema_text(json.dumps(const))) == const


# ---- jump-forward --------------------------------------------------------------------------


def test_json_schema_forces_its_opening(compiler, tok):
    matcher = matcher_for(compiler, json_schema=NAME_SCHEMA)
    forced = matcher.jump_forward_string()
    assert forced == '{"name": "'
    k, new = jump_forward_tokens(tok, [], forced)
    assert k == 0 and new == encode(tok, forced) and tok.decode(new) == forced

    jump = jump_forward(matcher, tok, [])
    assert jump.num_dropped == 0 and list(jump.new_tokens) == new and jump.text == forced
    fresh = matcher_for(compiler, json_schema=NAME_SCHEMA)
    assert all(fresh.accept_token(t) for t in new)
    assert allowed_ids(fresh) == allowed_ids(matcher)
    assert matcher.jump_forward_string() == ""
    assert jump_forward(matcher, tok, new) is None


def test_retokenisation_merges_the_sampled_tail(compiler, tok):
    matcher = matcher_for(compiler, regex="(T|X)he quick")
    sampled = encode(tok, "T")
    assert matcher.accept_token(sampled[0])
    jump = jump_forward(matcher, tok, sampled)
    assert jump.text == "he quick"
    result = sampled[: len(sampled) - jump.num_dropped] + list(jump.new_tokens)
    assert jump.num_dropped == 1 and result == encode(tok, "The quick")
    assert tok.decode(result) == "The quick"
    assert matcher.can_finish()
    fresh = matcher_for(compiler, regex="(T|X)he quick")
    assert all(fresh.accept_token(t) for t in result) and fresh.can_finish()


def test_rollback_limit_bounds_the_retokenised_window(compiler, tok):
    matcher = matcher_for(compiler, max_rollback_tokens=0, regex="(T|X)he quick")
    sampled = encode(tok, "T")
    assert matcher.accept_token(sampled[0])
    jump = jump_forward(matcher, tok, sampled)
    assert jump.num_dropped == 0
    assert tok.decode(sampled + list(jump.new_tokens)) == "The quick"


def test_forced_text_ending_inside_a_character_is_cut_at_the_boundary(compiler):
    matcher = matcher_for(compiler, json_schema={"enum": ["é1", "è2"]})
    assert matcher.jump_forward_string() == '"'


def test_forced_text_never_becomes_a_special_token(compiler, tok):
    # The tokenizer encodes "<|im_end|>" text as the special token (which ends the turn): a
    # grammar literal spelling it is not forced, on every xgrammar release; the model samples
    # it as characters under the mask instead.
    special = set(tok.all_special_ids)
    only_special = matcher_for(compiler, ebnf='root ::= "<|im_end|>x"')
    before = allowed_ids(only_special)
    assert jump_forward(only_special, tok, []) is None
    assert allowed_ids(only_special) == before and only_special.rollback_limit() == 0
    assert not special & before

    matcher = matcher_for(compiler, ebnf='root ::= "x" "ab<|im_end|>"')
    x = encode(tok, "x")
    assert matcher.accept_token(x[0])
    jump = jump_forward(matcher, tok, x)
    assert jump.num_dropped == 0 and jump.text == "ab" and not special & set(jump.new_tokens)
    assert tok.decode(x + list(jump.new_tokens)) == "xab"
    fresh = matcher_for(compiler, ebnf='root ::= "x" "ab<|im_end|>"')
    assert all(fresh.accept_token(t) for t in x + list(jump.new_tokens))
    assert allowed_ids(fresh) == allowed_ids(matcher)
    assert not special & allowed_ids(matcher)


def test_retokenised_tail_never_holds_a_special_token(tok):
    # "<|im_" already generated, "end|>" forced: re-encoding the tail would make the special token.
    ids = encode(tok, "a<|im_")
    k, new = jump_forward_tokens(tok, ids, "end|>")
    assert new and not set(tok.all_special_ids) & set(new)
    assert tok.decode(ids[: len(ids) - k] + new) == "a<|im_end|>"


@settings(max_examples=200, deadline=None, database=None)
@given(
    prefix=st.text(max_size=12),
    forced=st.text(min_size=1, max_size=12),
    window=st.integers(0, 4),
)
def test_jump_forward_tokens_decode_exactly(tok, prefix, forced, window):
    ids = encode(tok, prefix)
    k, new = jump_forward_tokens(tok, ids, forced, max_retokenize=window)
    assert new and 0 <= k <= min(window, len(ids))
    assert tok.decode(ids[: len(ids) - k] + new) == tok.decode(ids) + forced
    assert k == 0 or new[0] != ids[len(ids) - k]  # shared tokens are kept, not re-sent


@settings(max_examples=200, deadline=None, database=None)
@given(ids=st.lists(st.integers(3, 399), max_size=8), forced=st.text(min_size=1, max_size=6))
def test_jump_forward_tokens_on_arbitrary_ids_is_exact_or_skips(tok, ids, forced):
    k, new = jump_forward_tokens(tok, ids, forced)
    if new:
        assert tok.decode(ids[: len(ids) - k] + new) == tok.decode(ids) + forced
    else:
        assert k == 0


@settings(max_examples=200, deadline=None, database=None)
@given(text=st.text(max_size=16), ids=st.lists(st.integers(0, 399), max_size=10))
def test_jump_codec_equals_the_tokenizers_own_encode_and_decode(tok, text, ids):
    """Jump-forward calls a fast tokenizer's backend directly; it must agree with the wrapper
    (special tokens kept, no clean-up) on any text and any ids, special ones included."""
    jf = importlib.import_module("sgl_engine.grammar.jump_forward")

    assert jf._backend(tok) is not None
    assert jf._encode(tok, text) == tok.encode(text, add_special_tokens=False)
    want = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert jf._decode(tok, ids) == want


def test_jump_codec_falls_back_to_a_slow_tokenizer():
    jf = importlib.import_module("sgl_engine.grammar.jump_forward")

    class Slow:
        is_fast = False

        def encode(self, text, add_special_tokens=True):
            return [ord(c) for c in text]

        def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=None):
            return "".join(map(chr, ids))

    assert jf._encode(Slow(), "ab") == [97, 98]
    assert jf._decode(Slow(), [97, 98]) == "ab"
