"""DSPy programs on the embedded SmolLM2-135M-Instruct through `sgl_adapters.dspy.LM`.

DSPy's response cache is off (cache=False) so every call reaches the engine. Outputs of a 135M
model are judged by shape and by parsing, not by wisdom; usage and cache counters are checked
against the engine's own metrics. The tests taking `any_lm` run over the `local` backend and
over the `http` backend (our server on the same engine, started by the test).
"""

from __future__ import annotations

import json
import warnings
from typing import Literal

import dspy
import jsonschema
import pytest
from pydantic import BaseModel, Field

from sgl_adapters import engines as lc_engines
from sgl_adapters.dspy import LM, ChatAdapter, has_engine_contract
from sgl_adapters.engines import EngineRegistry

ENGINE_KWARGS = {"device": "cpu", "max_total_tokens": 32768}


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
    reg.close()


LM_SETTINGS = {"cache": False, "temperature": 0.0, "max_tokens": 48, "max_string_length": 60}


@pytest.fixture(scope="module")
def lm(smollm2_path, registry):
    return LM(smollm2_path, registry=registry, engine_kwargs=ENGINE_KWARGS, **LM_SETTINGS)


@pytest.fixture(scope="module")
def engine(smollm2_path, registry):
    """The engine every LM here runs on (the http one through our server)."""
    return registry.get(smollm2_path, ENGINE_KWARGS)


@pytest.fixture(scope="module")
def http_lm(engine, registry):
    from sgl_engine.server import ServerThread, create_app

    with ServerThread(create_app(engine)) as srv:
        yield LM(backend="http", base_url=srv.base_url, registry=registry, **LM_SETTINGS)


NEEDS_ENGINE_CONTRACT = pytest.mark.skipif(
    not has_engine_contract(),
    reason="DSPy < 3.4 has no engine contract: its LM runs on the local backend only, "
    "and has no native function calling",
)


@pytest.fixture(params=["local", pytest.param("http", marks=NEEDS_ENGINE_CONTRACT)])
def any_lm(request):
    return request.getfixturevalue("lm" if request.param == "local" else "http_lm")


def backend_of(lm):
    """The Backend an LM runs on (DSPy 3.4: through its engine; 3.3: the shared local engine)."""
    return lm.engine.client.backend if has_engine_contract() else lm.engine


