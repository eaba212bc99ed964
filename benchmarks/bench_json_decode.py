"""JSON decode (the paper's json_decode_regex workload, on CPU): extract the fields of N city
records into a JSON schema with the embedded SmolLM2. Side by side in one run, greedy:

  constrained + jump-forward | constrained, no jump-forward | unconstrained, same output length

Reports forward passes, output tokens/s, seconds, and the per-step grammar overhead (bitmask
fill, plus jump-forward where on) measured around the engine's processor.

    python benchmarks/bench_json_decode.py [--records 16] [--model PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from collections.abc import Callable

import torch

CITIES = [
    ("Paris", "France", 2.1, "Europe", True, 250),
    ("Lyon", "France", 0.5, "Europe", False, 43),
    ("Tokyo", "Japan", 14.0, "Asia", True, 1457),
    ("Osaka", "Japan", 2.7, "Asia", False, 645),
    ("Nairobi", "Kenya", 4.4, "Africa", True, 1899),
    ("Lima", "Peru", 9.7, "South America", True, 1535),
    ("Toronto", "Canada", 2.8, "North America", False, 1793),
    ("Sydney", "Australia", 5.3, "Oceania", False, 1788),
]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "country": {"type": "string", "maxLength": 24},
        "continent": {
            "enum": ["Africa", "Asia", "Europe", "North America", "South America", "Oceania"]
        },
        "is_capital": {"type": "boolean"},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 100},
        "founded": {"type": "integer", "minimum": -3000, "maximum": 2100},
    },
    "required": ["name", "country", "continent", "is_capital", "population_millions", "founded"],
}


def passage(i: int) -> str:
    name, country, pop, continent, capital, founded = CITIES[i % len(CITIES)]
    role = "the capital" if capital else "a major city"
    return (
        f"{name} is {role} of {country}, in {continent}. About {pop} million people live "
        f"there. It was founded around the year {founded}. (record {i})"
    )


def prompts(eng, n: int) -> list[str]:
    ask = "Extract the city's name, country, continent, whether it is the capital, population "
    ask += "in millions and founding year as JSON.\n\n"
    return [
        eng.apply_chat_template([{"role": "user", "content": ask + passage(i)}]) for i in range(n)
    ]


class Timer:
    """Accumulates the seconds spent in wrapped methods of one object (bench-only)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, obj: object, name: str) -> None:
        fn: Callable = getattr(obj, name)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t

        setattr(obj, name, timed)


def run(path: str | None, n: int, mode: str, lengths: list[int] | None) -> dict:
    from sgl_engine import Engine

    with Engine(
        path, device="cpu", max_total_tokens=32 * 1024, enable_jump_forward=mode == "jump"
    ) as eng:
        ps = prompts(eng, n)
        eng.generate(ps[0], {"max_new_tokens": 4, "json_schema": SCHEMA})
        eng.flush_cache()
        overhead = Timer()
        overhead.wrap(eng.processor, "fill_bitmask")
        overhead.wrap(eng.processor, "jump_forward")
        if lengths is None:
            sps: list[dict] | dict = {
                "max_new_tokens": 128,
                "temperature": 0,
                "json_schema": SCHEMA,
            }
        else:
            sps = [{"max_new_tokens": k, "temperature": 0, "ignore_eos": True} for k in lengths]
        before = eng.metrics()
        t = time.perf_counter()
        outs = eng.generate(ps, sps)
        dt = time.perf_counter() - t
        m = eng.metrics()
    passes = m["forward_passes"] - before["forward_passes"]
    tokens = sum(len(o["output_ids"]) for o in outs)
    valid = sum(_valid(o["text"]) for o in outs) if lengths is None else None
    return {
        "mode": mode,
        "seconds": dt,
        "passes": passes,
        "tokens": tokens,
        "tok_s": tokens / dt,
        "forced": m["forced_tokens"] - before["forced_tokens"],
        "saved": m["forward_passes_saved"] - before["forward_passes_saved"],
        "overhead_ms_step": 1000 * overhead.seconds / max(passes, 1),
        "step_ms": 1000 * dt / max(passes, 1),
        "valid": valid,
        "lengths": [len(o["output_ids"]) for o in outs],
        "texts": [o["text"] for o in outs],
    }


def _valid(text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=16)
    ap.add_argument("--model", default=None, help="HF folder (default: embedded SmolLM2)")
    args = ap.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    jump = run(args.model, args.records, "jump", None)
    nojump = run(args.model, args.records, "no-jump", None)
    plain = run(args.model, args.records, "unconstrained", nojump["lengths"])
    print(
        f"# json_decode: {args.records} records, greedy, SmolLM2-135M on CPU "
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
        f"{datetime.date.today()}"
    )
    head = ("mode", "seconds", "passes", "out tok", "tok/s", "forced", "saved", "ms/step")
    print("| " + " | ".join(head) + " | grammar ms/step | valid |")
    print("|" + "---|" * (len(head) + 2))
    for r in (jump, nojump, plain):
        valid = "-" if r["valid"] is None else f"{r['valid']}/{args.records}"
        print(
            f"| {r['mode']} | {r['seconds']:.2f} | {r['passes']} | {r['tokens']} | "
            f"{r['tok_s']:.1f} | {r['forced']} | {r['saved']} | {r['step_ms']:.1f} | "
            f"{r['overhead_ms_step']:.2f} | {valid} |"
        )
    same = sum(a == b for a, b in zip(jump["texts"], nojump["texts"], strict=True))
    print(f"\njump-forward vs not: {same}/{args.records} identical texts (greedy)")
    print(
        f"jump-forward speed-up: {nojump['passes'] / max(jump['passes'], 1):.2f}x fewer forward "
        f"passes, {nojump['seconds'] / jump['seconds']:.2f}x wall time"
    )
    print(f"example: {jump['texts'][0]}")


if __name__ == "__main__":
    main()
