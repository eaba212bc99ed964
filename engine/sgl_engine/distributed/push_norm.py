"""Batch-1 decode on two ranks: the row-parallel product pushes its partial sums straight into
the peer's memory, and one small kernel sums, adds the residual and normalises.

On the fused path (fused_norm.py) a block half ends with two kernels: the row-parallel product,
then the all-reduce + residual + RMSNorm kernel, which only starts sending this rank's partial
sums to the peer once the product has finished, and then waits a full NVLink hop for the
peer's. Here the product's programs store their outputs into the peer's buffer as each one
finishes (models/gemv.py, `push`), so the transfer overlaps the rest of the product, and the
kernel after it (`_build`'s) mostly finds the peer's sums already there. That kernel is launched
early (programmatic dependent launch, Hopper and later): it reads the round, the residual and the
norm weight (written by kernels that finished before the product could let it launch) and polls
for the peer's sums while the product drains, and waits for the product (`gdc_wait`) only
before it reads this rank's own sums.

The buffer is a Lamport one: each rank owns three rows of `hidden` values in symmetric memory
(`torch.distributed._symmetric_memory`, mapped point-to-point, never multicast), all -0.0 at
rest. Round r (one block half) uses row r % 3: the peer writes its partial sums there (a -0.0
result is written as +0.0), and the norm kernel polls until no element is -0.0 any more, so
every element is checked on its own and a torn store cannot pass for data. Round r then
resets row (r - 1) % 3, which is safe: the peer writes that row again only in round r + 2,
after it has read this rank's partial sums of round r + 1, which this rank sends after this
kernel. Each rank counts rounds on its device (int32 `round`, read by the product and the norm
kernel and advanced by the norm kernel), so CUDA graphs replay the rotation correctly.

Both ranks must take this path for the same rounds: `fits` depends only on the shape of the
message, which is the same on both ranks, and `setup` enables it on both or on neither. It is
for one row (the products' one-row kernel) on two ranks on Hopper or later; everything else
keeps the fused path.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch

from sgl_engine.models.gemv import gemv, hopper_triton_missing, pdl_supported

log = logging.getLogger(__name__)

SLOTS = 3
EMPTY = -32768  # the bits of a bfloat16 or float16 -0.0 as int16 (the kernel spells it out)


@functools.cache
def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def norm_kernel(
        mine_ptr,
        buf_ptr,
        round_ptr,
        res_ptr,
        w_ptr,
        norm_ptr,
        res_out_ptr,
        H,
        eps,
        BLOCK: tl.constexpr,
        PDL: tl.constexpr,
    ):
        offs = tl.arange(0, BLOCK)
        mask = offs < H
        rnd = tl.load(round_ptr)
        res = tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        row = buf_ptr + (rnd % 3) * H + offs
        bits = tl.load(row, mask=mask, other=0, volatile=True)
        while tl.max((bits == -32768).to(tl.int32), axis=0) > 0:
            bits = tl.load(row, mask=mask, other=0, volatile=True)
        if PDL:
            tl.extra.cuda.gdc_wait()
        dtype = norm_ptr.dtype.element_ty
        peer = bits.to(dtype, bitcast=True).to(tl.float32)
        mine = tl.load(mine_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        total = (mine + peer) + res
        tl.store(res_out_ptr + offs, total.to(dtype), mask=mask)
        var = tl.sum(total * total, axis=0) / H
        out = total * tl.rsqrt(var + eps) * w
        tl.store(norm_ptr + offs, out.to(dtype), mask=mask)
        empty = tl.full([BLOCK], -32768, tl.int16)
        tl.store(buf_ptr + ((rnd + 2) % 3) * H + offs, empty, mask=mask)
        tl.store(round_ptr, rnd + 1)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()

    return norm_kernel


class PushAllReduceNorm:
    """This rank's Lamport buffer, its view of the peer's, and the round counter. Collective to
    build (`setup`). `product` and `__call__` must alternate, in the same order on both ranks."""

    def __init__(self, handle: Any, buffer: torch.Tensor, rank: int, hidden: int) -> None:
        self.hidden = hidden
        self.dtype = buffer.dtype
        self.buffer = buffer.view(torch.int16).view(SLOTS, hidden)
        self.peer = handle.get_buffer(1 - rank, (SLOTS, hidden), buffer.dtype)
        self.handle = handle
        self.round = torch.zeros(1, dtype=torch.int32, device=buffer.device)
        self.pdl = pdl_supported(buffer.device)
        self.block = 1 << (hidden - 1).bit_length()  # the kernel's one block: the whole row
        self.warps = max(4, min(16, self.block // 256))
        self._pushed: torch.Tensor | None = None
        self._tuned: set[int] = set()
        self.calls = 0

    def fits(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether the product x @ weight^T takes this path: one row, this buffer's width and
        dtype."""
        return (
            x.dim() == 2
            and x.shape[0] == 1
            and weight.shape[0] == self.hidden
            and x.dtype == self.dtype
            and weight.dtype == self.dtype
        )

    def product(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """This rank's partial sums x @ weight^T ([1, hidden]), also pushed to the peer."""
        k = weight.shape[1]  # with N fixed at `hidden`, K names the shape
        if k not in self._tuned:  # autotune without pushing (the tuner runs every config)
            gemv(x, weight)
            self._tuned.add(k)
        y = gemv(x, weight, push=(self.peer, self.round))
        self._pushed = y
        return y

    def took(self, x: torch.Tensor) -> bool:
        """Whether `x` is the partial sums `product` pushed last (and not yet reduced)."""
        return self._pushed is not None and x is self._pushed

    def __call__(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rmsnorm(x + peer's x + residual), x + peer's x + residual) for the `x` that
        `product` returned; advances the round."""
        self._pushed = None
        self.calls += 1
        norm_out, res_out = torch.empty_like(x), torch.empty_like(x)
        _build()[(1,)](
            x,
            self.buffer,
            self.round,
            residual.contiguous(),
            weight,
            norm_out,
            res_out,
            self.hidden,
            eps,
            BLOCK=self.block,
            PDL=self.pdl,
            num_warps=self.warps,
            launch_pdl=self.pdl,
        )
        return norm_out, res_out

    def close(self) -> None:
        """Drop the references to the peer's memory (before the group goes)."""
        self.peer = self.handle = None


def setup(
    device_group: Any,
    rank: int,
    size: int,
    hidden: int,
    dtype: torch.dtype,
    device: torch.device,
    agree: Any,
) -> PushAllReduceNorm:
    """Build the path on both ranks or on neither (collective). Raises RuntimeError saying why
    when it is not available on every rank."""
    why = _unavailable(size, dtype, device)
    buffer = None
    if why is None:
        try:
            from torch.distributed import _symmetric_memory as symm_mem

            os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
            buffer = symm_mem.empty(SLOTS * hidden, dtype=dtype, device=device)
            buffer.view(torch.int16).fill_(EMPTY)
        except Exception as exc:  # noqa: BLE001 -- agreed on below
            why = f"symmetric buffer allocation failed: {exc!r}"
    if not agree(int(why is None)):
        raise RuntimeError(
            f"tp_all_reduce='push' is not available: {why or 'another rank cannot build it'}"
        )
    from torch.distributed import _symmetric_memory as symm_mem

    try:
        handle = symm_mem.rendezvous(buffer, device_group.group_name)
        ok = True
    except Exception as exc:  # noqa: BLE001 -- agreed on below
        ok, why = False, f"rendezvous failed: {exc!r}"
    if not agree(int(ok)):
        raise RuntimeError(
            f"tp_all_reduce='push' is not available: {why or 'another rank failed to map it'}"
        )
    torch.cuda.synchronize(device)
    agree(1)  # both buffers are empty before either rank pushes
    log.info("batch-1 products push their partial sums to the peer (%d wide)", hidden)
    return PushAllReduceNorm(handle, buffer, rank, hidden)


def _unavailable(size: int, dtype: torch.dtype, device: torch.device) -> str | None:
    if size != 2:
        return f"it is for two ranks, not {size}"
    return hopper_triton_missing(device, dtype)
