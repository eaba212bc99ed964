"""Time to first token of a short request submitted while a long prompt is being prefilled, on
the embedded SmolLM2 on the CPU (issue 17). Side by side in one run: chunked prefill off, and
on at a few chunk sizes (1024 is the CPU default); with `--mixed`, each chunked setting also
runs with `enable_mixed_chunk=True` (the short request's decode rows ride along the chunks).

    python benchmarks/bench_ttft_chunked.py [--long 2048] [--chunks -1,1024,256] [--mixed]

The long request (`--long` prompt tokens, 4 new tokens) is submitted first; 0.5 s later, while
its prefill runs, a short one (a few prompt tokens, 8 new tokens, streamed) follows. Reported per
setting: the short request's TTFT and total time, the long request's total time, the forward
passes of the pair, and whether both outputs equal their solo runs.
"""

from __future__ import annotations

import argparse
import platform
import threading
import time

import torch

GREEDY = {"temperature": 0, "ignore_eos": True}


def run_one(chunk: int, long_ids: list[int], short_ids: list[int], mixed: bool = False) -> dict:
    from sgl_engine import Engine

    with Engine(
        None,
        device="cpu",
        chunked_prefill_size=chunk,
        max_total_tokens=16384,
        enable_mixed_chunk=mixed,
    ) as eng:
        eng.generate(input_ids=short_ids[:2], sampling_params={**GREEDY, "max_new_tokens": 1})
        eng.flush_cache()
        passes0 = eng.metrics()["forward_passes"]
        out: dict = {}
        t0 = time.perf_counter()

        def long_job() -> None:
            r = eng.generate(input_ids=long_ids, sampling_params={**GREEDY, "max_new_tokens": 4})
            out["long"], out["long_s"] = r, time.perf_counter() - t0

        worker = threading.Thread(target=long_job)
        worker.start()
        time.sleep(0.5)  # the long request is admitted and its (first chunk's) prefill runs
        t1 = time.perf_counter()
        params = {**GREEDY, "max_new_tokens": 8}
        for chunk_out in eng.generate(input_ids=short_ids, sampling_params=params, stream=True):
            out.setdefault("ttft_s", time.perf_counter() - t1)
            out["short"] = chunk_out
        out["short_s"] = time.perf_counter() - t1
        worker.join()
        out["passes"] = eng.metrics()["forward_passes"] - passes0
        solo_long = eng.generate(
            input_ids=long_ids, sampling_params={**GREEDY, "max_new_tokens": 4}
        )
        solo_short = eng.generate(input_ids=short_ids, sampling_params=params)
        out["same"] = (
            solo_long["output_ids"] == out["long"]["output_ids"]
            and solo_short["output_ids"] == out["short"]["output_ids"]
        )
        return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--long", type=int, default=2048)
    parser.add_argument("--chunks", default="-1,1024,256")
    parser.add_argument("--mixed", action="store_true", help="also run each chunk size mixed")
    args = parser.parse_args()
    from sgl_engine.model_source import load_tokenizer

    tok = load_tokenizer(None)
    text = "The quick brown fox jumps over the lazy dog. " * (args.long // 8 + 1)
    long_ids = tok.encode(text)[: args.long]
    short_ids = tok.encode("What is two plus two?")
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; long prompt {len(long_ids)} tokens, "
        f"short prompt {len(short_ids)} tokens"
    )
    print(
        "| chunked_prefill_size | mixed | short TTFT s | short total s | long total s "
        "| passes | same output |"
    )
    print("|---|---|---|---|---|---|---|")
    for chunk in (int(c) for c in args.chunks.split(",")):
        for mixed in (False, True) if args.mixed and chunk != -1 else (False,):
            r = run_one(chunk, long_ids, short_ids, mixed)
            print(
                f"| {chunk} | {'on' if mixed else 'off'} | {r['ttft_s']:.2f} | "
                f"{r['short_s']:.2f} | {r['long_s']:.2f} | {r['passes']} | "
                f"{'yes' if r['same'] else 'NO'} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
