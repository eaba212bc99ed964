"""The pool's single write of k and v side by side equals two separate writes."""

from __future__ import annotations

import torch
from sgl_engine.kv_cache import KVPool


def test_side_by_side_store_equals_separate_writes():
    h, d, t = 2, 8, 5
    qkv = torch.randn(t, (4 + 2 * h) * d)
    q, k, v = qkv.split([4 * d, h * d, h * d], dim=-1)
    k, v = k.reshape(t, h, d), v.reshape(t, h, d)
    loc = torch.tensor([3, 1, 7, 9, 4])
    one, two = KVPool(10, 1, h, d, torch.float32, "cpu"), KVPool(10, 1, h, d, torch.float32, "cpu")
    one.store(0, loc, k, v)
    two.store(0, loc, k.clone(), v.clone())
    assert torch.equal(one.kv[0], two.kv[0])
    assert torch.equal(one.k[0][loc], k) and torch.equal(one.v[0][loc], v)
    assert not one.kv[0][0].any()


def test_one_row_views_are_side_by_side_too():
    qkv = torch.randn(1, 8 * 16, requires_grad=False)
    q, k, v = qkv.split([64, 32, 32], dim=-1)
    k, v = k.reshape(-1, 2, 16), v.reshape(-1, 2, 16)
    from sgl_engine.kv_cache import _side_by_side

    kv = _side_by_side(k, v, torch.float32)
    assert kv is not None and torch.equal(kv[:, 0], k) and torch.equal(kv[:, 1], v)
    assert _side_by_side(k.clone(), v.clone(), torch.float32) is None
