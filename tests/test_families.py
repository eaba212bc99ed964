"""Model families on tiny random models, each with a chat template in its family's format:
detection, the prompt with tools and history, calls parsed (whole and streamed, several per
turn), the grammar keeping every call schema-valid at temperature 1.0, reasoning separated."""

from __future__ import annotations

import json

import jsonschema
import pytest
import xgrammar as xgr
from family_templates import TEMPLATES
from hypothesis import given, settings
from hypothesis import strategies as st
from sgl_engine.families import (
    BUILTIN_FAMILIES,
    THINK,
    OutputStream,
    ParsedCall,
    builtin_registry,
    family_of,
    parse_output,
    prepare_chat,
    tool_grammar,
    with_reasoning,
)

FAMILIES = {f.name: f for f in BUILTIN_FAMILIES}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": 0, "maximum": 99},
                "b": {"type": "integer", "minimum": 0, "maximum": 99},
                "loud": {"type": "boolean"},
            },
            "required": ["a", "b"],
        },
    },
}
TOOLS = [WEATHER, ADD]
SPECS = [{"name": t["function"]["name"], "parameters": t["function"]["parameters"]} for t in TOOLS]
SCHEMAS = {s["name"]: s["parameters"] for s in SPECS}
CALLS = [
    ParsedCall("get_weather", {"city": "Paris }]</tool_call>", "unit": "c"}),
    ParsedCall("add", {"a": 2, "b": 40}),
]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    from sgl_engine.testing import make_tiny_model_dir

    root = tmp_path_factory.mktemp("families")
    return {
        name: str(
            make_tiny_model_dir(
                root / name, arch=arch, chat_template=template, max_position_embeddings=4096
            )
        )
        for name, (arch, template) in TEMPLATES.items()
    }


@pytest.fixture(scope="module")
def engines(family_dirs):
    from sgl_engine import Engine

    made = {
        name: Engine(path, device="cpu", max_total_tokens=8192)
        for name, path in family_dirs.items()
    }
    yield made
    for eng in made.values():
        eng.check_invariants()
        eng.shutdown()


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_each_family_is_detected_from_its_template(engines, name):
    assert family_of(engines[name]).name == name


def test_unknown_template_falls_back_and_model_type_counts():
    registry = builtin_registry()
    assert registry.detect("{{ messages }}").name == "hermes"
    assert registry.detect("{{ messages }}", "qwen3").name == "qwen3"
    assert registry.detect("{{ messages }}", "mistral").name == "mistral"


def _history():
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'},
    }
    return [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "What is 1+2?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "name": "add", "content": "3"},
        {"role": "user", "content": "And the weather?"},
    ]


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_prompt_offers_tools_and_renders_history_in_the_family_format(engines, name):
    eng = engines[name]
    family = family_of(eng)
    messages, tools = prepare_chat(family, eng.tokenizer.chat_template, _history(), TOOLS)
    prompt = eng.apply_chat_template(messages, tools=tools)
    assert "get_weather" in prompt and "Weather in a city." in prompt
    past = family.tool_format.render([ParsedCall("add", {"a": 1, "b": 2})])
    if name == "llama3":  # the template writes the call itself, without a separator
        past = '{"name": "add", "parameters": {"a": 1, "b": 2}}'
    if name == "qwen3":
        past = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    assert past in prompt
    assert "3" in prompt.split(past, 1)[1]
    start = prompt.index(past)
    _, calls = family.tool_format.parse(prompt[start:])
    assert calls[0] == ParsedCall("add", {"a": 1, "b": 2})


@pytest.mark.parametrize("fmt", sorted({f.tool_format for f in BUILTIN_FAMILIES}, key=str))
def test_several_calls_per_turn_parse_back(fmt):
    text = "Let me check both.\n" + fmt.render(CALLS)
    content, calls = fmt.parse(text)
    assert content == "Let me check both." and calls == CALLS
    assert fmt.parse("no calls here") == ("no calls here", [])


def _streamed(text, cuts, fmt, reasoning=None, opened=None):
    stream = OutputStream(fmt, reasoning, opened)
    pieces = sorted({min(c, len(text)) for c in cuts if 0 < c < len(text)}) + [len(text)]
    thought, content, calls = "", "", {}
    for i, cut in enumerate(pieces):
        step = stream.feed(text[:cut], final=i == len(pieces) - 1)
        thought, content = thought + step.reasoning, content + step.content
        for d in step.calls:
            entry = calls.setdefault(d.index, ["", ""])
            entry[0] = d.name or entry[0]
            entry[1] += d.arguments
    parsed = [ParsedCall(n, json.loads(a)) for _, (n, a) in sorted(calls.items())]
    return thought, content, parsed


