"""Checks of the batch-1 Triton kernels under Triton's interpreter, one per process:
`python tests/triton_interpreted.py NAME` (TRITON_INTERPRET=1 must be set before triton is
imported, so tests/test_triton_kernels_interpreted.py runs each check in a process of its own).
Kernels are built without autotuning (explicit block sizes) and without programmatic dependent
launch, which the interpreter does not model."""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

EMPTY = -32768  # bf16 -0.0 as int16: an empty slot of the push buffer


def _kernels():
    from sgl_engine.distributed import push_norm
    from sgl_engine.models import gemv

    return gemv._build().fn, push_norm._build()


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """bf16's spacing at |x| (8 bits of mantissa)."""
    return torch.ldexp(torch.ones_like(x), torch.frexp(x.abs().clamp_min(1e-30))[1] - 8)


def _gemv(kernel, x, w, peer=None, rnd=0, block_n=8, block_k=128):
    n, k = w.shape
    y = torch.empty((1, n), dtype=x.dtype)
    push = peer is not None
    round_ = torch.tensor([rnd], dtype=torch.int32)
    kernel[(triton.cdiv(n, block_n),)](
        x, w, y, peer if push else y, round_, n, k, w.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, PDL=False, PUSH=push,
    )  # fmt: skip
    return y


def gemv_matches_an_fp32_product_on_masked_shapes(kernels):
    for n, k, block_n, block_k in ((77, 300, 8, 128), (16, 64, 16, 64)):
        gen = torch.Generator().manual_seed(n)
        x = torch.randn(1, k, generator=gen).bfloat16()
        w = torch.randn(n, k, generator=gen).bfloat16()
        y = _gemv(kernels[0], x, w, block_n=block_n, block_k=block_k)
        ref = x.float() @ w.float().T
        assert ((y.float() - ref).abs() <= _ulp(ref)).all(), (n, k)


def gemv_push_writes_the_rounds_row_of_the_peer_and_nothing_else(kernels):
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(1, 300, generator=gen).bfloat16(), torch.randn(77, 300, generator=gen)
    peer = torch.full((3, 77), EMPTY, dtype=torch.int16)
    y = _gemv(kernels[0], x, w.bfloat16(), peer.view(torch.bfloat16), rnd=7)  # row 7 % 3
    assert torch.equal(peer[1], y.view(torch.int16)[0])
    assert (peer[[0, 2]] == EMPTY).all()
    zero = torch.zeros(1, 64, dtype=torch.bfloat16)  # all-zero sums: data, never "empty"
    peer0 = torch.full((3, 16), EMPTY, dtype=torch.int16)
    _gemv(kernels[0], zero, -torch.rand(16, 64).bfloat16(), peer0.view(torch.bfloat16), rnd=3)
    assert (peer0[0] == 0).all() and (peer0[1:] == EMPTY).all()
    tiny = torch.full((1, 64), 2.0**-70, dtype=torch.bfloat16)  # sums of -2^-134: bf16 -0.0
    peer1 = torch.full((3, 16), EMPTY, dtype=torch.int16)
    y = _gemv(kernels[0], tiny, -tiny.expand(16, 64).contiguous(), peer1.view(torch.bfloat16))
    assert (y.view(torch.int16) == EMPTY).all()  # the local result keeps its -0.0
    assert (peer1[0] == 0).all() and (peer1[1:] == EMPTY).all()  # pushed as +0.0


def _norm(kernel, mine, buf, rnd, res, weight, eps=1e-5):
    hidden = mine.shape[1]
    norm_out, res_out = torch.empty_like(mine), torch.empty_like(mine)
    kernel[(1,)](
        mine, buf, rnd, res, weight, norm_out, res_out, hidden, eps,
        BLOCK=triton.next_power_of_2(hidden), PDL=False,
    )  # fmt: skip
    return norm_out, res_out


def _reference(mine, theirs, res, weight, eps=1e-5):
    total = mine.float() + theirs.float() + res.float()
    norm = total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return norm, total


def push_norm_sums_adds_normalises_resets_the_last_row_and_advances(kernels):
    hidden, gen = 100, torch.Generator().manual_seed(2)  # not a power of two: masked lanes

    def rand(*shape):
        return torch.randn(*shape, generator=gen).bfloat16()

    mine, theirs, res = rand(1, hidden), rand(1, hidden), rand(1, hidden)
    weight = (torch.rand(hidden, generator=gen) + 0.5).bfloat16()
    backing = torch.full((3 * hidden + 8,), 5, dtype=torch.int16)  # 8 guards after the rows
    buf = backing[: 3 * hidden].view(3, hidden)
    buf[2] = theirs.view(torch.int16)[0]  # round 5 reads row 2
    rnd = torch.tensor([5], dtype=torch.int32)
    norm, total = _norm(kernels[1], mine, buf, rnd, res, weight)
    want_norm, want_total = _reference(mine, theirs, res, weight)
    assert ((total.float() - want_total).abs() <= _ulp(want_total)).all()
    assert ((norm.float() - want_norm).abs() <= 2 * _ulp(want_norm)).all()
    assert rnd.item() == 6
    assert (buf[1] == EMPTY).all()  # round 4's row, reset for round 7
    assert torch.equal(buf[2], theirs.view(torch.int16)[0]) and (buf[0] == 5).all()
    assert (backing[3 * hidden :] == 5).all()


