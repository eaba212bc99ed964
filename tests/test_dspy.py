"""sgl_adapters.dspy on a tiny random model: engine parity, options, usage, logprobs, n,
schema-constrained JSONAdapter, concurrent batches on the radix cache, streaming, save/load.

Every test runs on each LM kind the installed DSPy has: "engine" (`dspy.LM(engine=...)`,
DSPy 3.4+) and "legacy" (`SGLangLM`, the `BaseLM` forward path DSPy 3.3 uses).
"""

from __future__ import annotations

import asyncio
import json
import pickle
import warnings
from typing import Literal

import dspy
import jsonschema
import pytest
from pydantic import BaseModel, Field

from sgl_adapters import engines as lc_engines
from sgl_adapters.dspy import LM, ChatAdapter, field_format, has_engine_contract
from sgl_adapters.dspy.field_grammar import tool_schema
from sgl_adapters.dspy.legacy_lm import SGLangLM
from sgl_adapters.engines import EngineRegistry

ENGINE_KWARGS = {"device": "cpu", "max_total_tokens": 16384, "context_length": 4096}
KINDS = ["engine", "legacy"] if has_engine_contract() else ["legacy"]
SYSTEM = "You answer questions about animals in one short sentence. " * 6


@pytest.fixture(autouse=True)
def _quiet_deprecations():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


@pytest.fixture(scope="module")
def registry():
    reg = EngineRegistry()
    yield reg
    for engine in reg._engines.values():
        engine.check_invariants()
    reg.close()


def make_lm(kind: str, model: str, registry: EngineRegistry, **kwargs) -> dspy.BaseLM:
    kwargs.setdefault("temperature", 0.0)
    kwargs.setdefault("max_tokens", 12)
    common = {"engine_kwargs": ENGINE_KWARGS, "registry": registry, "cache": False}
    if kind == "engine":
        return LM(model, **common, **kwargs)
    return SGLangLM(model, **common, **kwargs)


@pytest.fixture(params=KINDS)
def lm(request, tiny_llama, registry):
    return make_lm(request.param, tiny_llama, registry)


def engine_of(lm: dspy.BaseLM):
    """The `sgl_engine.Engine` under either kind of LM."""
    return lm.engine.client.backend.engine if hasattr(lm.engine, "plan") else lm.engine


def reference(lm, messages, **params):
    engine = engine_of(lm)
    prompt = engine.apply_chat_template(messages)
    sp = {"max_new_tokens": 12, "temperature": 0.0, **params}
    return prompt, engine.generate(prompt, sp)


def last_usage(lm) -> dict:
    return lm.history[-1]["usage"]


def test_helper_returns_the_object_for_the_installed_dspy(tiny_llama, registry):
    lm = LM(tiny_llama, registry=registry, engine_kwargs=ENGINE_KWARGS)
    if has_engine_contract():
        from sgl_adapters.dspy.engine import AsyncSGLangEngine, SGLangEngine

        assert type(lm) is dspy.LM and isinstance(lm.engine, SGLangEngine)
        assert isinstance(lm._async_engine_spec, AsyncSGLangEngine)
    else:
        assert isinstance(lm, SGLangLM)
    assert lm.model == f"sglang/{tiny_llama.rstrip('/').split('/')[-1]}"
    assert lm.supports_response_schema and "response_format" in lm.supported_params


def test_call_matches_engine_and_reports_usage(lm):
    prompt, ref = reference(lm, [{"role": "user", "content": "Tell me about cats."}])
    out = lm("Tell me about cats.")
    assert out == [ref["text"]]
    usage = last_usage(lm)
    n_prompt = len(engine_of(lm).tokenizer.encode(prompt))
    assert usage["prompt_tokens"] == n_prompt == ref["meta_info"]["prompt_tokens"]
    assert usage["completion_tokens"] == len(ref["output_ids"])
    assert usage["total_tokens"] == n_prompt + len(ref["output_ids"])
    # The reference ran this prompt first: the radix cache holds it, and usage says so.
    assert usage["prompt_tokens_details"]["cached_tokens"] >= n_prompt - 1


def test_messages_render_through_the_chat_template(lm):
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "dog?"},
        {"role": "assistant", "content": "A dog barks."},
        {"role": "user", "content": [{"type": "text", "text": "cat?"}]},
    ]
    out = lm(messages=messages)
    plain = [{**m, "content": "cat?"} if isinstance(m["content"], list) else m for m in messages]
    assert out == [reference(lm, plain)[1]["text"]]


