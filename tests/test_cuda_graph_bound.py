"""The CUDA-graph KV-index buffer bound, checked on the CPU against the batches the scheduler
really builds under memory pressure and heavy prefix sharing (issue 18's stress shape)."""

from __future__ import annotations

from types import SimpleNamespace

from sgl_engine.cuda_graph import (
    CudaGraphRunner,
    default_batch_sizes,
    graph_kv_entries,
    kv_index_capacity,
)
from sgl_engine.forward_batch import ForwardMode
from sgl_engine.testing import shared_prefix_workload, submit_concurrently

MAX_BS = 32


def _record_decode_batches(eng) -> list[list[int]]:
    """Wrap the runner's launch: the kv lengths of every decode batch, as the graphs see them."""
    seen: list[list[int]] = []
    launch = eng.runner.launch

    def spy(mode, seqs, *args, **kwargs):
        if mode is ForwardMode.DECODE:
            seen.append([len(s.kv_slots) for s in seqs])
        return launch(mode, seqs, *args, **kwargs)

    eng.runner.launch = spy
    return seen


def test_decode_batches_of_the_stress_workload_fit_the_graph_buffer(make_engine, tiny_llama):
    eng = make_engine(
        tiny_llama, max_total_tokens=1024, max_running_requests=MAX_BS, overlap_schedule=True
    )
    batches = _record_decode_batches(eng)
    work = shared_prefix_workload(96, prefixes=3, prompt_len=(16, 400), new_tokens=(1, 40))
    outs = submit_concurrently(eng, work, threads=8)
    assert [o["meta_info"]["finish_reason"]["type"] for o in outs] == ["length"] * len(work)
    m = eng.metrics()
    assert m["aborted_requests"] == 0
    assert m["overlapped_passes"] > 0, m
    sizes = default_batch_sizes(MAX_BS)
    entries = [graph_kv_entries(lens, sizes) for lens in batches if len(lens) <= MAX_BS]
    old_buffer = eng.runner.num_slots + 1 + MAX_BS
    assert max(entries) > old_buffer, "the workload no longer reproduces the shared-slot batches"
    assert max(entries) <= kv_index_capacity(MAX_BS, eng.runner.context_length)
    assert max(max(lens) for lens in batches) <= eng.runner.context_length


def test_capacity_bound_holds_for_any_rows_up_to_the_context():
    for ctx in (1, 7, 1024, 4096):
        sizes = default_batch_sizes(64)
        cap = kv_index_capacity(64, ctx)
        for n in range(1, 65):
            assert graph_kv_entries([ctx] * n, sizes) <= cap


def test_a_batch_over_the_buffer_runs_eagerly():
    graphs = CudaGraphRunner.__new__(CudaGraphRunner)
    graphs.sizes, graphs.max_kv, graphs.eager_fallbacks = [1, 2, 4], 10, 0

    def batch(lens, mode=ForwardMode.DECODE):
        return SimpleNamespace(mode=mode, seq_lens=lens, batch_size=len(lens))

    assert graphs.can_run(batch([3, 3, 3]))  # 9 + one padding row = 10
    assert not graphs.can_run(batch([4, 3, 3]))
    assert not graphs.can_run(batch([1] * 5))
    assert not graphs.can_run(batch([1], ForwardMode.EXTEND))
    assert graphs.eager_fallbacks == 1