@settings(max_examples=40, deadline=None)
@given(
    fmt=st.sampled_from(sorted({f.tool_format for f in BUILTIN_FAMILIES}, key=str)),
    cuts=st.lists(st.integers(1, 400), max_size=15),
    think=st.booleans(),
)
def test_streamed_calls_and_reasoning_equal_the_whole_parse(fmt, cuts, think):
    head = "<think>\nweigh it up </thi \n</think>\n\n" if think else ""
    text = head + "Checking. " + fmt.render(CALLS)
    whole = parse_output(text, fmt, THINK)
    assert whole.calls == CALLS and whole.content == "Checking."
    assert whole.reasoning == ("weigh it up </thi" if think else None)
    thought, content, calls = _streamed(text, cuts, fmt, THINK)
    assert (thought, content, calls) == (whole.reasoning or "", whole.content, whole.calls)


def _compiled(eng, ebnf):
    info = xgr.TokenizerInfo.from_huggingface(
        eng.tokenizer,
        vocab_size=eng.hf_config.vocab_size,
        stop_token_ids=[eng.tokenizer.eos_token_id],
    )
    return xgr.GrammarCompiler(info).compile_grammar(ebnf)


def _accepts(compiled, text):
    return xgr.GrammarMatcher(compiled).accept_string(text)


@pytest.mark.parametrize("name", ["qwen3", "llama3", "mistral", "smollm2"])
def test_tool_choice_grammars_admit_exactly_what_they_should(engines, name):
    fmt = FAMILIES[name].tool_format
    calls = fmt.render(CALLS)
    one = fmt.render(CALLS[:1])
    bad = fmt.render([ParsedCall("add", {"a": "two", "b": 1})])
    auto = _compiled(engines[name], tool_grammar(fmt, SPECS, "auto"))
    assert _accepts(auto, "plain words") and _accepts(auto, calls)
    assert _accepts(auto, "Sure. " + calls) and not _accepts(auto, bad)
    required = _compiled(engines[name], tool_grammar(fmt, SPECS, "required"))
    assert _accepts(required, calls) and not _accepts(required, "plain words")
    single = _compiled(engines[name], tool_grammar(fmt, SPECS, "required", parallel=False))
    assert _accepts(single, one) and not _accepts(single, calls)
    none = _compiled(engines[name], tool_grammar(fmt, SPECS, "none"))
    assert _accepts(none, "plain words") and not _accepts(none, calls)
    thinking = _compiled(
        engines[name], with_reasoning(tool_grammar(fmt, SPECS, "required"), THINK, None)
    )
    assert _accepts(thinking, "<think>\nhmm, {json} <tool_call>\n</think>\n\n" + calls)
    assert _accepts(thinking, calls) and not _accepts(thinking, "<think>x</think> words")


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_calls_stay_schema_valid_at_temperature_one(engines, name):
    eng = engines[name]
    family = family_of(eng)
    messages, tools = prepare_chat(family, eng.tokenizer.chat_template, _history(), TOOLS)
    prompt = eng.apply_chat_template(messages, tools=tools, enable_thinking=False)
    opened = family.reasoning.opened_by(prompt) if family.reasoning else None
    grammar = tool_grammar(family.tool_format, SPECS, "required", max_calls=3)
    if opened:  # DeepSeek-R1: the answer starts inside <think>; end it in the prompt
        prompt += "Use the tools.\n</think>\n\n"
    params = {"max_new_tokens": 400, "temperature": 1.0, "ebnf": grammar}
    outs = eng.generate([prompt] * 6, [{**params, "seed": s} for s in range(6)])
    for out in outs:
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out
        parsed = parse_output(out["text"], family.tool_format)
        assert 1 <= len(parsed.calls) <= 3 and parsed.content == ""
        for call in parsed.calls:
            jsonschema.validate(call.arguments, SCHEMAS[call.name])
    streamed = list(eng.generate(prompt, {**params, "seed": 0}, stream=True))
    _, _, calls = _streamed(
        streamed[-1]["text"], [len(c["text"]) for c in streamed], family.tool_format
    )
    assert calls == parse_output(outs[0]["text"], family.tool_format).calls


def test_reasoning_opened_by_the_template_is_separated(engines):
    eng = engines["deepseek-r1"]
    family = family_of(eng)
    prompt = eng.apply_chat_template([{"role": "user", "content": "hi"}])
    assert family.reasoning.opened_by(prompt) is True
    out = eng.generate(prompt, {"max_new_tokens": 16, "temperature": 0})
    whole = parse_output(out["text"] + "</think>\n\nThe answer.", None, family.reasoning, True)
    assert whole.reasoning == out["text"].strip() and whole.content == "The answer."
    qwen = engines["qwen3"]
    off = qwen.apply_chat_template([{"role": "user", "content": "hi"}], enable_thinking=False)
    assert (
        THINK.opened_by(off) is False
        and THINK.opened_by(qwen.apply_chat_template([{"role": "user", "content": "hi"}])) is None
    )
