"""The shared-prefix split of decode batches (cascade attention's input), on the CPU: the binary
search against brute force, the uploaded tensors, and the monotonicity it relies on, checked
on the batches the real scheduler builds under prefix sharing and memory pressure."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sgl_engine.forward_batch import ForwardBatch, ForwardMode, shared_prefix_len
from sgl_engine.testing import shared_prefix_workload, submit_concurrently


def brute_force(kv: list[list[int]]) -> int:
    if len(kv) < 2:
        return 0
    n = 0
    limit = min(len(s) for s in kv) - 1
    while n < limit and all(s[n] == kv[0][n] for s in kv):
        n += 1
    return n


@st.composite
def radix_rows(draw):
    """Rows as the scheduler makes them: a path down a tree of shared nodes (each node's slots
    are its own), then the row's own slots, the last one its new token."""
    counter = iter(range(1, 1 << 20))
    depth = draw(st.integers(0, 4))
    nodes = [[next(counter) for _ in range(draw(st.integers(1, 5)))] for _ in range(depth)]
    rows = []
    for _ in range(draw(st.integers(1, 6))):
        take = draw(st.integers(0, depth))  # a row follows the shared path for `take` nodes
        path = [slot for node in nodes[:take] for slot in node]
        own = [next(counter) for _ in range(draw(st.integers(1, 4)))]
        rows.append(path + own)
    return rows


@settings(max_examples=300, deadline=None, database=None)
@given(rows=radix_rows())
def test_binary_search_equals_brute_force(rows):
    assert shared_prefix_len(rows) == brute_force(rows)


def _decode_batch(rows: list[list[int]], minimum: int, **kwargs) -> ForwardBatch:
    """A decode batch of `rows` (each row's last slot is its new token's)."""
    n = len(rows)
    return ForwardBatch.build(
        ForwardMode.DECODE,
        [0] * n,
        [len(r) - 1 for r in rows],
        [r[-1] for r in rows],
        [1] * n,
        [len(r) - 1 for r in rows],
        rows,
        torch.device("cpu"),
        shared_prefix_min=minimum,
        **kwargs,
    )


@settings(max_examples=100, deadline=None, database=None)
@given(rows=radix_rows(), minimum=st.integers(1, 6))
def test_build_splits_decode_batches_at_the_shared_prefix(rows, minimum):
    n = len(rows)
    batch = _decode_batch(rows, minimum)
    assert batch.kv_indices.tolist() == [s for r in rows for s in r]
    shared = brute_force(rows)
    if shared < minimum:
        assert batch.shared_prefix == 0 and batch.own_indices is None
        return
    assert batch.shared_prefix == shared
    indptr, own = batch.own_indptr.tolist(), batch.own_indices.tolist()
    assert [own[indptr[i] : indptr[i + 1]] for i in range(n)] == [r[shared:] for r in rows]


def test_extend_batches_are_never_split():
    rows = [[1, 2, 3], [1, 2, 4]]
    batch = ForwardBatch.build(
        ForwardMode.EXTEND, [0, 0], [2, 2], [3, 4], [1, 1], [2, 2], rows, torch.device("cpu"), 1
    )
    assert batch.shared_prefix == 0


def _checked_splits(eng, monkeypatch) -> list[int]:
    """Split every decode batch of `eng` (as cascade_attention does with decode graphs) and
    check each split against brute force; returns the shared lengths seen, as they come."""
    eng.runner.shared_prefix_min = 1
    seen = []
    build = ForwardBatch.build

    def spy(mode, *args, **kwargs):
        batch = build(mode, *args, **kwargs)
        if mode is ForwardMode.DECODE:
            rows = args[5]
            assert batch.shared_prefix == brute_force(rows), rows
            seen.append(batch.shared_prefix)
        return batch

    monkeypatch.setattr(ForwardBatch, "build", spy)
    return seen