def test_options_reach_the_engine(lm):
    msgs = [{"role": "user", "content": "Name three birds."}]
    full = reference(lm, msgs, max_new_tokens=20)[1]
    stop = full["text"][4:7]
    assert stop and stop in full["text"]
    out = lm(messages=msgs, max_tokens=20, stop=[stop])
    assert out == [reference(lm, msgs, max_new_tokens=20, stop=[stop])[1]["text"]]
    assert out[0] == full["text"][: full["text"].index(stop)]
    short = lm(messages=msgs, max_tokens=3)
    assert last_usage(lm)["completion_tokens"] == 3
    assert short == [reference(lm, msgs, max_new_tokens=3)[1]["text"]]
    sampled = lm(messages=msgs, temperature=1.0, top_p=0.9, seed=7, max_tokens=8)
    ref = reference(lm, msgs, temperature=1.0, top_p=0.9, seed=7, max_new_tokens=8)[1]
    assert sampled == [ref["text"]]


def test_logprobs_are_the_engines(lm):
    msgs = [{"role": "user", "content": "Hello"}]
    (out,) = lm(messages=msgs, logprobs=True, top_logprobs=3, max_tokens=6)
    engine = engine_of(lm)
    prompt = engine.apply_chat_template(msgs)
    ref = engine.generate(
        prompt, {"max_new_tokens": 6, "temperature": 0.0}, return_logprob=True, top_logprobs_num=3
    )
    assert out["text"] == ref["text"]
    content = out["logprobs"]["content"]
    chosen = ref["meta_info"]["output_token_logprobs"]
    assert len(content) == len(chosen) == 6
    for entry, (lp, tid, _), top in zip(
        content, chosen, ref["meta_info"]["output_top_logprobs"], strict=True
    ):
        assert entry["logprob"] == pytest.approx(lp)
        assert entry["token"] == engine.tokenizer.decode([tid])
        assert len(entry["top_logprobs"]) == 3
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx([t[0] for t in top])
        # Greedy: the chosen token is the most likely one.
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])


def test_n_choices_and_their_usage(lm):
    msgs = [{"role": "user", "content": SYSTEM + "Why do cats purr?"}]
    outs = lm(messages=msgs, n=3, temperature=1.0, max_tokens=8)
    assert len(outs) == 3 and all(isinstance(o, str) for o in outs)
    usage = last_usage(lm)
    assert usage["completion_tokens"] <= 24
    # The n candidates share their prompt in the radix cache.
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0


class Pet(BaseModel):
    kind: Literal["cat", "dog", "bird"]
    name: str
    age: int = Field(ge=0, le=30)
    friendly: bool


class Describe(dspy.Signature):
    """Describe the pet in the text."""

    text: str = dspy.InputField()
    pet: Pet = dspy.OutputField()


@pytest.mark.parametrize("kind", KINDS)
def test_json_adapter_output_is_decoded_under_its_schema(kind, tiny_llama, registry):
    lm = make_lm(kind, tiny_llama, registry, max_tokens=120, max_string_length=12)
    predict = dspy.Predict(Describe)
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        for seed in range(4):
            pred = predict(text=f"my pet number {seed}", config={"temperature": 1.0, "seed": seed})
            assert isinstance(pred.pet, Pet)
            entry = lm.history[-1]
            assert entry["kwargs"]["response_format"] is not None
            (raw,) = entry["outputs"]
            raw = raw if isinstance(raw, str) else raw["text"]
            data = json.loads(raw)
            jsonschema.validate(data["pet"], Pet.model_json_schema())
            assert len(data["pet"]["name"]) <= 12


@pytest.mark.parametrize("kind", KINDS)
def test_chat_adapter_falls_back_to_schema_decoding(kind, tiny_llama, registry):
    """A random model never writes ChatAdapter's field markers; DSPy's JSON fallback then
    asks for `response_format`, which the engine decodes under, so the program still parses."""
    lm = make_lm(kind, tiny_llama, registry, max_tokens=120, max_string_length=12)
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
        pred = dspy.Predict(Describe)(text="a dog called Rex")
    assert isinstance(pred.pet, Pet)
    assert "response_format" not in lm.history[-2]["kwargs"]
    assert lm.history[-1]["kwargs"]["response_format"] is not None


