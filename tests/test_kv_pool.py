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


def test_engine_with_in_place_rope_stores_side_by_side_and_generates_the_same(
    make_engine, tiny_llama, monkeypatch
):
    """The flashinfer ops rope q/k in place on the qkv views, so the pool takes k and v in one
    write: on the CPU reference (torch attention), an in-place rope gives the same tokens."""
    from sgl_engine import kv_cache
    from sgl_engine.models.ops import TorchOps

    class InPlaceRope(TorchOps):
        def rope(self, positions, q, k, cos, sin, cos_sin, head_dim):
            q2, k2 = TorchOps.rope(positions, q, k, cos, sin, cos_sin, head_dim)
            q.copy_(q2)
            k.copy_(k2)
            return q, k

    prompts = [[5, 6, 7, 8, 9], [5, 6, 7, 40, 41, 42], [100, 3]]
    sp = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    ref = [
        o["output_ids"]
        for o in make_engine(tiny_llama).generate(input_ids=prompts, sampling_params=sp)
    ]
    eng = make_engine(tiny_llama)
    eng.runner.model.ops = InPlaceRope()
    joined = []
    side = kv_cache._side_by_side

    def spy(k, v, dtype):
        kv = side(k, v, dtype)
        joined.append(kv is not None)
        return kv

    monkeypatch.setattr(kv_cache, "_side_by_side", spy)
    outs = [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=sp)]
    assert joined and all(joined)
    assert outs == ref
