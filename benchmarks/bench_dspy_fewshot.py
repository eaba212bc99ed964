"""A DSPy few-shot program over 32 examples on our engine, radix cache on vs off, in one run.

The program is `dspy.LabeledFewShot(k)` over `dspy.Predict(question -> answer)` with
passage-sized demos, run with `module.batch` (DSPy's threads; the engine batches what arrives
together). DSPy's response cache is off, so every example reaches the engine. Both engines are
warmed up first; the table reports the batch alone.

    python benchmarks/bench_dspy_fewshot.py [--model PATH] [--device cpu|cuda] [--examples 32]
        [--demos 4] [--max-tokens 16] [--adapter json|chat] [--threads 32]
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import dspy

PASSAGES = [
    ("the water cycle", "evaporation", "Water evaporates from oceans, condenses into clouds and falls as rain or snow."),
    ("photosynthesis", "sunlight", "Plants use sunlight, water and carbon dioxide to make glucose and release oxygen."),
    ("the Roman Empire", "Rome", "The empire was ruled from Rome and its roads connected distant provinces."),
    ("volcanoes", "magma", "Magma rises through the crust and erupts as lava, ash and gas."),
    ("the printing press", "Gutenberg", "Gutenberg's movable type made books cheaper and spread literacy across Europe."),
    ("honey bees", "hive", "Bees collect nectar, make honey and live together in a hive ruled by a queen."),
]  # fmt: skip
QUESTIONS = [
    "What do bees make?", "What is the largest planet?", "What gas do humans breathe in?",
    "What is frozen water called?", "Which animal is known as the king of the jungle?",
    "What colour is the sky on a clear day?", "How many legs does a spider have?",
    "What is the capital of Italy?", "What do cows drink?", "What is the opposite of hot?",
    "Which season comes after winter?", "What is the boiling point of water in Celsius?",
    "What do you call a baby cat?", "Which planet is called the red planet?",
    "What instrument has 88 keys?", "What is the tallest animal?",
]  # fmt: skip


class QA(dspy.Signature):
    """Answer the question in one or two words, using the passage when it helps."""

    passage: str = dspy.InputField()
    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


def trainset(k: int) -> list[dspy.Example]:
    return [
        dspy.Example(
            passage=" ".join([text] * 4),
            question=f"What is the key word about {topic}?",
            answer=word,
        ).with_inputs("passage", "question")
        for topic, word, text in PASSAGES[:k]
    ]


def examples(n: int) -> list[dspy.Example]:
    return [
        dspy.Example(
            passage="(none)", question=f"{QUESTIONS[i % len(QUESTIONS)]} (#{i})"
        ).with_inputs("passage", "question")
        for i in range(n)
    ]


def run(args: argparse.Namespace, program: dspy.Module, disable_radix_cache: bool) -> dict:
    from sgl_adapters.dspy import LM, ChatAdapter
    from sgl_adapters.engines import EngineRegistry

    registry = EngineRegistry()
    engine_kwargs = {
        "device": args.device,
        "max_total_tokens": args.kv_tokens,
        "disable_radix_cache": disable_radix_cache,
    }
    lm = LM(
        args.model,
        registry=registry,
        engine_kwargs=engine_kwargs,
        cache=False,
        temperature=0.0,
        max_tokens=args.max_tokens,
        max_string_length=48,
    )
    adapter = dspy.JSONAdapter() if args.adapter == "json" else ChatAdapter()
    engine = lm.engine.client.backend.engine if hasattr(lm.engine, "plan") else lm.engine
    try:
        with dspy.context(lm=lm, adapter=adapter):
            program(**examples(1)[0].inputs())
            engine.flush_cache()
            before = engine.metrics()
            start = time.perf_counter()
            preds = program.batch(examples(args.examples), num_threads=args.threads, max_errors=0)
            seconds = time.perf_counter() - start
        after = engine.metrics()
    finally:
        registry.close()
    entries = lm.history[-args.examples :]
    return {
        "seconds": seconds,
        "ex_s": args.examples / seconds,
        "prompt": sum(e["usage"]["prompt_tokens"] for e in entries),
        "cache_read": sum(e["usage"]["prompt_tokens_details"]["cached_tokens"] for e in entries),
        "prefill": after["prefill_tokens"] - before["prefill_tokens"],
        "passes": after["forward_passes"] - before["forward_passes"],
        "answers": [p.answer for p in preds],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="local HF folder; default: embedded SmolLM2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--demos", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--adapter", choices=("json", "chat"), default="json")
    ap.add_argument("--kv-tokens", type=int, default=96 * 1024)
    args = ap.parse_args()
    warnings.simplefilter("ignore", DeprecationWarning)
    import torch

    program = dspy.LabeledFewShot(k=args.demos).compile(
        dspy.Predict(QA), trainset=trainset(args.demos)
    )
    print(
        f"dspy {dspy.__version__}, {args.examples} examples, {args.demos} demos, adapter "
        f"{args.adapter}, max_tokens {args.max_tokens}, device {args.device}, torch threads "
        f"{torch.get_num_threads()}, {platform.processor() or platform.machine()}"
    )
    rows = {
        "radix cache on": run(args, program, disable_radix_cache=False),
        "radix cache off": run(args, program, disable_radix_cache=True),
    }
    on = rows["radix cache on"]
    header = f"{'engine':16s} {'ex/s':>7s} {'seconds':>8s} {'prompt tok':>11s} {'cache read':>11s}"
    print(header + f" {'prefilled':>10s} {'passes':>7s} {'speedup':>8s} {'same answers':>13s}")
    for name, r in rows.items():
        same = sum(a == b for a, b in zip(r["answers"], on["answers"], strict=True))
        print(
            f"{name:16s} {r['ex_s']:7.2f} {r['seconds']:8.2f} {r['prompt']:11d} "
            f"{r['cache_read']:11d} {r['prefill']:10d} {r['passes']:7d} "
            f"{r['seconds'] / on['seconds']:7.2f}x {same:6d}/{len(on['answers'])}"
        )


if __name__ == "__main__":
    main()
