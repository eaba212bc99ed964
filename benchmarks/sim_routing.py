"""Routing simulation: synthetic agent traffic over 8..256 simulated replicas.

Each simulated replica holds the engine's real `RadixCache` (sgl_engine.radix_cache) over a
free list of `--kv-tokens` KV slots, and the policies are the real router
(`sgl_plugins.routing.Router`, its approximate prefix tree and CallGraph units) -- nothing is
re-implemented here but the traffic and a queue model.

Traffic (token ids, seeded): agents with system prompts and few-shot templates whose popularity
is Zipf-skewed (`--zipf`); multi-turn sessions (each turn's prompt is the previous prompt, the
previous answer and a new user message, so the engine's cache -- which holds answers -- knows
more than the router's tree, which sees prompts only); few-shot batches (one CallGraph of 4-32
questions under a shared template); one-off calls under a popular system prompt. The number of
agents, templates and sessions grows with the replica count.

Queue model: a replica is one FIFO server doing `--tokens-per-s` tokens of work per second, a
call costing its uncached prompt tokens + `--decode-weight` x its output tokens; arrivals are
timed for `--utilisation` of the cluster when nothing is cached. A call's load (for the
router) lasts from its routing until it finishes.

Reported per (replicas, policy): cache hit rate (cached / prompt tokens), prefill tokens per
call, load imbalance (max / mean work per replica; 1.0 is even), the share of few-shot batches
whose leaves landed on more than one replica, and mean latency.

    python benchmarks/sim_routing.py [--replicas 8 16 32 64 128 256] [--calls-per-replica 120]
"""

from __future__ import annotations

import argparse
import heapq
import random
import time
from dataclasses import dataclass

from sgl_engine.radix_cache import RadixCache
from sgl_plugins.routing import POLICIES, Router, RouterConfig, prompt_units
from sgl_plugins.routing.router import BALANCES

VOCAB = 32000


@dataclass(frozen=True)
class Event:
    """A call arriving at `time`: one or more leaf prompts (a batch shares its template)."""

    time: float
    kind: str
    prompts: tuple[tuple[int, ...], ...]
    outputs: tuple[tuple[int, ...], ...]


# -- traffic ----------------------------------------------------------------------------------


def _tokens(rng: random.Random, n: int) -> tuple[int, ...]:
    return tuple(rng.randrange(VOCAB) for _ in range(n))


def _zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (i + 1) ** s for i in range(n)]


def make_traffic(num_replicas: int, args: argparse.Namespace) -> list[Event]:
    """Untimed events in arrival order (times are set by `time_events`)."""
    rng = random.Random(args.seed)
    agents = [_tokens(rng, rng.randint(200, 800)) for _ in range(4 * num_replicas)]
    templates = [_tokens(rng, rng.randint(400, 1200)) for _ in range(num_replicas)]
    agent_w = _zipf_weights(len(agents), args.zipf)
    template_w = _zipf_weights(len(templates), args.zipf)
    total = args.calls_per_replica * num_replicas
    events: list[tuple[float, int, Event]] = []
    seq = 0
    clock = 0.0
    while len(events) < total:
        clock += rng.expovariate(1.0)
        kind = rng.choices(("session", "batch", "oneoff"), weights=(0.55, 0.2, 0.25))[0]
        if kind == "session":
            (agent,) = rng.choices(agents, agent_w)
            history = agent
            t = clock
            for _ in range(1 + min(int(rng.expovariate(1 / 3)), 12)):
                prompt = history + _tokens(rng, rng.randint(20, 120))
                answer = _tokens(rng, rng.randint(30, 200))
                events.append((t, seq, Event(0.0, "session", (prompt,), (answer,))))
                seq += 1
                history = prompt + answer
                t += rng.expovariate(1 / 8.0)  # think time, in arrival-clock units
        elif kind == "batch":
            (template,) = rng.choices(templates, template_w)
            n = rng.randint(4, 32)
            prompts = tuple(template + _tokens(rng, rng.randint(20, 60)) for _ in range(n))
            outputs = tuple(_tokens(rng, rng.randint(5, 30)) for _ in range(n))
            events.append((clock, seq, Event(0.0, "batch", prompts, outputs)))
            seq += 1
        else:
            (agent,) = rng.choices(agents, agent_w)
            prompt = agent + _tokens(rng, rng.randint(20, 200))
            events.append((clock, seq, Event(0.0, "oneoff", (prompt,), (_tokens(rng, 50),))))
            seq += 1
    events.sort()
    return [e for _, _, e in events[:total]], [t for t, _, _ in events[:total]]


