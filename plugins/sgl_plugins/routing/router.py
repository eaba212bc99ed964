"""Routing requests over replicas: round-robin, least-loaded, cache-aware and graph-aware.

The cache-aware rule is sgl-router's: while the load is balanced, send a request to the replica
whose approximate prefix tree matches the longest part of its prompt (when the match is a large
enough fraction), else to the replica holding the least cache (the most room); when the load is
imbalanced, to the least loaded replica. Graph-aware routing is cache-aware routing whose unit
is a group of leaves sharing a CallGraph node (see `groups.py`): the whole group goes to one
replica, so its shared prefix is prefilled once in the cluster.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sgl_plugins.routing.prefix_tree import PrefixTree

POLICIES = ("round_robin", "least_loaded", "cache_aware", "graph_aware")
BALANCES = ("bounded", "threshold")


class NoReplicaError(RuntimeError):
    """No replica is live (each died, is restarting or gave up); nothing can be routed."""


@dataclass(frozen=True)
class RouterConfig:
    """`cache_threshold`: the matched fraction of a prompt above which the cache decides.

    Loads count leaves in flight. `balance="bounded"` (default): a replica may take a unit
    only while its load stays within max(`balance_abs_threshold`, `balance_rel_threshold` x
    the mean load) -- the best-matching replica under that bound wins (consistent hashing
    with bounded loads). `balance="threshold"` is sgl-router's switch: while max - min >
    `balance_abs_threshold` and max > `balance_rel_threshold` x min, every unit goes to the
    least loaded replica, whatever it matches. `max_tree_tokens`: each replica's share of the
    approximate tree (about its KV capacity); 0 means unbounded."""

    policy: str = "graph_aware"
    cache_threshold: float = 0.5
    balance: str = "bounded"
    balance_abs_threshold: int = 32
    balance_rel_threshold: float = 1.5
    max_tree_tokens: int = 0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown routing policy {self.policy!r}; one of {POLICIES}")
        if self.balance not in BALANCES:
            raise ValueError(f"unknown balance rule {self.balance!r}; one of {BALANCES}")

    @property
    def graph_aware(self) -> bool:
        return self.policy == "graph_aware"

    @property
    def cache_aware(self) -> bool:
        return self.policy in ("cache_aware", "graph_aware")


@dataclass(frozen=True)
class Decision:
    replica: int
    matched_tokens: int  # of the routing key, per the approximate tree (0 unless cache-aware)
    reason: str  # "round_robin" | "least_loaded" | "cache" | "room" | "balance"
    epoch: int = 0  # the replica's incarnation when routed (see `Router.remove`)


class Router:
    """Picks a replica for each routing unit and tracks in-flight load per replica.

    Thread-safe: `route`, `release`, `remove`, `restore`, `give_up`, `unavailable`,
    `live_epochs` and `stats` take one lock
    (a condition: `route` may wait on it for a restarting replica); they mutate the loads, the
    counters, the live list and the prefix tree. A replica's epoch counts its removals, so a
    late failure or release of a call routed before a restart does not touch the new
    incarnation.
    """

    def __init__(self, num_replicas: int, config: RouterConfig | None = None) -> None:
        if num_replicas < 1:
            raise ValueError("a router needs at least one replica")
        self.config = config or RouterConfig()
        self.tree = PrefixTree()
        self.loads = [0] * num_replicas
        self.live = list(range(num_replicas))
        self.reasons: dict[str, int] = {}
        self.epochs = [0] * num_replicas
        self.down: dict[int, str] = {}  # replica not live -> why (restarting, dead)
        self.restarting: set[int] = set()
        self._next = 0
        self._lock = threading.Condition()

    @property
    def num_replicas(self) -> int:
        return len(self.loads)

    def route(
        self,
        key: Sequence[int],
        prompts: Iterable[Sequence[int]] = (),
        weight: int = 1,
        *,
        wait_s: float | None = 0.0,
    ) -> Decision:
        """Choose a replica for a unit whose shared prompt prefix is `key`; record `prompts`
        (the full prompts sent) as held by it and add `weight` to its load. With no replica
        live but some restarting, wait up to `wait_s` seconds (None: until one is back or
        none is restarting); then NoReplicaError saying why each replica is out."""
        with self._lock:
            self._lock.wait_for(lambda: self.live or not self.restarting, wait_s)
            if not self.live:
                raise NoReplicaError(self._no_replica_message())
            decision = self._choose(key, weight)
            decision = Decision(
                decision.replica,
                decision.matched_tokens,
                decision.reason,
                self.epochs[decision.replica],
            )
            replica = decision.replica
            self.loads[replica] += weight
            self.reasons[decision.reason] = self.reasons.get(decision.reason, 0) + 1
            if self.config.cache_aware:
                for prompt in prompts or (key,):
                    self.tree.insert(prompt, replica)
                if self.config.max_tree_tokens:
                    self.tree.evict(replica, int(self.config.max_tree_tokens * 0.9))
            return decision

    def release(self, replica: int, weight: int = 1, epoch: int | None = None) -> None:
        """`weight` leaves routed to `replica` (in `epoch`, when given) have finished or
        failed; a release from an earlier epoch is ignored."""
        with self._lock:
            if epoch is None or epoch == self.epochs[replica]:
                self.loads[replica] = max(0, self.loads[replica] - weight)

    def remove(
        self,
        replica: int,
        reason: str = "died",
        *,
        epoch: int | None = None,
        restarting: bool = False,
    ) -> bool:
        """Stop routing to `replica` (it died or hung) and forget what it held; `restarting`:
        it may come back (`restore`). Returns False, doing nothing, when `epoch` is given and
        is not the replica's current one or the replica is already out (another caller saw
        the same death first)."""
        with self._lock:
            if replica not in self.live or (epoch is not None and epoch != self.epochs[replica]):
                return False
            self.live.remove(replica)
            self.tree.remove_tenant(replica)
            self.loads[replica] = 0
            self.epochs[replica] += 1
            self.down[replica] = reason
            if restarting:
                self.restarting.add(replica)
            self._lock.notify_all()
            return True

    def restore(self, replica: int) -> None:
        """`replica` is back (restarted with an empty cache): route to it again, holding
        nothing in the tree and no load."""
        with self._lock:
            self.tree.remove_tenant(replica)
            self.loads[replica] = 0
            self.down.pop(replica, None)
            self.restarting.discard(replica)
            if replica not in self.live:
                self.live.append(replica)
                self.live.sort()
            self._lock.notify_all()

    def give_up(self, replica: int, reason: str) -> None:
        """`replica` will not come back; `reason` goes into NoReplicaError's message."""
        with self._lock:
            if replica in self.live:
                self.live.remove(replica)
                self.tree.remove_tenant(replica)
                self.epochs[replica] += 1
            self.down[replica] = reason
            self.restarting.discard(replica)
            self._lock.notify_all()

    def forget(self, replicas: Iterable[int]) -> None:
        """Forget what `replicas` hold (their caches were flushed); they stay live."""
        with self._lock:
            for replica in replicas:
                self.tree.remove_tenant(replica)

    def live_epochs(self) -> list[tuple[int, int]]:
        """(replica, epoch) of each live replica, read together."""
        with self._lock:
            return [(r, self.epochs[r]) for r in self.live]

    def unavailable(self) -> str | None:
        """None while a replica is live, else `NoReplicaError`'s message (why each is out)."""
        with self._lock:
            return None if self.live else self._no_replica_message()

    def stats(self) -> dict[str, object]:
        with self._lock:
            return {
                "policy": self.config.policy,
                "live_replicas": list(self.live),
                "in_flight": list(self.loads),
                "tree_tokens": [self.tree.size(r) for r in range(self.num_replicas)],
                "down": dict(self.down),
                "decisions": dict(self.reasons),
            }

    def _no_replica_message(self) -> str:
        why = "; ".join(f"replica {r}: {self.down.get(r, 'removed')}" for r in sorted(self.down))
        return "no live replica left to route to" + (f" ({why})" if why else "")

    def _choose(self, key: Sequence[int], weight: int) -> Decision:
        policy = self.config.policy
        if policy == "round_robin":
            replica = self.live[self._next % len(self.live)]
            self._next += 1
            return Decision(replica, 0, "round_robin")
        if policy == "least_loaded":
            return Decision(self._least_loaded(self.live), 0, "least_loaded")
        if self.config.balance == "threshold" and self._imbalanced():
            return Decision(self._least_loaded(self.live), 0, "balance")
        eligible = self._within_bound(weight) if self.config.balance == "bounded" else self.live
        if not eligible:
            return Decision(self._least_loaded(self.live), 0, "balance")
        matches = self.tree.match(key) if key else {}
        live_matches = {r: n for r, n in matches.items() if r in self.live}
        if live_matches:
            best = max(live_matches.values())
            if best > self.config.cache_threshold * len(key):
                tied = [r for r in eligible if live_matches.get(r) == best]
                if tied:
                    return Decision(self._least_loaded(tied), best, "cache")
                near = max(eligible, key=lambda r: (live_matches.get(r, 0), -self.loads[r]))
                return Decision(near, live_matches.get(near, 0), "balance")
        room = min(eligible, key=lambda r: (self.tree.size(r), self.loads[r], r))
        return Decision(room, live_matches.get(room, 0), "room")

    def _within_bound(self, weight: int) -> list[int]:
        cfg = self.config
        mean = (sum(self.loads[r] for r in self.live) + weight) / len(self.live)
        bound = max(cfg.balance_abs_threshold, cfg.balance_rel_threshold * mean)
        return [r for r in self.live if self.loads[r] + weight <= bound]

    def _imbalanced(self) -> bool:
        loads = [self.loads[r] for r in self.live]
        high, low = max(loads), min(loads)
        cfg = self.config
        return high - low > cfg.balance_abs_threshold and high > cfg.balance_rel_threshold * low

    def _least_loaded(self, replicas: Sequence[int]) -> int:
        return min(replicas, key=lambda r: (self.loads[r], r))