def two_ranks_stay_in_step_through_rounds_not_a_multiple_of_three(kernels):
    """Two ranks simulated in turn for 7 rounds (product, product, norm, norm): each push finds
    its row empty, both ranks get the same bits, and they equal the reference sum and norm."""
    gemv_kernel, norm_kernel = kernels
    hidden, k, gen = 48, 40, torch.Generator().manual_seed(3)
    bufs = [torch.full((3, hidden), EMPTY, dtype=torch.int16) for _ in range(2)]
    rounds = [torch.zeros(1, dtype=torch.int32) for _ in range(2)]
    weight = (torch.rand(hidden, generator=gen) + 0.5).bfloat16()
    res = torch.randn(1, hidden, generator=gen).bfloat16()
    for r in range(7):
        xs = [torch.randn(1, k, generator=gen).bfloat16() for _ in range(2)]
        ws = [torch.randn(hidden, k, generator=gen).bfloat16() for _ in range(2)]
        ys = []
        for rank in (0, 1):
            peer = bufs[1 - rank]
            assert (peer[r % 3] == EMPTY).all(), (r, rank)  # the row it pushes into is free
            ys.append(_gemv(gemv_kernel, xs[rank], ws[rank], peer.view(torch.bfloat16), r))
        outs = [_norm(norm_kernel, ys[i], bufs[i], rounds[i], res, weight) for i in (0, 1)]
        assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))
        want_norm, want_total = _reference(ys[0], ys[1], res, weight)
        assert ((outs[0][1].float() - want_total).abs() <= _ulp(want_total)).all()
        assert ((outs[0][0].float() - want_norm).abs() <= 2 * _ulp(want_norm)).all()
        res = outs[0][1]
    assert [int(t.item()) for t in rounds] == [7, 7]


def rope_store_matches_torch_rope_and_the_pools_write(kernels):
    """models/rope_store.py: q rotated in place, the rotated k and
    the v written at each token's slot, within one bf16 rounding of TorchOps.rope + KVPool.store;
    other slots untouched."""
    from sgl_engine.kv_cache import KVPool
    from sgl_engine.models.ops import TorchOps
    from sgl_engine.models.rope_store import rope_store

    for d, own_k in ((16, False), (24, False), (16, True)):  # 24: masked lanes
        _rope_store_case(rope_store, KVPool, TorchOps, d, own_k)


def _rope_store_case(rope_store, KVPool, TorchOps, d, own_k):
    """`own_k`: k a tensor of its own, not a view of the qkv output beside v (as after a
    qk-norm), so k and v have different row strides."""
    t, nh, nkv = 3, 4, 2
    gen = torch.Generator().manual_seed(0)
    wide = (nh + 2 * nkv) * d
    qkv = torch.randn(t, wide + 5, generator=gen).bfloat16()[:, :wide]  # strided rows
    q, k, v = qkv.split([nh * d, nkv * d, nkv * d], dim=-1)
    if own_k:
        k = k.contiguous()
    pos, loc = torch.tensor([0, 7, 30]), torch.tensor([5, 2, 9])
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.outer(torch.arange(64).float(), inv)
    cos, sin = freqs.cos(), freqs.sin()
    want_q, want_k = TorchOps.rope(pos, q.clone(), k.clone(), cos, sin, None, d)
    want = KVPool(12, 1, nkv, d, torch.bfloat16, torch.device("cpu"))
    want.store(0, loc, want_k.reshape(t, nkv, d), v.reshape(t, nkv, d))
    got = KVPool(12, 1, nkv, d, torch.bfloat16, torch.device("cpu"))
    got.kv[0].fill_(3)
    out = rope_store(pos, q, k, v, torch.cat([cos, sin], -1), d, got.kv[0], loc)
    assert out.data_ptr() == q.data_ptr()
    assert ((q.float() - want_q.float()).abs() <= _ulp(want_q.float())).all()
    rows = want.kv[0][loc].float()
    assert ((got.kv[0][loc].float() - rows).abs() <= _ulp(rows)).all()
    others = [i for i in range(13) if i not in loc.tolist()]
    assert (got.kv[0][others] == 3).all()


CHECKS = {
    f.__name__: f
    for f in (
        gemv_matches_an_fp32_product_on_masked_shapes,
        gemv_push_writes_the_rounds_row_of_the_peer_and_nothing_else,
        push_norm_sums_adds_normalises_resets_the_last_row_and_advances,
        two_ranks_stay_in_step_through_rounds_not_a_multiple_of_three,
        rope_store_matches_torch_rope_and_the_pools_write,
    )
}

if __name__ == "__main__":
    CHECKS[sys.argv[1]](_kernels())
    print("ok")