def time_events(events: list[Event], clocks: list[float], num_replicas: int, args) -> list[Event]:
    """Scale arrival clocks so the uncached work keeps the cluster `--utilisation` busy."""
    work = sum(
        sum(len(p) for p in e.prompts) + args.decode_weight * sum(len(o) for o in e.outputs)
        for e in events
    )
    duration = work / (args.tokens_per_s * num_replicas * args.utilisation)
    scale = duration / (clocks[-1] or 1.0)
    return [
        Event(c * scale, e.kind, e.prompts, e.outputs) for e, c in zip(events, clocks, strict=True)
    ]


# -- replicas -----------------------------------------------------------------------------------


class SimReplica:
    """A replica: the engine's RadixCache over `kv_tokens` slots, and a FIFO work queue."""

    def __init__(self, kv_tokens: int) -> None:
        self.free = list(range(kv_tokens))
        self.cache = RadixCache(self.free.extend)
        self.busy_until = 0.0
        self.work = 0.0
        self.prompt_tokens = 0
        self.cached_tokens = 0

    def run(self, prompt: tuple[int, ...], output: tuple[int, ...]) -> int:
        """Serve one call (cache-wise); returns its uncached prompt tokens."""
        match = self.cache.match_prefix(prompt)
        cached = len(match.indices)
        full = prompt + output
        need = len(full) - cached
        if need > len(self.free):
            self.cache.evict(need - len(self.free))
        need = min(need, len(self.free))  # a call longer than the pool: keep what fits
        slots = match.indices + [self.free.pop() for _ in range(need)]
        stored = len(slots)
        already = self.cache.insert(full[:stored], slots)
        self.free.extend(slots[cached:already])  # duplicates of what the tree already had
        self.prompt_tokens += len(prompt)
        self.cached_tokens += cached
        return len(prompt) - cached


def simulate(events: list[Event], num_replicas: int, policy: str, args) -> dict:
    config = RouterConfig(
        policy=policy,
        balance=args.balance,
        balance_abs_threshold=args.balance_abs,
        balance_rel_threshold=args.balance_rel,
        max_tree_tokens=args.kv_tokens,
    )
    router = Router(num_replicas, config)
    replicas = [SimReplica(args.kv_tokens) for _ in range(num_replicas)]
    finishing: list[tuple[float, int, int]] = []  # (finish time, replica, weight)
    latencies: list[float] = []
    prefill = calls = split = batches = 0
    for event in events:
        while finishing and finishing[0][0] <= event.time:
            _, r, w = heapq.heappop(finishing)
            router.release(r, w)
        placed = set()
        for unit in prompt_units(event.prompts, grouped=config.graph_aware):
            decision = router.route(unit.key, unit.prompts, len(unit.leaves))
            placed.add(decision.replica)
            replica = replicas[decision.replica]
            uncached = sum(replica.run(event.prompts[i], event.outputs[i]) for i in unit.leaves)
            decode = sum(len(event.outputs[i]) for i in unit.leaves)
            work = uncached + args.decode_weight * decode
            start = max(event.time, replica.busy_until)
            replica.busy_until = start + work / args.tokens_per_s
            replica.work += work
            heapq.heappush(finishing, (replica.busy_until, decision.replica, len(unit.leaves)))
            latencies.extend([replica.busy_until - event.time] * len(unit.leaves))
            prefill += uncached
            calls += len(unit.leaves)
        if event.kind == "batch":
            batches += 1
            split += len(placed) > 1
    prompt = sum(r.prompt_tokens for r in replicas)
    works = [r.work for r in replicas]
    return {
        "replicas": num_replicas,
        "policy": policy,
        "calls": calls,
        "hit_rate": sum(r.cached_tokens for r in replicas) / prompt,
        "prefill_per_call": prefill / calls,
        "imbalance": max(works) / (sum(works) / len(works)),
        "latency": sum(latencies) / len(latencies),
        "split_batches": split / batches if batches else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--calls-per-replica", type=int, default=120)
    parser.add_argument("--kv-tokens", type=int, default=16384, help="KV slots per replica")
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--tokens-per-s", type=float, default=20000.0)
    parser.add_argument("--decode-weight", type=float, default=10.0)
    parser.add_argument("--utilisation", type=float, default=0.7)
    parser.add_argument("--balance", default="bounded", choices=BALANCES)
    parser.add_argument("--balance-abs", type=int, default=32)
    parser.add_argument("--balance-rel", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(
        "| replicas | policy | calls | hit rate | prefill tokens / call | load imbalance "
        "(max/mean) | batches split | mean latency s | sim s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.replicas:
        raw, clocks = make_traffic(n, args)
        events = time_events(raw, clocks, n, args)
        for policy in args.policies:
            t0 = time.perf_counter()
            r = simulate(events, n, policy, args)
            print(
                f"| {n} | {policy} | {r['calls']:,} | {r['hit_rate']:.3f} | "
                f"{r['prefill_per_call']:,.0f} | {r['imbalance']:.2f} | "
                f"{r['split_batches']:.0%} | {r['latency']:.2f} | "
                f"{time.perf_counter() - t0:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