class Classify(dspy.Signature):
    """Classify the animal."""

    text: str = dspy.InputField()
    kind: Literal["cat", "dog", "bird"] = dspy.OutputField()
    legs: int = dspy.OutputField()
    weight: float = dspy.OutputField()
    pet: bool = dspy.OutputField()


def test_field_format_accepts_what_chat_adapter_writes():
    from xgrammar.testing import _is_grammar_accept_string as accepts

    fmt = field_format(Classify)
    ebnf = fmt.ebnf(fmt.text_chars(200))
    for values in (
        {"kind": "dog", "legs": 4, "weight": 12.5, "pet": True},
        {"kind": "bird", "legs": -2, "weight": 0.0, "pet": False},
    ):
        text = dspy.ChatAdapter().format_assistant_message_content(Classify, values)
        assert accepts(ebnf, text.rstrip("\n")), text
    assert not accepts(ebnf, "[[## kind ## ]]\ncat\n\n[[ ## completed ## ]]")
    pet = field_format(Describe)  # a pydantic field: decoded under its JSON schema
    text = dspy.ChatAdapter().format_assistant_message_content(
        Describe, {"pet": Pet(kind="dog", name="Rex", age=3, friendly=True)}
    )
    assert pet is not None and accepts(pet.ebnf(64), text.rstrip("\n")), text


def test_field_format_bounds_free_text_to_the_budget():
    """Free text shrinks so the worst case (a token per byte) fits max_tokens; a budget
    too small for the fixed parts is raised to the grammar's worst case."""
    fmt = field_format(QA)
    chars = fmt.text_chars(400)
    assert fmt.worst_case_tokens(chars) <= 400 < fmt.worst_case_tokens(chars + 1)
    assert "max_new_tokens" not in fmt.params(400)
    small = fmt.params(20)
    assert small["max_new_tokens"] == fmt.worst_case_tokens(fmt.text_chars(20)) > 20


@pytest.mark.parametrize("kind", KINDS)
def test_constrained_chat_adapter_always_parses(kind, tiny_llama, registry):
    lm = make_lm(kind, tiny_llama, registry, max_tokens=160)
    predict = dspy.Predict(Classify)
    with dspy.context(lm=lm, adapter=ChatAdapter(use_json_adapter_fallback=False)):
        for seed in range(3):
            pred = predict(text=f"animal {seed}", config={"temperature": 1.0, "seed": seed})
            assert pred.kind in ("cat", "dog", "bird") and isinstance(pred.pet, bool)
            assert isinstance(pred.legs, int) and isinstance(pred.weight, float)
            assert "response_format" not in lm.history[-1]["kwargs"]
    # Outside the adapter nothing is constrained.
    assert (
        lm("animal", max_tokens=12)[0]
        == reference(lm, [{"role": "user", "content": "animal"}])[1]["text"]
    )


def _lookup(city: str) -> str:
    """Look a city up."""
    return f"{city} is a city."


def _population(city: str, metro: bool = False) -> str:
    """Population of a city (or of its metro area)."""
    return f"{city} has many people{' around it' if metro else ''}."


@pytest.mark.parametrize("kind", KINDS)
def test_react_steps_always_parse_under_the_field_grammar(kind, tiny_llama, registry):
    """dspy.ReAct on a random model at temperature 1.0, no JSON fallback: every step's
    answer is the field format with a real tool name and arguments valid for that tool
    (only the grammar can make random output parse), and the budget holds the whole answer."""
    lm = make_lm(kind, tiny_llama, registry, max_tokens=300, temperature=1.0)
    react = dspy.ReAct("question -> answer", tools=[_lookup, _population], max_iters=3)
    schemas = {name: tool_schema(tool.args) for name, tool in react.tools.items()}
    adapter = ChatAdapter(use_json_adapter_fallback=False, max_string_length=8)
    for seed in range(3):
        start = len(lm.history)
        with dspy.context(lm=lm, adapter=adapter):
            pred = react(question=f"city {seed}?", config={"seed": seed})
        steps = len([k for k in pred.trajectory if k.startswith("tool_name_")])
        assert 1 <= steps <= 3 and isinstance(pred.answer, str)
        for i in range(steps):
            name, args = pred.trajectory[f"tool_name_{i}"], pred.trajectory[f"tool_args_{i}"]
            jsonschema.validate(args, schemas[name])
            assert not pred.trajectory[f"observation_{i}"].startswith("Execution error")
        entries = lm.history[start:]
        assert len(entries) == steps + 1
        for entry in entries:
            assert "response_format" not in entry["kwargs"]
            outputs = entry["outputs"][0]
            text = outputs if isinstance(outputs, str) else outputs["text"]
            assert text.endswith("[[ ## completed ## ]]")