def test_the_schedulers_decode_batches_are_monotone(make_engine, tiny_llama, monkeypatch):
    """The binary search assumes two rows holding the same slot at p share every slot before
    p. Every decode batch of a shared-prefix workload under memory pressure (retractions,
    evictions, overlap) is checked against brute force."""
    eng = make_engine(tiny_llama, max_total_tokens=1024, max_running_requests=32)
    seen = _checked_splits(eng, monkeypatch)
    work = shared_prefix_workload(48, prefixes=1, prompt_len=(40, 200), new_tokens=(2, 20))
    outs = submit_concurrently(eng, work, threads=4)
    assert all(o["meta_info"]["finish_reason"]["type"] == "length" for o in outs)
    assert max(seen) > 0, "no decode batch shared a prefix: the check checked nothing"
    eng.check_invariants()


def test_splits_stay_right_while_requests_are_aborted(make_engine, tiny_llama, monkeypatch):
    """Requests aborted mid-decode leave the batch (and free their slots) between steps: every
    later split is still the batch's true common prefix, nothing leaks, and the rest finish."""
    import itertools
    import threading
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    eng = make_engine(tiny_llama, max_total_tokens=2048, max_running_requests=32)
    seen = _checked_splits(eng, monkeypatch)
    work = shared_prefix_workload(24, prefixes=1, prompt_len=(60, 160), new_tokens=(40, 60))
    victims = {f"r{i}" for i in range(0, len(work), 3)}
    started = threading.Event()

    def one(i: int) -> dict:
        ids, new = work[i]
        sp = {"max_new_tokens": new, "temperature": 0, "ignore_eos": True}
        stream = eng.generate(input_ids=ids, sampling_params=sp, stream=True, rid=f"r{i}")
        first = next(stream)
        started.set()
        return deque(itertools.chain([first], stream), maxlen=1)[0]

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(len(work))]
        assert started.wait(30)
        for rid in sorted(victims):
            eng.abort(rid)
        outs = [f.result(timeout=120) for f in futures]
    reasons = {f"r{i}": o["meta_info"]["finish_reason"]["type"] for i, o in enumerate(outs)}
    assert "abort" in reasons.values()
    assert all(r == "length" for rid, r in reasons.items() if rid not in victims)
    assert max(seen) > 0, "no decode batch shared a prefix: the check checked nothing"
    assert eng.metrics()["running"] == 0
    eng.check_invariants()


def test_cascade_attention_defaults_to_mha_models_only():
    """None picks the split for MHA (faster on an H200 for the 7B shape) and not for GQA
    (slower there); True and False are kept."""
    from types import SimpleNamespace

    from sgl_engine.model_runner import use_cascade

    mha, gqa = (
        SimpleNamespace(num_heads=32, num_kv_heads=32),
        SimpleNamespace(num_heads=32, num_kv_heads=8),
    )
    assert use_cascade(None, mha) and not use_cascade(None, gqa)
    assert use_cascade(True, gqa) and not use_cascade(False, mha)


@settings(max_examples=100, deadline=None, database=None)
@given(rows=radix_rows(), minimum=st.integers(1, 6))
def test_split_only_builds_list_the_split_alone(rows, minimum):
    """A batch built for a cascade graph: split, it carries the shared slots and each row's own
    slots and no full lists; not split (too little shared), it carries the full lists."""
    n = len(rows)
    batch = _decode_batch(rows, minimum, split_only=True)
    shared = brute_force(rows)
    assert batch.qo_indptr.tolist() == list(range(n + 1))
    assert batch.seq_lens == [len(r) for r in rows]
    if shared < minimum:
        assert batch.shared_prefix == 0 and batch.own_indices is None
        assert batch.kv_indices.tolist() == [s for r in rows for s in r]
        assert batch.kv_indptr.tolist() == [sum(map(len, rows[:i])) for i in range(n + 1)]
        return
    assert batch.shared_prefix == shared and batch.kv_indptr is None
    assert batch.kv_indices.tolist() == rows[0][:shared]
    indptr, own = batch.own_indptr.tolist(), batch.own_indices.tolist()
    assert [own[indptr[i] : indptr[i + 1]] for i in range(n)] == [r[shared:] for r in rows]
    assert batch.positions.tolist() == [len(r) - 1 for r in rows]
    assert batch.out_cache_loc.tolist() == [r[-1] for r in rows]


