"""One block half's communication on two GPUs, side by side: all-reduce, residual add, RMSNorm.

What a TP=2 decode step does 64 times (7B shape: two per layer) for each path:
  nccl      NCCL all-reduce, then flashinfer's fused add+RMSNorm (two kernels)
  one_shot  torch symmetric memory's one-shot all-reduce (ours today), then the same norm
  fused     flashinfer's TensorRT-LLM all-reduce fusion, one Lamport one-shot kernel doing the
            all-reduce, the residual add and the RMSNorm (pattern kARResidualRMSNorm)
Each path is captured in a CUDA graph of `--iters` calls and replayed; the time per call is the
graph's time over the calls. The fused path's outputs are compared with one_shot's (bf16).
Its workspace is torch symmetric memory (`use_symm_dev_mem=False`): never NVLink multicast,
which must not be created on the shared hosts (a guard makes any cuMulticastCreate raise).

  python3 benchmarks/tp_allreduce_kernels.py --rows 1,8,64
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HIDDEN = 4096
EPS = 1e-5


def _no_multicast() -> None:
    def refuse(*args, **kwargs):
        raise RuntimeError("cuMulticastCreate called: refused on this host")

    for name in ("cuda.bindings.driver", "cuda.cuda"):
        try:
            mod = __import__(name, fromlist=["cuMulticastCreate"])
        except ImportError:
            continue
        if hasattr(mod, "cuMulticastCreate"):
            mod.cuMulticastCreate = refuse


def capture(fn, calls: int = 1, warmups: int = 3):
    """(a CUDA graph of `calls` calls of `fn`, what the last captured call returned), after
    `warmups` eager calls on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph, out = torch.cuda.CUDAGraph(), None
    with torch.cuda.graph(graph):
        for _ in range(calls):
            out = fn()
    return graph, out


def graph_us(fn, iters: int, reps: int, before=None) -> float:
    """us per call of `fn` replayed from a CUDA graph of `iters` calls, `reps` times (`before()`
    runs once between capture and timing: the ranks' barrier here)."""
    graph, _ = capture(fn, iters)
    graph.replay()
    torch.cuda.synchronize()
    if before is not None:
        before()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (iters * reps)


def _measure(rows, rank, world, group, buffer, workspace, meta, gamma, iters) -> dict:
    import flashinfer
    from flashinfer.comm import trtllm_ar

    dev, dtype = buffer.device, buffer.dtype
    gen = torch.Generator(device=dev).manual_seed(100 + rank)
    x = torch.randn(rows, HIDDEN, dtype=dtype, device=dev, generator=gen)
    res0 = torch.randn(
        rows, HIDDEN, dtype=dtype, device=dev, generator=torch.Generator(device=dev).manual_seed(7)
    )

    def one_shot_ref():
        y = torch.ops.symm_mem.one_shot_all_reduce_copy(
            buffer[: rows * HIDDEN].view(rows, HIDDEN), x, "sum", group.group_name
        )
        r = res0.clone()
        flashinfer.norm.fused_add_rmsnorm(y, r, gamma, EPS)
        return y, r

    xa, ra, rb = x.clone(), res0.clone(), res0.clone()

    def nccl():  # in place, as the engine does: the normed output feeds the next
        dist.all_reduce(xa)
        flashinfer.norm.fused_add_rmsnorm(xa, ra, gamma, EPS)

    def one_shot():
        y = torch.ops.symm_mem.one_shot_all_reduce_copy(
            buffer[: rows * HIDDEN].view(rows, HIDDEN), x, "sum", group.group_name
        )
        flashinfer.norm.fused_add_rmsnorm(y, rb, gamma, EPS)

    norm_out, res_out = torch.empty_like(x), torch.empty_like(x)

    def fused():
        trtllm_ar.trtllm_allreduce_fusion(
            allreduce_in=x,
            world_size=world,
            world_rank=rank,
            token_num=rows,
            hidden_dim=HIDDEN,
            workspace_ptrs=workspace,
            launch_with_pdl=False,
            trigger_completion_at_end=True,
            fp32_acc=True,
            pattern_code=trtllm_ar.AllReduceFusionPattern.kARResidualRMSNorm,
            use_oneshot=True,
            allreduce_out=None,
            residual_in=res0,
            residual_out=res_out,
            norm_out=norm_out,
            quant_out=None,
            scale_out=None,
            rms_gamma=gamma,
            rms_eps=EPS,
            scale_factor=None,
            layout_code=None,
            metadata=meta,
        )
        return norm_out, res_out

    ref_norm, ref_res = one_shot_ref()
    got_norm, got_res = fused()
    torch.cuda.synchronize()
    row = {
        "max_abs_diff_norm": (got_norm.float() - ref_norm.float()).abs().max().item(),
        "max_abs_diff_residual": (got_res.float() - ref_res.float()).abs().max().item(),
    }
    for name, fn in (("nccl", nccl), ("one_shot", one_shot), ("fused", fused)):
        row[f"{name}_us"] = graph_us(fn, iters, 20, before=dist.barrier)
    return row


def worker(rank: int, world: int, init: str, rows_list: list[int], out: str, iters: int) -> None:
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    _no_multicast()
    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl", init_method=init, rank=rank, world_size=world, device_id=torch.device("cuda", rank)
    )
    group = dist.group.WORLD
    from flashinfer.comm import trtllm_ar
    from torch.distributed import _symmetric_memory as symm_mem

    dev, dtype = torch.device("cuda", rank), torch.bfloat16
    max_rows = max(rows_list)
    buffer = symm_mem.empty(max_rows * HIDDEN, dtype=dtype, device=dev)
    symm_mem.rendezvous(buffer, group.group_name)
    ipc, workspace, meta = trtllm_ar.trtllm_create_ipc_workspace_for_all_reduce_fusion(
        rank, world, max_rows, HIDDEN, group=group, create_metadata=True, use_symm_dev_mem=False
    )
    gamma = torch.randn(
        HIDDEN, dtype=dtype, device=dev, generator=torch.Generator(dev).manual_seed(3)
    )
    results: dict = {}
    for rows in rows_list:
        row = _measure(rows, rank, world, group, buffer, workspace, meta, gamma, iters)
        results[rows] = row
        if rank == 0:
            print(json.dumps({f"rows {rows}": row}), flush=True)
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(results, fh)
    dist.barrier()
    torch.cuda.synchronize()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,8,64")
    ap.add_argument("--iters", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    tmp = tempfile.mkdtemp()
    import time

    from flashinfer.comm import trtllm_ar

    t = time.perf_counter()
    trtllm_ar.get_trtllm_comm_module()  # JIT-built once here, not by both ranks at once
    print(f"trtllm comm module ready in {time.perf_counter() - t:.1f} s", flush=True)
    out = args.json or os.path.join(tmp, "out.json")
    mp.start_processes(
        worker, (2, f"file://{tmp}/rdv", rows, out, args.iters), nprocs=2, start_method="spawn"
    )
    print(open(out).read())


if __name__ == "__main__":
    main()
