"""Replicas on Ray (CPU): graph-aware + cache-aware routing against round-robin and per-leaf
cache-aware routing on a shared-prefix workload, and one replica as the reference. Counts
prefill tokens and the radix-cache hit rate summed over the replicas.

Workload: `--groups` few-shot prefixes of `--prefix-len` tokens; in each of `--rounds` rounds
every group sends one CallGraph batch of `--batch` questions (`--suffix-len` tokens each,
`--new-tokens` greedy tokens), all groups at once from threads. A second table repeats it with
batches of `--big-batch` questions, more than the router's load-balance threshold (32 in
flight), where per-leaf cache-aware routing starts splitting batches. Random token ids on a
tiny random Llama: the counters, not the text, are the result.

One Ray cluster and one set of `max(--replicas)` actors serve every row: before each row the
replicas' caches are flushed and a fresh router over the first N replicas is installed.

    python benchmarks/bench_ray_routing.py [--replicas 1 2 3] [--rounds 4]
"""

from __future__ import annotations

import argparse
import platform
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROWS = (
    (1, "graph_aware"),
    (2, "graph_aware"),
    (2, "cache_aware"),
    (2, "round_robin"),
    (2, "least_loaded"),
    (3, "graph_aware"),
    (3, "round_robin"),
)


def workload(args: argparse.Namespace) -> list[list[list[int]]]:
    """rounds x groups x batch prompts (token ids)."""
    rng = random.Random(0)
    vocab = range(3, 400)
    prefixes = [[rng.choice(vocab) for _ in range(args.prefix_len)] for _ in range(args.groups)]
    return [
        [
            [p + [rng.choice(vocab) for _ in range(args.suffix_len)] for _ in range(args.batch)]
            for p in prefixes
        ]
        for _ in range(args.rounds)
    ]


def run_row(backend, num_replicas: int, policy: str, rounds, args) -> dict:
    from sgl_plugins.graph import CallGraph
    from sgl_plugins.routing import Router, RouterConfig

    backend.replica_set.router = Router(len(backend.replicas))
    assert backend.flush_cache()  # every replica's
    backend.replica_set.router = Router(num_replicas, RouterConfig(policy=policy))
    before = backend.metrics()["replicas"]  # engine counters are cumulative: take deltas
    params = {"max_new_tokens": args.new_tokens, "temperature": 0, "ignore_eos": True}
    start = time.perf_counter()
    placements: list[set[int]] = []
    with ThreadPoolExecutor(max_workers=args.groups) as pool:
        for batches in rounds:
            graphs = [CallGraph.from_prompts(b, None, params) for b in batches]
            for results in pool.map(backend.run_graph, graphs):
                placements.append({r.meta_info["replica"] for r in results})
    seconds = time.perf_counter() - start
    after = backend.metrics()["replicas"]
    delta = {
        r: {
            k: after[r][k] - before[r][k]
            for k in ("prefill_tokens", "cached_tokens", "prompt_tokens")
        }
        for r in sorted(after)
    }
    total = {
        k: sum(d[k] for d in delta.values())
        for k in ("prefill_tokens", "cached_tokens", "prompt_tokens")
    }
    return {
        "replicas": num_replicas,
        "policy": policy,
        "prefill": total["prefill_tokens"],
        "cached": total["cached_tokens"],
        "prompt": total["prompt_tokens"],
        "hit_rate": total["cached_tokens"] / total["prompt_tokens"],
        "split_batches": sum(len(p) > 1 for p in placements),
        "batches": len(placements),
        "prompt_tokens_per_replica": [d["prompt_tokens"] for d in delta.values()],
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--prefix-len", type=int, default=384)
    parser.add_argument("--suffix-len", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--big-batch", type=int, default=48)
    args = parser.parse_args()

    import ray
    from sgl_engine.testing import make_tiny_model_dir
    from sgl_plugins.builtin.ray import RayBackend

    most = max(n for n, _ in ROWS)
    t0 = time.perf_counter()
    ray.init(num_cpus=most, include_dashboard=False, configure_logging=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(make_tiny_model_dir(f"{tmp}/llama"))
        backend = RayBackend(
            path, replicas=most, engine_kwargs={"device": "cpu", "max_total_tokens": 16384}
        )
        print(f"# {most} replicas up in {time.perf_counter() - t0:.1f} s; {platform.node()}")
        tables = []
        for batch in (args.batch, args.big_batch):
            run_args = argparse.Namespace(**{**vars(args), "batch": batch})
            rounds = workload(run_args)
            rows = [run_row(backend, n, policy, rounds, run_args) for n, policy in ROWS]
            tables.append((run_args, rows))
        backend.close()
    ray.shutdown()
    for run_args, rows in tables:
        print_table(run_args, rows)


def print_table(args: argparse.Namespace, rows: list[dict]) -> None:
    base = rows[0]
    print(
        f"\n{args.groups} prefixes x {args.prefix_len} tokens, batches of {args.batch} x "
        f"{args.suffix_len} tokens, {args.rounds} rounds, {args.new_tokens} new tokens\n"
    )
    print(
        "| replicas | routing | prefill tokens | vs 1 replica | hit rate | vs 1 replica "
        "| batches split | prompt tokens per replica | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['replicas']} | {r['policy']} | {r['prefill']:,} | "
            f"{r['prefill'] / base['prefill']:.2f}x | {r['hit_rate']:.3f} | "
            f"{r['hit_rate'] / base['hit_rate']:.2f}x | {r['split_batches']}/{r['batches']} | "
            f"{' / '.join(f'{t:,}' for t in r['prompt_tokens_per_replica'])} | "
            f"{r['seconds']:.1f} |"
        )


if __name__ == "__main__":
    main()
