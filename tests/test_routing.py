"""The router's approximate prefix tree, the routing policies and CallGraph routing units
(pure Python, no Ray)."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sgl_plugins.graph import CallGraph
from sgl_plugins.routing import (
    NoReplicaError,
    PrefixTree,
    Router,
    RouterConfig,
    graph_units,
    prompt_units,
    subgraph,
)


def brute_match(held: dict[int, list[tuple[int, ...]]], tokens: tuple[int, ...]) -> dict:
    out = {}
    for tenant, seqs in held.items():
        best = 0
        for seq in seqs:
            n = 0
            while n < min(len(seq), len(tokens)) and seq[n] == tokens[n]:
                n += 1
            best = max(best, n)
        if best:
            out[tenant] = best
    return out


seqs = st.lists(st.integers(0, 3), min_size=1, max_size=12).map(tuple)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), seqs), min_size=1, max_size=25), seqs)
def test_match_agrees_with_brute_force(inserts, query):
    tree = PrefixTree()
    held: dict[int, list[tuple[int, ...]]] = {}
    for tenant, seq in inserts:
        tree.insert(seq, tenant)
        held.setdefault(tenant, []).append(seq)
        tree.check_integrity()
    assert tree.match(query) == brute_match(held, query)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), seqs), min_size=1, max_size=25), st.integers(0, 20))
def test_evict_bounds_a_tenant_and_keeps_the_others(inserts, limit):
    tree = PrefixTree()
    for tenant, seq in inserts:
        tree.insert(seq, tenant)
    before = {t: tree.size(t) for t in (1, 2)}
    other = [(t, s) for t, s in inserts if t != 0]
    tree.evict(0, limit)
    tree.check_integrity()
    assert tree.size(0) <= limit
    assert {t: tree.size(t) for t in (1, 2)} == before
    for _, seq in other:
        assert tree.match(seq).get(1, 0) + tree.match(seq).get(2, 0) >= 0
    tree.remove_tenant(0)
    tree.check_integrity()
    assert tree.size(0) == 0 and all(0 not in tree.match(s) for _, s in inserts)


def test_evict_drops_the_least_recently_routed_first():
    tree = PrefixTree()
    tree.insert((1, 2, 3, 4), 0)
    tree.insert((5, 6, 7, 8), 0)
    tree.insert((1, 2, 3, 4, 9), 0)  # touches the first prompt again
    assert tree.evict(0, 5) == 4
    assert tree.match((5, 6, 7, 8)) == {} and tree.match((1, 2, 3, 4, 9)) == {0: 5}


def test_round_robin_and_least_loaded_ignore_the_cache():
    rr = Router(3, RouterConfig(policy="round_robin"))
    assert [rr.route((1, 2, 3)).replica for _ in range(4)] == [0, 1, 2, 0]
    ll = Router(3, RouterConfig(policy="least_loaded"))
    picks = [ll.route((1, 2, 3)).replica for _ in range(3)]
    assert sorted(picks) == [0, 1, 2]
    ll.release(1)
    assert ll.route((9,)).replica == 1


@pytest.mark.parametrize(("balance", "hits"), [("bounded", 3), ("threshold", 4)])
def test_cache_aware_follows_the_prefix_until_the_load_is_imbalanced(balance, hits):
    config = RouterConfig(policy="cache_aware", balance=balance, balance_abs_threshold=4)
    router = Router(2, config)
    prefix = tuple(range(100))
    first = router.route(prefix + (1000,))
    assert first.reason == "room"
    other = router.route((7, 7, 7))  # no match: goes to the replica with the most room
    assert other.replica != first.replica and other.reason == "room"
    router.release(other.replica)
    followed = [router.route(prefix + (1001 + i,)) for i in range(hits)]
    assert all(d.replica == first.replica and d.reason == "cache" for d in followed)
    assert followed[0].matched_tokens == 100
    # bounded: 1 + hits in flight would pass max(4, 1.5 x mean); threshold: 5 vs 0 > 4
    spill = router.route(prefix + (2000,))
    assert spill.replica == other.replica and spill.reason == "balance"


def test_bounded_balance_keeps_a_big_unit_whole_on_an_idle_replica():
    router = Router(2, RouterConfig(policy="graph_aware", balance_abs_threshold=8))
    prefix = tuple(range(50))
    assert router.route(prefix, [prefix + (i,) for i in range(8)], weight=8).reason == "room"
    again = router.route(prefix, [prefix + (9,)], weight=1)  # 9 > max(8, 1.5 x 4.5)
    assert again.reason == "balance" and router.loads == [8, 1]


def test_a_removed_replica_gets_nothing_and_loses_its_tree():
    router = Router(2, RouterConfig(policy="graph_aware"))
    router.route((1, 2, 3, 4))
    router.remove(0)
    assert router.tree.size(0) == 0
    assert {router.route((1, 2, 3, 4)).replica for _ in range(3)} == {1}
    router.remove(1)
    with pytest.raises(NoReplicaError):
        router.route((1,))


def test_a_restored_replica_comes_back_empty_and_stale_calls_do_not_touch_it():
    router = Router(2, RouterConfig(policy="graph_aware"))
    old = router.route((1, 2, 3, 4))
    assert router.remove(old.replica, "died; restarting", epoch=old.epoch, restarting=True)
    assert not router.remove(old.replica, epoch=old.epoch)  # a second caller saw it too
    assert router.stats()["down"] == {old.replica: "died; restarting"}
    router.restore(old.replica)
    assert router.live == [0, 1] and router.tree.size(old.replica) == 0
    new = router.route((5, 6), weight=2)
    assert new.replica == old.replica and new.epoch == old.epoch + 1  # the room is there
    router.release(old.replica, 1, old.epoch)  # a late release of the old incarnation
    assert not router.remove(old.replica, epoch=old.epoch)  # nor a late failure
    assert router.loads[old.replica] == 2 and old.replica in router.live


def test_routing_waits_for_a_restarting_replica_and_says_why_none_is_left():
    router = Router(2)
    router.remove(0, "gave up", restarting=False)
    router.remove(1, "restarting", restarting=True)
    threading.Timer(0.05, router.restore, (1,)).start()
    assert router.route((1,), wait_s=30).replica == 1  # waited for the restart
    router.remove(1, "restarting", restarting=True)
    threading.Timer(0.05, router.give_up, (1, "dead after max_restarts=3")).start()
    with pytest.raises(NoReplicaError, match="replica 0: gave up; replica 1: dead after"):
        router.route((1,), wait_s=None)


def test_bad_policy_is_rejected():
    with pytest.raises(ValueError, match="unknown routing policy"):
        RouterConfig(policy="random")
    with pytest.raises(ValueError, match="unknown balance rule"):
        RouterConfig(balance="never")


def shared_graph() -> CallGraph:
    prompts = [(1, 2, 3, 4, 5, 6), (1, 2, 3, 4, 7), (1, 2, 3, 8), (9, 9, 9), (9, 9, 8), (5,)]
    return CallGraph.from_prompts(prompts, None, {"max_new_tokens": 1})


def test_graph_units_group_leaves_under_shared_nodes():
    units = graph_units(shared_graph())
    assert [u.leaves for u in units] == [(0, 1, 2), (3, 4), (5,)]
    assert [u.key for u in units] == [(1, 2, 3), (9, 9), (5,)]
    assert units[0].prompts == ((1, 2, 3, 4, 5, 6), (1, 2, 3, 4, 7), (1, 2, 3, 8))
    per_leaf = graph_units(shared_graph(), grouped=False)
    assert [u.leaves for u in per_leaf] == [(i,) for i in range(6)]
    assert per_leaf[3].key == (9, 9, 9)


def test_prompt_units_group_a_plain_batch():
    units = prompt_units([(1, 2, 3), (4,), (1, 2, 5)])
    assert [(u.leaves, u.key) for u in units] == [((0, 2), (1, 2)), ((1,), (4,))]


def test_subgraph_keeps_shared_nodes_and_leaf_options():
    graph = CallGraph()
    node = graph.add_node(graph.root, token_ids=(1, 2, 3))
    graph.add_leaf(graph.add_node(node, token_ids=(4,)), {"max_new_tokens": 2}, regex="a+")
    graph.add_leaf(graph.add_node(node, token_ids=(5,)), metadata={"k": 1})
    graph.add_leaf(graph.add_node(graph.root, token_ids=(7,)))
    sub, original = subgraph(graph, [1, 0])
    assert original == [1, 0]
    assert [sub.prompt_ids(leaf.node) for leaf in sub.leaves] == [[1, 2, 3, 5], [1, 2, 3, 4]]
    assert sub.leaves[0].metadata == {"k": 1} and sub.leaves[1].regex == "a+"
    assert len(sub.nodes) == 4  # root, the shared node and two suffixes


def test_loading_the_plugins_does_not_import_ray():
    import subprocess
    import sys

    code = (
        "import sys; from sgl_plugins.manager import PluginManager; "
        "pm = PluginManager({}, entry_points=lambda: []).load(); "
        "assert 'ray' in pm.backends() and not pm.errors; "
        "assert 'ray' not in sys.modules, 'ray was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_serve_takes_dp_and_a_router_policy():
    from sgl_adapters.cli import build_parser

    args = build_parser().parse_args(["serve", "--dp", "4", "--router-policy", "round_robin"])
    assert args.dp == 4 and args.router_policy == "round_robin"
    assert build_parser().parse_args(["serve"]).dp == 1
    assert build_parser().parse_args(["serve"]).health_interval == 10.0
    assert build_parser().parse_args(["serve", "--health-interval", "0"]).health_interval == 0


def test_fetching_the_tokenizer_from_a_dead_first_replica_does_not_deadlock():
    """`ReplicaSet.tokenizer` asks the first live replica; one that died is `lost`, which takes
    the set's lock. The tokenizer is fetched under a lock of its own (it once used the set's,
    and this deadlocked). Fakes stand in for Ray: no cluster needed."""
    import threading

    from sgl_plugins.builtin.ray.replica_set import ReplicaSet
    from sgl_plugins.routing import Router, RouterConfig

    class ActorError(Exception):
        pass

    class FakeRay:
        class exceptions:
            RayActorError = ActorError

        @staticmethod
        def get(ref, timeout=None):
            if isinstance(ref, Exception):
                raise ref
            return ref

    class Actor:
        def __init__(self, answer):
            self.tokenizer = type("Method", (), {"remote": staticmethod(lambda: answer)})

    rs = object.__new__(ReplicaSet)
    rs.ray, rs.router = FakeRay(), Router(2, RouterConfig())
    rs.replicas = [Actor(ActorError("replica 0 died")), Actor("the tokenizer")]
    rs.restarts, rs.max_restarts, rs.pids = [0, 0], 0, {}
    rs._lock, rs._tokenizer_lock = threading.Lock(), threading.Lock()
    rs._closed, rs._tokenizer = False, None
    got: list = []
    thread = threading.Thread(target=lambda: got.append(rs.tokenizer), daemon=True)
    thread.start()
    thread.join(10)
    assert got == ["the tokenizer"]
    assert rs.router.live == [1]


@pytest.mark.parametrize("end", ["shutdown", "new session"])
def test_the_health_monitor_ends_with_its_ray_session(end):
    """A set still referenced when Ray shuts down (a front door that never released it) must
    not keep sweeping dead handles: its monitor stops once Ray is down or re-initialised."""
    import threading

    from sgl_plugins.builtin.ray.replica_set import ReplicaSet

    state = {"up": True, "job": "01000000"}

    class FakeRay:
        @staticmethod
        def is_initialized():
            return state["up"]

        @staticmethod
        def get_runtime_context():
            return type("Ctx", (), {"get_job_id": staticmethod(lambda: state["job"])})

    sweeps: list[int] = []
    rs = object.__new__(ReplicaSet)
    rs.ray, rs._stop = FakeRay(), threading.Event()
    rs.sweep = lambda: sweeps.append(1) or []
    thread = threading.Thread(target=rs._watch, args=(0.01,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while len(sweeps) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert thread.is_alive() and len(sweeps) >= 3
    if end == "shutdown":
        state["up"] = False
    else:
        state["job"] = "02000000"
    thread.join(5)
    assert not thread.is_alive()
