from __future__ import annotations

import json
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sgl_engine.errors import InvalidRequestError
from sgl_engine.sampling_params import SamplingParams

SGLANG_DEFAULTS = {
    "max_new_tokens": 128,
    "min_new_tokens": 0,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": -1,
    "min_p": 0.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "stop": (),
    "stop_token_ids": (),
    "ignore_eos": False,
    "no_stop_trim": False,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "seed": None,
    "n": 1,
    "regex": None,
    "json_schema": None,
    "ebnf": None,
    "choices": None,
}


@pytest.mark.parametrize("source", [None, {}, {"temperature": None, "seed": None}])
def test_defaults(source):
    params = SamplingParams.from_dict(source)
    assert {k: getattr(params, k) for k in SGLANG_DEFAULTS} == SGLANG_DEFAULTS
    assert params == SamplingParams()


def test_error_is_a_value_error_with_field_and_pickles():
    err = InvalidRequestError("bad top_p", "sampling_params.top_p")
    assert isinstance(err, ValueError)
    assert str(err) == "bad top_p"
    again = pickle.loads(pickle.dumps(err))
    assert (type(again), str(again), again.field) == (InvalidRequestError, "bad top_p", err.field)
    assert InvalidRequestError("whole request").field is None


def test_unknown_key_is_named():
    with pytest.raises(InvalidRequestError, match="unknown sampling parameter 'foo'") as info:
        SamplingParams.from_dict({"temperature": 0.5, "foo": 1})
    assert info.value.field == "sampling_params.foo"


def test_not_a_mapping():
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams.from_dict([("temperature", 1.0)])
    assert info.value.field == "sampling_params"


def test_stop_forms():
    assert SamplingParams.from_dict({"stop": "\n"}).stop == ("\n",)
    assert SamplingParams.from_dict({"stop": ["a", "bc"]}).stop == ("a", "bc")
    assert SamplingParams(stop=["x"]).stop == ("x",)
    assert SamplingParams.from_dict({"stop_token_ids": [5, 7]}).stop_token_ids == (5, 7)


def test_json_schema_dict_becomes_canonical_json_keeping_key_order():
    schema = {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "integer"}}}
    params = SamplingParams.from_dict({"json_schema": schema})
    assert isinstance(params.json_schema, str)
    assert json.loads(params.json_schema) == schema
    assert list(json.loads(params.json_schema)["properties"]) == ["b", "a"]
    same = SamplingParams.from_dict({"json_schema": json.loads(params.json_schema)})
    assert same.json_schema == params.json_schema
    text = '{"type": "string"}'
    assert SamplingParams.from_dict({"json_schema": text}).json_schema == text


def test_params_are_hashable_and_frozen():
    params = SamplingParams.from_dict({"stop": ["x"], "choices": ["a", "b"]})
    assert hash(params) == hash(SamplingParams(stop=("x",), choices=("a", "b")))
    with pytest.raises(AttributeError):
        params.temperature = 0.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "key, value",
    [
        ("max_new_tokens", -1),
        ("max_new_tokens", 1.5),
        ("max_new_tokens", "10"),
        ("min_new_tokens", -1),
        ("temperature", -0.1),
        ("temperature", "hot"),
        ("temperature", float("nan")),
        ("temperature", True),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", -0.5),
        ("top_k", 0),
        ("top_k", -2),
        ("top_k", 2.0),
        ("min_p", -0.01),
        ("min_p", 1.01),
        ("frequency_penalty", 2.01),
        ("frequency_penalty", -2.01),
        ("presence_penalty", 2.5),
        ("presence_penalty", -3),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", 2.01),
        ("n", 0),
        ("n", True),
        ("stop", 3),
        ("stop", ["ok", 3]),
        ("stop", [""]),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", ["2"]),
        ("stop_token_ids", "2"),
        ("ignore_eos", "yes"),
        ("no_stop_trim", 1),
        ("skip_special_tokens", "true"),
        ("seed", 1.5),
        ("seed", 2**64),
        ("regex", 5),
        ("ebnf", ["root ::= 'a'"]),
        ("json_schema", "{not json"),
        ("json_schema", "[1, 2]"),
        ("json_schema", 5),
        ("json_schema", {"bad": object()}),
        ("choices", []),
        ("choices", "ab"),
        ("choices", ["a", 1]),
    ],
)
def test_invalid_value_names_field(key, value):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams.from_dict({key: value})
    assert info.value.field == f"sampling_params.{key}"
    assert key in str(info.value)


