"""`sgl-adapters demo`: a short run of every front door on the embedded model, with cache stats."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

FEW_SHOT = (
    "You answer geography questions with one word.\n"
    "Q: What is the capital of Spain?\nA: Madrid\n"
    "Q: What is the capital of Germany?\nA: Berlin\n"
    "Q: What is the capital of Japan?\nA: Tokyo\n"
)
CAPITALS = {"France": "Paris", "Italy": "Rome", "Egypt": "Cairo", "Canada": "Ottawa"}
QUESTIONS = list(CAPITALS)


def add_demo_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run each front door on the embedded model and print cache statistics",
        description="Loads the embedded SmolLM2-135M-Instruct (or --model), runs the engine, "
        "an SGLang program, LangChain and DSPy on it, and prints radix-cache statistics.",
    )
    parser.add_argument("--model", default=None, help="a local HF folder (default: embedded)")
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda or auto (cuda when available; default auto)"
    )
    parser.set_defaults(func=run_demo)


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 60 - len(title)))


def _try(name: str, fn: Callable[[], Any]) -> None:
    _section(name)
    try:
        fn()
    except ImportError as exc:
        print(f"(skipped: {exc})")


def run_demo(args: argparse.Namespace) -> int:
    from sgl_adapters.engines import ENGINES, model_display_name

    engine_kwargs = {"device": args.device}
    t = time.perf_counter()
    engine = ENGINES.get(args.model, engine_kwargs)
    print(
        f"loaded {model_display_name(args.model)} on {engine.runner.device} in {time.perf_counter() - t:.1f} s"
    )
    try:
        _try("engine: few-shot batch sharing one prefix", lambda: _engine_demo(engine))
        _try("SGLang program (sgl_adapters.lang)", lambda: _lang_demo(engine))
        _try(
            "LangChain (sgl_adapters.langchain)", lambda: _langchain_demo(args.model, engine_kwargs)
        )
        _try("DSPy (sgl_adapters.dspy)", lambda: _dspy_demo(args.model, engine_kwargs))
        _section("radix cache statistics (one engine shared by every front door)")
        for line in explain_metrics(engine.metrics()):
            print(line)
    finally:
        ENGINES.close()
    return 0


def explain_metrics(m: dict[str, Any]) -> list[str]:
    """The engine's counters in a few sentences a person can check (see `Engine.metrics`)."""
    computed = m["prompt_tokens"] - m["cached_tokens"]
    extra = m["prefill_tokens"] - computed
    lines = [
        f"prompt tokens: {m['prompt_tokens']}, of which {m['cached_tokens']} "
        f"(hit rate {m['hit_rate']:.0%}) were read from the radix cache instead of computed",
        f"prefill computed: {m['prefill_tokens']} tokens = {computed} uncached prompt tokens"
        + (f" + {extra} tokens appended after the prompt (forced text, choices)" if extra else ""),
        f"decode: {m['sampled_tokens']} tokens sampled, {m['forced_tokens']} more forced by "
        f"grammars (jump-forward), saving {m['forward_passes_saved']} forward passes; "
        f"{m['forward_passes']} passes in all",
        f"KV cache: {m['kv_used']} of {m['kv_total']} slots hold reusable prefixes; "
        f"{m['finished_requests']} requests finished, {m['running']} running, "
        f"{m['waiting']} waiting",
    ]
    return lines


def _engine_demo(engine: Any) -> None:
    prompts = [f"{FEW_SHOT}Q: What is the capital of {c}?\nA:" for c in QUESTIONS]
    outs = engine.generate(prompts, {"max_new_tokens": 4, "temperature": 0, "stop": "\n"})
    for c, o in zip(QUESTIONS, outs, strict=True):
        m = o["meta_info"]
        print(
            f"{c:>8s} -> {o['text'].strip():12s} prompt {m['prompt_tokens']:3d} tok, "
            f"{m['cached_tokens']:3d} reused from the radix cache"
        )
    date = engine.generate(
        "Give me a date in ISO format: ",
        {"max_new_tokens": 16, "regex": r"\d{4}-\d{2}-\d{2}", "temperature": 0},
    )["text"]
    print(f"constrained to the regex \\d{{4}}-\\d{{2}}-\\d{{2}}: {date}")


def _lang_demo(engine: Any) -> None:
    import sgl_adapters.lang as sgl

    @sgl.function
    def capital(s, country):
        s += FEW_SHOT + f"Q: What is the capital of {country}?\nA: "
        s += sgl.select("city", choices=list(CAPITALS.values()))

    sgl.set_default_backend(sgl.Runtime(engine=engine))
    states = capital.run_batch([{"country": c} for c in QUESTIONS])
    for c, s in zip(QUESTIONS, states, strict=True):
        print(f"{c:>8s} -> select among {len(CAPITALS)} cities: {s['city']}")


def _langchain_demo(model: str | None, engine_kwargs: dict) -> None:
    from pydantic import BaseModel

    from sgl_adapters.langchain import ChatSGLang

    class City(BaseModel):
        name: str
        country: str

    chat = ChatSGLang(model=model, max_tokens=24, temperature=0, engine_kwargs=engine_kwargs)
    msg = chat.invoke("What is the capital of France?")
    print("invoke:", msg.content.strip()[:60])
    print("usage:", msg.usage_metadata)
    city = chat.with_structured_output(City).invoke("Tell me about Paris as JSON.")
    print("structured output (JSON schema of City):", city)


def _dspy_demo(model: str | None, engine_kwargs: dict) -> None:
    import dspy

    from sgl_adapters.dspy import LM

    lm = LM(model=model, engine_kwargs=engine_kwargs, max_tokens=64, temperature=0, cache=False)

    class Capital(dspy.Signature):
        """Answer with the name of the city only."""

        question: str = dspy.InputField()
        answer: str = dspy.OutputField(desc="one city name")

    predict = dspy.Predict(Capital)
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        for country in ("France", "Japan"):
            answer = predict(question=f"What is the capital of {country}?").answer
            print(f"dspy.Predict (JSONAdapter, decoded under its schema): {country} -> {answer}")
