"""Few-shot QA on the embedded SmolLM2 (CPU): a 5-shot prefix of about 1k tokens + 32 questions,
8 new tokens each. Side by side in one run: our engine, our engine with the radix cache off,
and transformers `generate` one prompt at a time.

    python benchmarks/bench_fewshot_cpu.py [--questions 32] [--skip-hf]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

TOPICS = [
    (
        "the water cycle",
        "evaporation",
        "Water evaporates from oceans, condenses into clouds and falls as rain or snow.",
    ),
    (
        "photosynthesis",
        "sunlight",
        "Plants use sunlight, water and carbon dioxide to make glucose and release oxygen.",
    ),
    (
        "the Roman Empire",
        "Rome",
        "The empire was ruled from Rome and its roads connected distant provinces.",
    ),
    ("volcanoes", "magma", "Magma rises through the crust and erupts as lava, ash and gas."),
    (
        "the printing press",
        "Gutenberg",
        "Gutenberg's movable type made books cheaper and spread literacy across Europe.",
    ),
]
QUESTIONS = [
    "What do bees make?",
    "What is the largest planet?",
    "What gas do humans breathe in?",
    "What is frozen water called?",
    "Which animal is known as the king of the jungle?",
    "What colour is the sky on a clear day?",
    "How many legs does a spider have?",
    "What is the capital of Italy?",
    "What do cows drink?",
    "What is the opposite of hot?",
    "Which season comes after winter?",
    "What is the boiling point of water in Celsius?",
    "What do you call a baby cat?",
    "Which planet is called the red planet?",
    "What instrument has 88 keys?",
    "What is the tallest animal?",
]


def few_shot_prefix() -> str:
    parts = ["Answer each question in one or two words, using the passage when it helps.\n"]
    for topic, answer, passage in TOPICS:
        body = " ".join([passage] * 10)
        parts.append(
            f"Passage about {topic}: {body}\nQuestion: What is the key word of this passage?\nAnswer: {answer}\n"
        )
    return "\n".join(parts)


def prompts(n: int) -> list[str]:
    prefix = few_shot_prefix()
    return [
        f"{prefix}\nQuestion: {QUESTIONS[i % len(QUESTIONS)]} (#{i})\nAnswer:" for i in range(n)
    ]


def run_engine(path: str, ps: list[str], **kwargs) -> dict:
    from sgl_engine import Engine

    with Engine(path, device="cpu", max_total_tokens=48 * 1024, **kwargs) as eng:
        eng.generate("warm up", {"max_new_tokens": 1})
        eng.flush_cache()
        t = time.perf_counter()
        outs = eng.generate(ps, {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True})
        dt = time.perf_counter() - t
        m = eng.metrics()
    return {
        "req_s": len(ps) / dt,
        "seconds": dt,
        "prefill": m["prefill_tokens"],
        "outs": [o["output_ids"] for o in outs],
    }


def run_hf(path: str, ps: list[str]) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prefill, outs = 0, []
    t = time.perf_counter()
    for p in ps:
        ids = torch.tensor([tok.encode(p)])
        prefill += ids.shape[1]
        out = model.generate(
            ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0
        )
        outs.append(out[0, ids.shape[1] :].tolist())
    dt = time.perf_counter() - t
    return {"req_s": len(ps) / dt, "seconds": dt, "prefill": prefill, "outs": outs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    from sgl_engine.model_source import load_tokenizer, resolve_model_path

    path = resolve_model_path(None)
    ps = prompts(args.questions)
    tok = load_tokenizer(path)
    print(
        f"prefix tokens: {len(tok.encode(few_shot_prefix()))}, prompts: {len(ps)}, "
        f"torch threads: {torch.get_num_threads()}, {platform.processor() or platform.machine()}"
    )
    rows = {
        "ours (radix cache)": run_engine(path, ps),
        "ours (radix off)": run_engine(path, ps, disable_radix_cache=True),
    }
    if not args.skip_hf:
        rows["transformers generate, one by one"] = run_hf(path, ps)
    base = rows["ours (radix cache)"]
    print(
        f"{'system':36s} {'req/s':>8s} {'seconds':>8s} {'prefill tok':>12s} {'ours is':>8s} {'same out':>8s}"
    )
    for name, r in rows.items():
        same = sum(a == b for a, b in zip(r["outs"], base["outs"], strict=True))
        print(
            f"{name:36s} {r['req_s']:8.2f} {r['seconds']:8.2f} {r['prefill']:12d} "
            f"{base['req_s'] / r['req_s']:7.1f}x {same:4d}/{len(ps)}"
        )


if __name__ == "__main__":
    main()
