"""Serving benchmark: streaming clients against an OpenAI-compatible server (ours or any other).

Requests are sent at `--request-rate` per second (Poisson arrivals; inf = all at once), at most
`--max-concurrency` in flight, over /v1/completions with SSE. Reported: throughput, TTFT (time
to first token), TPOT (time per output token after the first), ITL (gaps between streamed
chunks), end-to-end latency as mean/p50/p90/p99, and the server's cached-token share.

Dataset `shared-prefix`: `--num-groups` long system prompts, each shared by its group's requests
(the workload RadixAttention is made for); `random`: unrelated prompts.

  python benchmarks/bench_serving.py --launch --model <hf folder> --num-prompts 64
  python benchmarks/bench_serving.py --base-url http://127.0.0.1:30000 --request-rate 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import httpx

WORDS = (
    "radix tree prefix cache token model server batch stream schedule decode prefill memory "
    "kernel attention query answer question fox river mountain city language program"
).split()


@dataclass(frozen=True)
class Request:
    prompt: str
    max_tokens: int


@dataclass
class Outcome:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str = ""


def make_dataset(args: argparse.Namespace) -> list[Request]:
    rng = random.Random(args.seed)

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    systems = [f"System {g}: {words(args.prefix_words)}\n" for g in range(args.num_groups)]
    out = []
    for i in range(args.num_prompts):
        question = f"Question {i}: {words(args.question_words)}?\nAnswer:"
        prefix = systems[i % args.num_groups] if args.dataset == "shared-prefix" else ""
        if args.dataset == "random":
            prefix = f"Context {i}: {words(args.prefix_words)}\n"
        out.append(Request(prefix + question, args.output_len))
    return out


async def send(client: httpx.AsyncClient, req: Request, model: str) -> Outcome:
    body = {
        "model": model,
        "prompt": req.prompt,
        "max_tokens": req.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    last = start
    out = Outcome(ok=False)
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                return Outcome(ok=False, error=f"HTTP {resp.status_code}")
            async for line in resp.aiter_lines():
                data = line.removeprefix("data: ")
                if not line or data == "[DONE]":
                    continue
                event = json.loads(data)
                now = time.perf_counter()
                if event.get("choices") and event["choices"][0].get("text"):
                    if out.ttft == 0.0:
                        out.ttft = now - start
                    else:
                        out.itl.append(now - last)
                    last = now
                if event.get("usage"):
                    u = event["usage"]
                    out.output_tokens = u["completion_tokens"]
                    out.prompt_tokens = u["prompt_tokens"]
                    out.cached_tokens = (u.get("prompt_tokens_details") or {}).get(
                        "cached_tokens", 0
                    )
    except httpx.HTTPError as exc:
        return Outcome(ok=False, error=repr(exc))
    out.latency = time.perf_counter() - start
    out.ok = True
    return out


async def run(args: argparse.Namespace, base_url: str, dataset: list[Request]) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.max_concurrency)
    rng = random.Random(args.seed + 1)
    gate = asyncio.Semaphore(args.max_concurrency)
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=args.timeout, limits=limits
    ) as client:

        async def limited(req: Request) -> Outcome:
            async with gate:
                return await send(client, req, args.model_name)

        tasks = []
        start = time.perf_counter()
        for req in dataset:
            tasks.append(asyncio.create_task(limited(req)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        outcomes = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(outcomes, duration)


def _pcts(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    qs = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    ms = 1000.0
    return {
        "mean": statistics.fmean(values) * ms,
        "p50": qs[49] * ms,
        "p90": qs[89] * ms,
        "p99": qs[98] * ms,
    }


def summarize(outcomes: list[Outcome], duration: float) -> dict:
    ok = [o for o in outcomes if o.ok]
    out_tokens = sum(o.output_tokens for o in ok)
    prompt_tokens = sum(o.prompt_tokens for o in ok)
    tpot = [
        (o.latency - o.ttft) / (o.output_tokens - 1) for o in ok if o.output_tokens > 1 and o.ttft
    ]
    return {
        "completed": len(ok),
        "failed": len(outcomes) - len(ok),
        "errors": sorted({o.error for o in outcomes if not o.ok})[:3],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + prompt_tokens) / duration,
        "prompt_tokens": prompt_tokens,
        "output_tokens": out_tokens,
        "cached_share": sum(o.cached_tokens for o in ok) / prompt_tokens if prompt_tokens else 0,
        "ttft_ms": _pcts([o.ttft for o in ok]),
        "tpot_ms": _pcts(tpot),
        "itl_ms": _pcts([gap for o in ok for gap in o.itl]),
        "e2e_ms": _pcts([o.latency for o in ok]),
    }


def print_report(result: dict, args: argparse.Namespace) -> None:
    print(
        f"dataset={args.dataset} prompts={args.num_prompts} rate={args.request_rate} "
        f"concurrency={args.max_concurrency} output_len={args.output_len}"
    )
    for key in (
        "completed",
        "failed",
        "duration_s",
        "request_throughput",
        "output_throughput",
        "total_token_throughput",
        "cached_share",
    ):
        value = result[key]
        print(f"  {key:24s} {value:.3f}" if isinstance(value, float) else f"  {key:24s} {value}")
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        p = result[key]
        print(
            f"  {key:24s} mean {p['mean']:8.1f}  p50 {p['p50']:8.1f}  "
            f"p90 {p['p90']:8.1f}  p99 {p['p99']:8.1f}"
        )
    if result["errors"]:
        print("  errors:", result["errors"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base-url", default=None, help="a running server (else --launch)")
    p.add_argument("--launch", action="store_true", help="start our server in-process")
    p.add_argument("--model", default=None, help="model for --launch (default: embedded)")
    p.add_argument("--model-name", default="default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-total-tokens", type=int, default=32768)
    p.add_argument("--disable-radix-cache", action="store_true")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset", choices=("shared-prefix", "random"), default="shared-prefix")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--num-groups", type=int, default=4)
    p.add_argument("--prefix-words", type=int, default=200)
    p.add_argument("--question-words", type=int, default=12)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--request-rate", type=float, default=float("inf"))
    p.add_argument("--max-concurrency", type=int, default=16)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dataset = make_dataset(args)
    if args.base_url:
        result = asyncio.run(run(args, args.base_url, dataset))
    elif args.launch:
        from sgl_engine import Engine
        from sgl_engine.server import ServerThread, create_app

        eng = Engine(
            args.model,
            device=args.device,
            max_total_tokens=args.max_total_tokens,
            disable_radix_cache=args.disable_radix_cache,
        )
        try:
            app = create_app(eng, api_key=args.api_key, model_name=args.model_name)
            with ServerThread(app) as srv:
                result = asyncio.run(run(args, srv.base_url, dataset))
            result["engine"] = eng.metrics()
        finally:
            eng.shutdown()
    else:
        print("give --base-url or --launch", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result, args)
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
