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


@settings(max_examples=100, deadline=None, database=None)
@given(rows=radix_rows(), minimum=st.integers(1, 6))
def test_build_splits_decode_batches_at_the_shared_prefix(rows, minimum):
    n = len(rows)
    batch = ForwardBatch.build(
        ForwardMode.DECODE,
        [0] * n,
        [len(r) - 1 for r in rows],
        [r[-1] for r in rows],
        [1] * n,
        [len(r) - 1 for r in rows],
        rows,
        torch.device("cpu"),
        shared_prefix_min=minimum,
    )
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
