"""The HTTP hop, side by side: the same front-door workloads over the `local` backend (the
in-process engine) and over the `http` backend (our server on that same engine, on 127.0.0.1).

Workloads on the embedded SmolLM2-135M-Instruct, greedy, each run cold (radix cache flushed):
  - LangChain: `ChatSGLang.batch` of 32 prompts sharing a long system prompt;
  - DSPy: a 4-shot `Predict` program (JSONAdapter, schema-decoded) over 16 questions.
Reported per run: wall seconds, the engine's prefill/cached token counters and hit rate (read
from the engine both backends share), and the http/local time ratio (the hop's overhead).

    python benchmarks/bench_backends_cpu.py
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from collections.abc import Callable
from typing import Any

SYSTEM = (
    "You are a concise assistant for a radix-attention serving engine. Answer every question "
    "in one short sentence, without preamble, and never repeat the question. "
) * 6
QUESTIONS = [
    "What is the capital of France?",
    "What animal says moo?",
    "What color is grass?",
    "How many days are in a week?",
    "What is frozen water called?",
    "What color is a banana?",
    "What is the opposite of up?",
    "How many wheels does a bicycle have?",
    "What season comes after winter?",
    "What do you call a baby cat?",
    "What planet do we live on?",
    "What color is snow?",
    "What do fish live in?",
    "What do bees make?",
    "What is two plus two?",
    "Which is bigger, a mouse or an elephant?",
]


def measure(engine: Any, work: Callable[[], list[str]]) -> dict[str, Any]:
    assert engine.flush_cache()
    before = engine.metrics()
    start = time.perf_counter()
    answers = work()
    seconds = time.perf_counter() - start
    after = engine.metrics()
    prompt = after["prompt_tokens"] - before["prompt_tokens"]
    cached = after["cached_tokens"] - before["cached_tokens"]
    return {
        "seconds": seconds,
        "prefill": after["prefill_tokens"] - before["prefill_tokens"],
        "cached": cached,
        "prompt": prompt,
        "hit_rate": cached / prompt if prompt else 0.0,
        "answers": answers,
    }


def langchain_batch(backend: Any, base_url: str | None, n: int, max_tokens: int):
    from langchain_core.messages import HumanMessage, SystemMessage

    from sgl_adapters.langchain import ChatSGLang

    model = ChatSGLang(backend=backend, base_url=base_url, max_tokens=max_tokens)
    inputs = [
        [SystemMessage(SYSTEM), HumanMessage(f"{QUESTIONS[i % len(QUESTIONS)]} (#{i})")]
        for i in range(n)
    ]
    return lambda: [m.content for m in model.batch(inputs)]


def dspy_fewshot(backend: Any, base_url: str | None, n: int, max_tokens: int):
    import dspy

    from sgl_adapters.dspy import LM

    class QA(dspy.Signature):
        """Answer the question with a short phrase."""

        question: str = dspy.InputField()
        answer: str = dspy.OutputField()

    train = [
        dspy.Example(question="What color is the sky on a clear day?", answer="blue"),
        dspy.Example(question="How many legs does a dog have?", answer="four"),
        dspy.Example(question="What is the opposite of hot?", answer="cold"),
        dspy.Example(question="What do cows drink?", answer="water"),
    ]
    train = [e.with_inputs("question") for e in train]
    program = dspy.LabeledFewShot(k=4).compile(dspy.Predict(QA), trainset=train)
    lm = LM(
        backend=backend,
        base_url=base_url,
        cache=False,
        temperature=0.0,
        max_tokens=max_tokens,
        max_string_length=48,
    )
    examples = [dspy.Example(question=QUESTIONS[i % 16]).with_inputs("question") for i in range(n)]

    def work() -> list[str]:
        with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
            preds = program.batch(examples, num_threads=n, max_errors=0)
        return [p.answer for p in preds]

    return work


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--dspy-max-tokens", type=int, default=24)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    import torch
    from sgl_engine.server import ServerThread, create_app
    from sgl_plugins.manager import get_backend

    from sgl_adapters.engines import ENGINES

    engine = ENGINES.get(None, {"device": "cpu"})
    local = get_backend("local", engine=engine)
    print(
        f"embedded SmolLM2-135M-Instruct, CPU, torch threads {torch.get_num_threads()}, "
        f"{platform.processor() or platform.machine()}; each run cold (cache flushed)"
    )
    rows = []
    with ServerThread(create_app(engine)) as srv:
        workloads = [
            (f"LangChain batch of {args.prompts}", langchain_batch, args.prompts, args.max_tokens),
            (f"DSPy 4-shot x {args.examples}", dspy_fewshot, args.examples, args.dspy_max_tokens),
        ]
        for name, make, n, max_tokens in workloads:
            runs = {}
            for kind, backend, url in (("local", local, None), ("http", "http", srv.base_url)):
                work = make(backend, url, n, max_tokens)
                work()  # warm-up (imports, first HTTP connection), not measured
                runs[kind] = measure(engine, work)
            rows.append((name, runs))
    print(
        "| workload | backend | seconds | prompt tok | prefilled | cached | hit rate | "
        "http/local | same answers |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, runs in rows:
        loc = runs["local"]
        for kind, r in runs.items():
            same = sum(a == b for a, b in zip(r["answers"], loc["answers"], strict=True))
            print(
                f"| {name} | {kind} | {r['seconds']:.2f} | {r['prompt']:,} | {r['prefill']:,} | "
                f"{r['cached']:,} | {r['hit_rate']:.1%} | {r['seconds'] / loc['seconds']:.2f}x | "
                f"{same}/{len(loc['answers'])} |"
            )


if __name__ == "__main__":
    main()