def test_min_new_tokens_above_max():
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams.from_dict({"max_new_tokens": 4, "min_new_tokens": 5})
    assert info.value.field == "sampling_params.min_new_tokens"
    assert SamplingParams(max_new_tokens=4, min_new_tokens=4).min_new_tokens == 4


@pytest.mark.parametrize(
    "values",
    [
        {"max_new_tokens": 0},
        {"temperature": 0},
        {"temperature": 2.5},
        {"top_p": 1},
        {"top_p": 1e-6},
        {"top_k": -1},
        {"top_k": 1},
        {"min_p": 0.0},
        {"min_p": 1.0},
        {"frequency_penalty": -2.0, "presence_penalty": 2.0},
        {"frequency_penalty": 2, "presence_penalty": -2},
        {"repetition_penalty": 2.0},
        {"repetition_penalty": 1e-3},
        {"seed": 0},
        {"seed": -(2**63)},
        {"seed": 2**64 - 1},
        {"json_schema": True},
        {"choices": ["only"]},
    ],
)
def test_boundary_values_accepted(values):
    params = SamplingParams.from_dict(values)
    for key, value in values.items():
        expected = tuple(value) if isinstance(value, list) else value
        if key == "json_schema":
            expected = json.dumps(value)
        assert getattr(params, key) == expected


@pytest.mark.parametrize(
    "values",
    [
        {"regex": "a+", "ebnf": "root ::= 'a'"},
        {"json_schema": {"type": "string"}, "choices": ["a"]},
        {"regex": "a", "json_schema": "{}", "ebnf": "root ::= 'a'", "choices": ["a"]},
    ],
)
def test_more_than_one_constraint(values):
    with pytest.raises(InvalidRequestError, match="only one of") as info:
        SamplingParams.from_dict(values)
    assert info.value.field == "sampling_params"


@pytest.mark.parametrize(
    "kind, spec",
    [("regex", "[0-9]+"), ("ebnf", 'root ::= "x"'), ("choices", ("a", "b")), ("json_schema", "{}")],
)
def test_constraint_property(kind, spec):
    assert SamplingParams.from_dict({kind: spec}).constraint == (kind, spec)
    assert SamplingParams().constraint is None


@pytest.mark.parametrize(
    "values, greedy",
    [
        ({}, False),
        ({"temperature": 0.0}, True),
        ({"temperature": 0.99e-5}, True),
        ({"temperature": 1e-5}, False),
        ({"top_k": 1}, True),
        ({"top_k": 2, "temperature": 0.7}, False),
    ],
)
def test_is_greedy(values, greedy):
    assert SamplingParams.from_dict(values).is_greedy is greedy


def test_validate_vocab():
    SamplingParams(stop_token_ids=(0, 99)).validate_vocab(100)
    with pytest.raises(InvalidRequestError, match="100") as info:
        SamplingParams(stop_token_ids=(3, 100)).validate_vocab(100)
    assert info.value.field == "sampling_params.stop_token_ids"


_valid_params = st.fixed_dictionaries(
    {},
    optional={
        "max_new_tokens": st.integers(16, 4096),
        "min_new_tokens": st.integers(0, 16),
        "temperature": st.floats(0.0, 5.0),
        "top_p": st.floats(1e-3, 1.0),
        "top_k": st.one_of(st.just(-1), st.integers(1, 1000)),
        "min_p": st.floats(0.0, 1.0),
        "frequency_penalty": st.floats(-2.0, 2.0),
        "presence_penalty": st.floats(-2.0, 2.0),
        "repetition_penalty": st.floats(0.01, 2.0),
        "stop": st.one_of(st.text(min_size=1), st.lists(st.text(min_size=1), max_size=3)),
        "stop_token_ids": st.lists(st.integers(0, 10**6), max_size=3),
        "ignore_eos": st.booleans(),
        "seed": st.one_of(st.none(), st.integers(0, 2**63)),
        "n": st.integers(1, 8),
        "regex": st.text(min_size=1),
    },
)


@given(_valid_params)
def test_round_trip_through_dict(values):
    params = SamplingParams.from_dict(values)
    assert SamplingParams.from_dict(params.to_dict()) == params
    assert SamplingParams.from_dict(json.loads(json.dumps(params.to_dict()))) == params


def test_stop_regex_is_normalised_and_validated():
    assert SamplingParams(stop_regex=r"\d").stop_regex == (r"\d",)
    assert SamplingParams.from_dict({"stop_regex": ["a+", "b"]}).stop_regex == ("a+", "b")
    with pytest.raises(InvalidRequestError, match="stop_regex") as err:
        SamplingParams(stop_regex="(")
    assert err.value.field == "sampling_params.stop_regex"