def _cascade_workload() -> list[tuple[list[int], int]]:
    """Batches of every kind for decode graphs up to 16 rows: 12 rows sharing 300 slots (a
    cascade graph, until finished rows leave fewer than CASCADE_MIN_ROWS), 4 rows sharing 300
    (too few rows), 12 rows sharing 100 (too little shared), 20 rows (over the largest graph)."""
    import random

    rng = random.Random(5)

    def group(rows: int, shared: int) -> list[tuple[list[int], int]]:
        prefix = [rng.randrange(3, 400) for _ in range(shared)]
        return [
            (prefix + [rng.randrange(3, 400) for _ in range(6)], rng.randint(3, 9))
            for _ in range(rows)
        ]

    return [group(12, 300), group(4, 300), group(12, 100), group(20, 300)]


def test_cascade_bound_batches_are_split_only_and_give_the_same_outputs(
    make_engine, tiny_llama, monkeypatch
):
    """With decode graphs (HostGraphs: the real choice of graph, each replay run from only
    what that graph reads), every decode batch is checked as built: split-only exactly when
    it will replay a cascade graph, else whole and unsplit. The outputs (ids and logprobs) are
    the same as with the old layout (every batch split beside its full lists) and the ids the
    same as without graphs."""
    from sgl_engine.cuda_graph import CASCADE_MIN_PREFIX
    from sgl_engine.host_graphs import HostGraphs

    build = ForwardBatch.build
    checked: list[bool] = []
    wrong: list[list[int]] = []  # a failed check inside a step would only abort its requests

    def run(full_kv_lists: bool, graphs: bool) -> list[list[dict]]:
        eng = make_engine(tiny_llama, max_total_tokens=8192, overlap_schedule=True)
        runner = eng.runner
        if graphs:
            runner.graphs = HostGraphs(runner, max_bs=16)
            runner.shared_prefix_min = CASCADE_MIN_PREFIX
            runner.full_kv_lists = full_kv_lists

        def spy(mode, *args, **kwargs):
            batch = build(mode, *args, **kwargs)
            if mode is ForwardMode.DECODE and graphs and not full_kv_lists:
                rows = args[5]
                will = runner.graphs.cascade_bound([len(r) for r in rows])
                split = will and brute_force(rows) >= CASCADE_MIN_PREFIX
                full = [s for r in rows for s in r]
                if (
                    (batch.shared_prefix > 0) != split
                    or (batch.kv_indptr is None) != split
                    or (not split and batch.kv_indices.tolist() != full)
                ):
                    wrong.append([len(r) for r in rows])
                checked.append(split)
            return batch

        monkeypatch.setattr(ForwardBatch, "build", spy)
        sp = {"temperature": 0, "ignore_eos": True}
        outs = [
            eng.generate(
                input_ids=[ids for ids, _ in g],
                sampling_params=[{**sp, "max_new_tokens": new} for _, new in g],
                return_logprob=True,
            )
            for g in _cascade_workload()
        ]
        monkeypatch.setattr(ForwardBatch, "build", build)
        assert not wrong, f"decode batches built wrongly, of kv lengths {wrong}"
        assert all(o["meta_info"]["finish_reason"]["type"] == "length" for g in outs for o in g)
        if graphs:
            assert runner.graphs.cascade_replays > 0 and runner.graphs.plain_replays > 0
        return outs

    new, old, plain = run(False, True), run(True, True), run(False, False)
    assert True in checked and False in checked, "the workload no longer has both kinds"

    def ids(outs):
        return [[o["output_ids"] for o in g] for g in outs]

    def logprobs(outs):
        return [[o["meta_info"]["output_token_logprobs"] for o in g] for g in outs]

    assert ids(new) == ids(old) == ids(plain)
    assert logprobs(new) == logprobs(old)
