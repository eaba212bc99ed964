"""A block half's all-reduce, residual add and RMSNorm in one kernel (flashinfer's TensorRT-LLM
all-reduce fusion), for the small messages of decode.

Under TP every block half ends with an all-reduce of the row-parallel layer's partial sums, then
the residual add and RMSNorm of the next half. On the one-shot path that is two kernels (the
all-reduce, then flashinfer's fused add-RMSNorm); `trtllm_allreduce_fusion` with the
`kARResidualRMSNorm` pattern does all three in one Lamport one-shot kernel: each rank writes its
partial sums into its peers' buffers over NVLink, sums what arrives, adds the residual and
normalises. Measured on two H200s (`benchmarks/tp_allreduce_kernels.py`): 4.7 us a call at one
row against 9.3 us for the two kernels. Its workspace is torch symmetric memory mapped
point-to-point (`use_symm_dev_mem=False`), never NVLink multicast. On Hopper and later it is
launched early (programmatic dependent launch), like the products before and after it
(models/gemv.py), and waits for its input in the kernel. flashinfer builds the kernel
the first time it is used on a machine (about four minutes on an H200; cached afterwards).

As for the one-shot all-reduce, every rank must take the same path for every call: `fits`
depends only on the message's shape and dtype, and `setup` enables the path on every rank or
on none.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

MAX_ROWS = 128  # decode batches; at 64 rows it measured 6.7 us against the two kernels' 13.9


class FusedAllReduceNorm:
    """The workspace of one group (collective to build) and the fused call on it."""

    def __init__(self, group: Any, rank: int, size: int, max_rows: int, hidden: int, dtype) -> None:
        from flashinfer.comm import trtllm_ar

        self.rank, self.size = rank, size
        self.max_rows, self.hidden, self.dtype = max_rows, hidden, dtype
        self._ar = trtllm_ar
        self.handles, self.workspace, self.meta = (
            trtllm_ar.trtllm_create_ipc_workspace_for_all_reduce_fusion(
                rank,
                size,
                max_rows,
                hidden,
                group=group,
                create_metadata=True,
                use_symm_dev_mem=False,
            )
        )
        self.pdl = torch.cuda.get_device_capability()[0] >= 9  # as the products around it
        self.calls = 0

    def fits(self, x: torch.Tensor) -> bool:
        """Whether `x` ([rows, hidden]) takes this path: the workspace's dtype and width, at most
        its rows."""
        return (
            x.dim() == 2
            and x.dtype == self.dtype
            and x.shape[1] == self.hidden
            and 0 < x.shape[0] <= self.max_rows
        )

    def __call__(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rmsnorm(sum of every rank's x + residual), that sum + residual), as new tensors;
        `x` and `residual` are left as they were."""
        x = x.contiguous()
        norm_out, residual_out = torch.empty_like(x), torch.empty_like(x)
        self.calls += 1
        self._ar.trtllm_allreduce_fusion(
            allreduce_in=x,
            world_size=self.size,
            world_rank=self.rank,
            token_num=x.shape[0],
            hidden_dim=self.hidden,
            workspace_ptrs=self.workspace,
            launch_with_pdl=self.pdl,
            trigger_completion_at_end=True,
            fp32_acc=True,
            pattern_code=self._ar.AllReduceFusionPattern.kARResidualRMSNorm,
            use_oneshot=True,
            allreduce_out=None,
            residual_in=residual.contiguous(),
            residual_out=residual_out,
            norm_out=norm_out,
            quant_out=None,
            scale_out=None,
            rms_gamma=weight,
            rms_eps=eps,
            scale_factor=None,
            layout_code=None,
            metadata=self.meta,
        )
        return norm_out, residual_out

    def close(self) -> None:
        """Drop the workspace's references to the peers' memory (before the group goes)."""
        self._ar.trtllm_destroy_ipc_workspace_for_all_reduce_fusion(self.handles)
        self.handles = self.workspace = None


def setup(
    device_group: Any,
    rank: int,
    size: int,
    hidden: int,
    dtype: torch.dtype,
    device: torch.device,
    agree: Any,
    max_rows: int = MAX_ROWS,
) -> FusedAllReduceNorm:
    """Build the fused path on every rank (collective, after the one-shot path is up: its
    workspace is symmetric memory over the same device group). `agree(flag)` is the minimum of
    every rank's flag over the control group, so a rank that cannot build it fails them all
    before the rendezvous. Raises RuntimeError saying why when the path is not available."""
    why = _unavailable(dtype, device)
    if not agree(int(why is None)):
        raise RuntimeError(
            f"tp_all_reduce='fused' is not available: {why or 'another rank cannot build it'}"
        )
    fused = FusedAllReduceNorm(device_group, rank, size, max_rows, hidden, dtype)
    log.info(
        "fused all-reduce + residual + RMSNorm (flashinfer trtllm) for up to %d rows", max_rows
    )
    return fused


def _unavailable(dtype: torch.dtype, device: torch.device) -> str | None:
    if device.type != "cuda":
        return "it needs CUDA devices"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"it needs bfloat16 or float16 activations, not {dtype}"
    try:
        from flashinfer.comm import trtllm_ar

        trtllm_ar.get_trtllm_comm_module()  # JIT-built here on a machine's first use
    except Exception as exc:  # noqa: BLE001 -- agreed on by the caller
        return f"flashinfer's trtllm all-reduce module cannot be loaded: {exc!r}"
    return None