class QA(dspy.Signature):
    """Answer the question with a short phrase."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


TRAIN = [
    dspy.Example(question="What color is the sky on a clear day?", answer="blue"),
    dspy.Example(question="How many legs does a dog have?", answer="four"),
    dspy.Example(question="What is the opposite of hot?", answer="cold"),
    dspy.Example(question="What do bees make?", answer="honey"),
]
TRAIN = [e.with_inputs("question") for e in TRAIN]
QUESTIONS = [
    "What is the capital of France?",
    "What animal says moo?",
    "What color is grass?",
    "How many days are in a week?",
    "What is frozen water called?",
    "What color is a banana?",
    "What do cows drink?",
    "What is the opposite of up?",
    "How many wheels does a bicycle have?",
    "What season comes after winter?",
    "What do you call a baby cat?",
    "What planet do we live on?",
    "What is the sound of a dog?",
    "What color is snow?",
    "Which is bigger, a mouse or an elephant?",
    "What do fish live in?",
]


def test_predict_answers_and_reports_usage(any_lm):
    lm = any_lm
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        pred = dspy.Predict(QA)(question="What is the capital of France?")
    assert "paris" in pred.answer.lower()
    usage = lm.history[-1]["usage"]
    assert usage["prompt_tokens"] > 50 and 0 < usage["completion_tokens"] <= 48


def test_chain_of_thought_gives_reasoning_and_answer(lm):
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        pred = dspy.ChainOfThought(QA)(question="What is 2 + 3?")
    assert isinstance(pred.reasoning, str) and pred.reasoning.strip()
    assert isinstance(pred.answer, str) and pred.answer.strip()
    with dspy.context(lm=lm, adapter=ChatAdapter(use_json_adapter_fallback=False)):
        pred = dspy.ChainOfThought(QA)(question="What is 2 + 3?")
    assert pred.reasoning.strip() and pred.answer.strip()


class City(BaseModel):
    name: str
    country: str
    population_millions: float = Field(ge=0, le=50)
    size: Literal["small", "medium", "large"]
    is_capital: bool


class DescribeCity(dspy.Signature):
    """Describe the city named in the question."""

    question: str = dspy.InputField()
    city: City = dspy.OutputField()


def test_json_adapter_pydantic_output_parses_every_time(any_lm):
    lm = any_lm
    predict = dspy.Predict(DescribeCity)
    examples = [
        dspy.Example(question=f"Tell me about {c}.").with_inputs("question")
        for c in ("Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Perth")
    ]
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        preds = predict.batch(examples, num_threads=6, max_errors=0)
    assert len(preds) == 6
    for pred, entry in zip(preds, lm.history[-6:], strict=True):
        assert isinstance(pred.city, City)
        assert entry["kwargs"]["response_format"] is not None
        (raw,) = entry["outputs"]
        jsonschema.validate(json.loads(raw)["city"], City.model_json_schema())


def test_chat_adapter_formats_parse_with_demos(lm):
    """ChatAdapter with labeled demos, no JSON fallback: our ChatAdapter decodes under the
    field-marker regex, so every answer parses (plain ChatAdapter: SmolLM2 writes
    `[[## answer ## ]]` and most parses fail)."""
    program = dspy.LabeledFewShot(k=4).compile(dspy.Predict(QA), trainset=TRAIN)
    examples = [dspy.Example(question=q).with_inputs("question") for q in QUESTIONS[:6]]
    with dspy.context(lm=lm, adapter=ChatAdapter(use_json_adapter_fallback=False)):
        preds = program.batch(examples, num_threads=6, max_errors=0)
    assert all(isinstance(p.answer, str) and p.answer.strip() for p in preds)
    assert "paris" in preds[0].answer.lower()
    for entry in lm.history[-6:]:
        assert "response_format" not in entry["kwargs"]
        assert entry["outputs"][0].startswith("[[ ## answer ## ]]\n")


def test_few_shot_batch_of_16_reads_demos_from_the_radix_cache(any_lm, engine):
    lm = any_lm
    program = dspy.LabeledFewShot(k=4).compile(dspy.Predict(QA), trainset=TRAIN)
    examples = [dspy.Example(question=q).with_inputs("question") for q in QUESTIONS]
    engine.flush_cache()
    before = engine.metrics()
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        preds = program.batch(examples, num_threads=16, max_errors=0)
    after = engine.metrics()
    assert len(preds) == 16 and all(isinstance(p.answer, str) for p in preds)
    entries = lm.history[-16:]
    cached = [e["usage"]["prompt_tokens_details"]["cached_tokens"] for e in entries]
    prompts = [e["usage"]["prompt_tokens"] for e in entries]
    assert sum(cached) > 0
    assert sum(c > p // 2 for c, p in zip(cached, prompts, strict=True)) >= 15
    assert after["cached_tokens"] - before["cached_tokens"] == sum(cached)
    assert after["prefill_tokens"] - before["prefill_tokens"] < sum(prompts) // 2


def test_n_choices(lm):
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        pred = dspy.Predict(QA, n=3, temperature=0.8)(question="Name a fruit.")
    assert len(pred.completions.answer) == 3
    assert all(isinstance(a, str) and a for a in pred.completions.answer)


def test_save_and_load(any_lm, registry, tmp_path, monkeypatch):
    lm = any_lm
    monkeypatch.setattr(lc_engines, "ENGINES", registry)
    program = dspy.LabeledFewShot(k=4).compile(dspy.ChainOfThought(QA), trainset=TRAIN)
    program.set_lm(lm)
    with dspy.context(adapter=dspy.JSONAdapter()):
        before = program(question="What color is the sky?")
        program.save(tmp_path / "cot.json")
        loaded = dspy.ChainOfThought(QA)
        loaded.load(tmp_path / "cot.json", allow_unsafe_lm_state=True)
        after = loaded(question="What color is the sky?")
    assert len(loaded.predict.demos) == 4
    assert backend_of(loaded.predict.lm) is backend_of(lm)
    assert (after.reasoning, after.answer) == (before.reasoning, before.answer)


CALLED: list[str] = []


def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    CALLED.append("get_weather")
    return f"It is sunny in {city}."


def get_time(city: str) -> str:
    """Get the current local time in a city."""
    CALLED.append("get_time")
    return f"It is 10:30 in {city}."


@NEEDS_ENGINE_CONTRACT
def test_native_tool_calls_through_dspy_tool_calls(lm):
    """supports_function_calling: a signature with `dspy.ToolCalls` gets the model's own calls
    (SmolLM2 format, decoded under the tool grammar)."""

    class Plan(dspy.Signature):
        question: str = dspy.InputField()
        tools: list[dspy.Tool] = dspy.InputField()
        calls: dspy.ToolCalls = dspy.OutputField()

    assert lm.supports_function_calling
    tools = [dspy.Tool(get_weather), dspy.Tool(get_time)]
    adapter = dspy.ChatAdapter(use_native_function_calling=True)
    with dspy.context(lm=lm, adapter=adapter):
        pred = dspy.Predict(Plan)(question="What is the weather in Paris?", tools=tools)
    assert pred.calls is not None and pred.calls.tool_calls
    for call in pred.calls.tool_calls:
        assert call.name in ("get_weather", "get_time") and isinstance(call.args["city"], str)
        assert call.execute().startswith("It is")


@pytest.mark.slow
def test_react_with_two_tools_finishes(any_lm):
    """dspy.ReAct with two tools on SmolLM2, no JSON fallback, local and over http: every
    step parses (our ChatAdapter decodes a bounded thought, an offered tool name and arguments
    valid for that tool; the LM's max_tokens=48 is raised to the grammar's worst case), the
    tools run on the parsed arguments, and the extracted answer is a string."""
    lm = any_lm
    react = dspy.ReAct("question -> answer", tools=[get_weather, get_time], max_iters=3)
    CALLED.clear()
    with dspy.context(lm=lm, adapter=ChatAdapter(use_json_adapter_fallback=False)):
        pred = react(question="What is the weather in Paris?")
    names = [v for k, v in pred.trajectory.items() if k.startswith("tool_name_")]
    assert 1 <= len(names) <= 3
    assert set(names) <= {"get_weather", "get_time", "finish"}
    for i, name in enumerate(names):
        args, seen = pred.trajectory[f"tool_args_{i}"], pred.trajectory[f"observation_{i}"]
        if name == "finish":
            assert args == {} and seen == "Completed."
        else:
            assert set(args) == {"city"} and isinstance(args["city"], str)
            assert seen.startswith("It is") and args["city"] in seen
    assert CALLED == [n for n in names if n != "finish"] and CALLED
    assert isinstance(pred.answer, str) and pred.answer.strip()
    entries = lm.history[-(len(names) + 1) :]
    assert all("response_format" not in e["kwargs"] for e in entries)
    assert all(e["outputs"][0].endswith("[[ ## completed ## ]]") for e in entries)
