"""SGLang-program workloads of the paper on the native frontend: radix cache on vs off.

1. MMLU-style 5-shot multiple choice: `select` over " A".." D" after a shared 5-shot prompt
   (synthetic arithmetic questions, generated deterministically; no dataset download).
2. Tree of thought: each question forks 3 thoughts, each thought forks 2 answers, then a
   `select` verdict; branches share their parent's prefix.

Both run with `run_batch` on two engines built the same way except `disable_radix_cache`.
Prints one table: wall time, prefill tokens computed, cached tokens, accuracy, speedup.

    PYTHONPATH=.:engine:plugins python benchmarks/bench_lang_mmlu_tot.py --num-questions 32
"""

from __future__ import annotations

import argparse
import platform
import random
import time
from dataclasses import dataclass

import sgl_adapters.lang as sgl

HEADER = "The following are multiple choice questions (with answers) about arithmetic.\n\n"
LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class Question:
    text: str
    options: tuple[str, ...]
    answer: str


def make_question(rng: random.Random) -> Question:
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    right = a + b
    wrong: set[int] = set()
    while len(wrong) < 3:
        w = right + rng.choice([-11, -10, -2, -1, 1, 2, 10, 11])
        if w > 0:
            wrong.add(w)
    options = [right, *sorted(wrong)]
    rng.shuffle(options)
    return Question(f"What is {a} + {b}?", tuple(map(str, options)), LETTERS[options.index(right)])


def format_question(q: Question, with_answer: bool) -> str:
    lines = [q.text] + [f"{letter}. {opt}" for letter, opt in zip(LETTERS, q.options, strict=True)]
    answer = f" {q.answer}\n\n" if with_answer else ""
    return "\n".join(lines) + "\nAnswer:" + answer


@sgl.function
def mmlu(s, shots, question):
    s += shots + question
    s += sgl.select("answer", [" A", " B", " C", " D"])


@sgl.function
def tree_of_thought(s, question, thought_tokens, answer_tokens):
    s += sgl.system("You solve arithmetic step by step.")
    s += sgl.user(question)
    thoughts = s.fork(3)
    for i, t in enumerate(thoughts):
        t += sgl.assistant_begin()
        t += f"Approach {i + 1}:" + sgl.gen("thought", max_tokens=thought_tokens, stop="\n")
        answers = t.fork(2)
        for j, a in enumerate(answers):
            a += f"\nAnswer {j + 1}:" + sgl.gen("answer", max_tokens=answer_tokens, stop="\n")
        answers.join()
        t += sgl.assistant_end()
    thoughts.join()
    s += sgl.user("Is the arithmetic easy?")
    s += sgl.assistant(sgl.select("verdict", ["yes", "no"]))


@dataclass(frozen=True)
class Row:
    workload: str
    radix: bool
    seconds: float
    prefill_tokens: int
    cached_tokens: int
    accuracy: float | None
    outputs: tuple


def run_workloads(args: argparse.Namespace, radix: bool) -> list[Row]:
    rt = sgl.Runtime(
        args.model_path,
        device=args.device,
        max_total_tokens=args.max_total_tokens,
        disable_radix_cache=not radix,
    )
    rng = random.Random(args.seed)
    shots = HEADER + "".join(format_question(make_question(rng), True) for _ in range(5))
    questions = [make_question(rng) for _ in range(args.num_questions)]
    rows = []
    try:
        rt.request({"text": "Warm up the kernels.", "sampling_params": {"max_new_tokens": 4}})
        before = rt.metrics()
        t0 = time.perf_counter()
        states = mmlu.run_batch(
            [{"shots": shots, "question": format_question(q, False)} for q in questions],
            backend=rt,
            num_threads=args.threads,
        )
        elapsed = time.perf_counter() - t0
        after = rt.metrics()
        picks = [st["answer"].strip() for st in states]
        correct = sum(p == q.answer for p, q in zip(picks, questions, strict=True))
        rows.append(
            _row(
                "mmlu 5-shot select",
                radix,
                elapsed,
                before,
                after,
                correct / len(questions),
                tuple(picks),
            )
        )

        tot_qs = [f"What is {q.text[8:-1]}? Think, then answer." for q in questions[: args.num_tot]]
        before = rt.metrics()
        t0 = time.perf_counter()
        states = tree_of_thought.run_batch(
            [
                {
                    "question": q,
                    "thought_tokens": args.thought_tokens,
                    "answer_tokens": args.answer_tokens,
                }
                for q in tot_qs
            ],
            backend=rt,
            num_threads=args.threads,
            temperature=0.0,
        )
        elapsed = time.perf_counter() - t0
        after = rt.metrics()
        errors = [st.error() for st in states if st.error() is not None]
        if errors:
            raise RuntimeError(f"tree of thought failed: {errors[0]}")
        outs = tuple((tuple(st["thought"]), st["verdict"]) for st in states)
        rows.append(_row("tree of thought (fork 3x2)", radix, elapsed, before, after, None, outs))
    finally:
        rt.shutdown()
    return rows


def _row(name, radix, elapsed, before, after, accuracy, outputs) -> Row:
    return Row(
        name,
        radix,
        elapsed,
        after["prefill_tokens"] - before["prefill_tokens"],
        after["cached_tokens"] - before["cached_tokens"],
        accuracy,
        outputs,
    )


def print_table(rows: list[Row]) -> None:
    print(
        f"\n{'workload':28} {'radix':5} {'wall s':>8} {'prefill tok':>12} {'cached tok':>11} "
        f"{'acc':>6} {'speedup':>8}"
    )
    base = {r.workload: r.seconds for r in rows if not r.radix}
    for r in rows:
        acc = "-" if r.accuracy is None else f"{r.accuracy:.2f}"
        speed = f"{base[r.workload] / r.seconds:.2f}x" if r.workload in base else "-"
        print(
            f"{r.workload:28} {'on' if r.radix else 'off':5} {r.seconds:8.2f} "
            f"{r.prefill_tokens:12d} {r.cached_tokens:11d} {acc:>6} {speed:>8}"
        )
    for name in dict.fromkeys(r.workload for r in rows):
        on = [r for r in rows if r.workload == name and r.radix]
        off = [r for r in rows if r.workload == name and not r.radix]
        if on and off:
            print(
                f"{name}: same outputs with and without the radix cache: "
                f"{on[0].outputs == off[0].outputs}"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", default=None, help="default: the embedded SmolLM2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-questions", type=int, default=32)
    p.add_argument("--num-tot", type=int, default=4)
    p.add_argument("--thought-tokens", type=int, default=24)
    p.add_argument("--answer-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--max-total-tokens", type=int, default=32768)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} "
        f"python {platform.python_version()}; device {args.device}; "
        f"{args.num_questions} mmlu questions, {args.num_tot} tree-of-thought programs"
    )
    rows = run_workloads(args, radix=True) + run_workloads(args, radix=False)
    print_table(sorted(rows, key=lambda r: (r.workload, not r.radix)))


if __name__ == "__main__":
    main()