class QA(dspy.Signature):
    """Answer the question."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


@pytest.mark.parametrize("kind", KINDS)
def test_batch_runs_concurrently_and_shares_demos_in_the_cache(kind, tiny_llama, registry):
    lm = make_lm(kind, tiny_llama, registry, max_tokens=40, max_string_length=8)
    engine = engine_of(lm)
    trainset = [
        dspy.Example(
            question=f"What sound does animal {i} make? {SYSTEM}", answer="moo"
        ).with_inputs("question")
        for i in range(4)
    ]
    program = dspy.LabeledFewShot(k=3).compile(dspy.Predict(QA), trainset=trainset)
    examples = [dspy.Example(question=f"question {i}").with_inputs("question") for i in range(8)]
    assert engine.flush_cache()
    before = engine.metrics()
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        preds = program.batch(examples, num_threads=8, max_errors=0)
    after = engine.metrics()
    assert len(preds) == 8 and all(isinstance(p.answer, str) for p in preds)
    entries = lm.history[-8:]
    cached = [e["usage"]["prompt_tokens_details"]["cached_tokens"] for e in entries]
    prompts = [e["usage"]["prompt_tokens"] for e in entries]
    completions = sum(e["usage"]["completion_tokens"] for e in entries)
    # The demos are a shared prefix. Whatever order the eight threads arrive in, exactly one
    # request (the first admitted) computes them; the scheduler holds back a request sharing
    # a prefix still being prefilled, so every other one reuses the same cached prefix. The
    # eight prompts tokenise alike: a second cold request once came from a prompt whose
    # special tokens were spelled out because the scheduler thread had set a flag on the
    # shared tokenizer (see test_constrained_engine.py's shared-tokenizer-state test).
    assert len(set(prompts)) == 1, prompts
    cold = [c for c in cached if c <= prompts[0] // 2]
    assert cold == [0] and len(set(cached) - {0}) == 1, (cached, prompts)
    assert after["cached_tokens"] - before["cached_tokens"] == sum(cached)
    # Run one after another, every output token would need its own forward pass.
    assert after["forward_passes"] - before["forward_passes"] < completions


@pytest.mark.parametrize("kind", KINDS)
def test_parallel_matches_sequential(kind, tiny_llama, registry):
    lm = make_lm(kind, tiny_llama, registry, max_tokens=40, max_string_length=8)
    predict = dspy.Predict(QA)
    questions = [f"q{i}" for i in range(6)]
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        sequential = [predict(question=q).answer for q in questions]
        parallel = dspy.Parallel(num_threads=6)([(predict, {"question": q}) for q in questions])
    assert [p.answer for p in parallel] == sequential


@pytest.mark.parametrize("kind", KINDS)
def test_async_calls_match_sync(kind, tiny_llama, registry):
    lm = make_lm(kind, tiny_llama, registry)
    sync = lm("hello there")

    async def main():
        return await asyncio.gather(*(lm.acall("hello there") for _ in range(3)))

    assert asyncio.run(main()) == [sync] * 3


@pytest.mark.skipif(not has_engine_contract(), reason="the engine contract is DSPy 3.4+")
def test_engine_stream_equals_complete(tiny_llama, registry):
    from dspy.lm15 import Config, Message, Request

    lm = make_lm("engine", tiny_llama, registry)
    request = Request(
        model=lm.model,
        messages=(Message.user("Stream me a story."),),
        system="Be brief.",
        config=Config(max_tokens=10, temperature=0.0),
    )
    response = lm.engine.complete(request)
    events = list(lm.engine.stream(request))
    assert [e.type for e in events[:1] + events[-1:]] == ["start", "end"]
    text = "".join(e.delta.text for e in events if e.type == "delta")
    assert text == response.text
    assert events[-1].usage.output_tokens == response.usage.output_tokens == 10

    async def astream():
        return [e async for e in lm._async_engine_spec.stream(request)]

    aevents = asyncio.run(astream())
    assert "".join(e.delta.text for e in aevents if e.type == "delta") == text


@pytest.mark.skipif(not has_engine_contract(), reason="the engine contract is DSPy 3.4+")
def test_stream_listener_sees_the_tokens(tiny_llama, registry):
    lm = make_lm("engine", tiny_llama, registry, max_tokens=120, max_string_length=12)
    program = dspy.streamify(dspy.Predict(Describe))

    async def main():
        chunks, final = [], None
        async for item in program(text="a cat"):
            if isinstance(item, dspy.Prediction):
                final = item
            else:
                chunks.append(item)
        return chunks, final

    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        chunks, final = asyncio.run(main())
    assert isinstance(final.pet, Pet) and chunks


def test_prompt_too_long_is_a_context_window_error(lm):
    from dspy.utils.exceptions import ContextWindowExceededError

    with pytest.raises(ContextWindowExceededError):
        lm("cat " * 5000)


@pytest.mark.parametrize("kind", KINDS)
def test_lm_state_and_pickle_round_trip_to_the_same_engine(kind, tiny_llama, registry, monkeypatch):
    monkeypatch.setattr(lc_engines, "ENGINES", registry)
    lm = make_lm(kind, tiny_llama, registry, max_tokens=7, max_string_length=5)
    state = lm.dump_state()
    json.dumps(state)
    loaded = dspy.BaseLM.load_state(state, allow_custom_lm_class=True)
    copied = pickle.loads(pickle.dumps(lm))
    for other in (loaded, copied):
        assert other.model == lm.model and engine_of(other) is engine_of(lm)
        assert other("hi") == lm("hi")


@pytest.mark.parametrize("kind", KINDS)
def test_program_save_and_load(kind, tiny_llama, registry, tmp_path, monkeypatch):
    monkeypatch.setattr(lc_engines, "ENGINES", registry)
    lm = make_lm(kind, tiny_llama, registry, max_tokens=40, max_string_length=8)
    trainset = [
        dspy.Example(question=f"q{i}", answer=f"a{i}").with_inputs("question") for i in range(3)
    ]
    program = dspy.LabeledFewShot(k=3).compile(dspy.Predict(QA), trainset=trainset)
    program.lm = lm
    with dspy.context(adapter=dspy.JSONAdapter()):
        before = program(question="q?").answer
        program.save(tmp_path / "program.json")
        fresh = dspy.Predict(QA)
        fresh.load(tmp_path / "program.json", allow_unsafe_lm_state=True)
        assert [dict(d) for d in fresh.demos] == [dict(d) for d in program.demos]
        assert engine_of(fresh.lm) is engine_of(lm)
        assert fresh(question="q?").answer == before


def _weather(city: Literal["Paris", "Rome"], unit: Literal["c", "f"]) -> str:
    """Weather in a city."""
    return f"sunny in {city}"


def _add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


@pytest.mark.skipif(
    not has_engine_contract(), reason="native tool calls need DSPy's engine contract"
)
def test_native_function_calling_decodes_valid_tool_calls(tiny_llama, registry):
    """supports_function_calling: dspy.ToolCalls come from the model's own calls, decoded
    under the family's tool grammar, so every call names a tool and its args validate."""

    class Pick(dspy.Signature):
        question: str = dspy.InputField()
        tools: list[dspy.Tool] = dspy.InputField()
        calls: dspy.ToolCalls = dspy.OutputField()

    lm = make_lm("engine", tiny_llama, registry, max_tokens=200, temperature=1.0)
    assert lm.supports_function_calling and lm.supports_reasoning
    tools = [dspy.Tool(_weather), dspy.Tool(_add)]
    schemas = {
        t.name: {"type": "object", "properties": t.args, "required": list(t.args)} for t in tools
    }
    adapter = dspy.ChatAdapter(use_native_function_calling=True)
    seen = 0
    for seed in range(2):
        with dspy.context(lm=lm, adapter=adapter):
            config = {"seed": seed, "tool_choice": "required"}
            pred = dspy.Predict(Pick)(question="weather in Paris?", tools=tools, config=config)
        for call in pred.calls.tool_calls:
            jsonschema.validate(call.args, schemas[call.name])
            seen += 1
    engine = engine_of(lm)
    assert engine is not None and seen >= 2
