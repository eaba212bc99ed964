"""The one-row fused kernels (models/fused_gemv.py) on the CPU, in Triton's interpreter.

Run by tests/test_fused_gemv.py in a subprocess with TRITON_INTERPRET=1 (the interpreter must
be on when triton is imported, which the main test process may already have done, and must not
leak into later GPU tests); skipped when collected otherwise.

Each kernel equals the unfused `gemv(TorchOps.op(x), w)`; a tiny model whose decoder layers take
the fused path decodes the plain path's greedy tokens. The interpreter rounds fp16 like the GPU
(round to nearest even) but truncates fp32 -> bf16, so fp32 and fp16 are compared exactly (up
to the exp of SiLU) and bf16 within two bf16 steps of each rounded intermediate; the bf16
roundings themselves are checked on a GPU (tests/test_gpu.py).
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs under TRITON_INTERPRET=1 (tests/test_fused_gemv.py)", allow_module_level=True)
pytest.importorskip("triton")

SHAPES = [(77, 300), (5, 40), (128, 64), (3, 129)]  # (N, K): below, at and over a block


def _inputs(n: int, k: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, k, generator=g).to(dtype)
    residual = torch.randn(1, k, generator=g).to(dtype)
    gamma = (torch.rand(k, generator=g) + 0.5).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    return x, residual, gamma, w


def _check(y: torch.Tensor, h_ref: torch.Tensor, w: torch.Tensor) -> None:
    """y equals gemv(h_ref, w) (fp32/fp16), or for bf16 lies within two bf16 steps of every
    h element (2**-7 relative) plus the output's own rounding."""
    from sgl_engine.models.gemv import gemv

    assert y.shape == (1, w.shape[0]) and y.dtype == h_ref.dtype
    if h_ref.dtype != torch.bfloat16:
        torch.testing.assert_close(y, gemv(h_ref, w), rtol=1e-6, atol=1e-6)
        return
    exact = h_ref.float() @ w.float().T
    bound = 2**-7 * (h_ref.float().abs() @ w.float().abs().T) + 2**-8 * exact.abs() + 1e-6
    assert ((y.float() - exact).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_gemv_add_rmsnorm_equals_norm_then_gemv(n, k, dtype):
    from sgl_engine.models.fused_gemv import gemv_add_rmsnorm
    from sgl_engine.models.ops import TorchOps

    x, residual, gamma, w = _inputs(n, k, dtype)
    before = [t.clone() for t in (x, residual, gamma, w)]
    y, new_residual = gemv_add_rmsnorm(x, residual, gamma, 1e-6, w)
    normed, ref_residual = TorchOps.add_rmsnorm(x, residual, gamma, 1e-6)
    if dtype == torch.bfloat16:
        torch.testing.assert_close(new_residual, ref_residual, rtol=2**-7, atol=0)
    else:
        assert torch.equal(new_residual, ref_residual)
    _check(y, normed, w)
    assert new_residual.data_ptr() not in (x.data_ptr(), residual.data_ptr())
    for t, b in zip((x, residual, gamma, w), before, strict=True):
        assert torch.equal(t, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", SHAPES[:2])
def test_gemv_add_rmsnorm_without_residual_norms_x(n, k, dtype):
    from sgl_engine.models.fused_gemv import gemv_add_rmsnorm
    from sgl_engine.models.ops import TorchOps

    x, _, gamma, w = _inputs(n, k, dtype, seed=1)
    before = x.clone()
    y, new_residual = gemv_add_rmsnorm(x, None, gamma, 1e-5, w)
    assert new_residual is x and torch.equal(x, before)
    _check(y, TorchOps.rmsnorm(x, gamma, 1e-5), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_gemv_silu_mul_equals_silu_mul_then_gemv(n, k, dtype):
    from sgl_engine.models.fused_gemv import gemv_silu_mul
    from sgl_engine.models.ops import TorchOps

    _, _, _, w = _inputs(n, k, dtype, seed=2)
    gate_up = (3 * torch.randn(1, 2 * k, generator=torch.Generator().manual_seed(3))).to(dtype)
    before = gate_up.clone()
    y = gemv_silu_mul(gate_up, w)
    _check(y, TorchOps.silu_mul(gate_up), w)
    assert torch.equal(gate_up, before)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_model_fused_layers_decode_the_plain_tokens(arch, tiny_model_dirs, make_engine):
    """Every one-row forward (each decode step of a single request) of every layer takes the
    fused path; qwen2 adds its qkv bias after the fused product."""
    from sgl_engine.models.fused_gemv import FusedGemv

    calls = []

    def count(fn):
        def wrapped(*args):
            calls.append(fn.__name__)
            return fn(*args)

        wrapped.__name__ = fn.__name__
        return wrapped

    base = FusedGemv()
    fused = FusedGemv(count(base.add_rmsnorm), count(base.silu_mul))
    sp = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
    prompts = ["The quick brown fox", "A radix tree shares"]
    eng = make_engine(tiny_model_dirs[arch], disable_radix_cache=True)
    want = [eng.generate(p, sp)["output_ids"] for p in prompts]
    for layer in eng.runner.model.layers:
        layer.fused = fused
    assert [eng.generate(p, sp)["output_ids"] for p in prompts] == want
    layers = len(eng.runner.model.layers)
    assert calls.count("gemv_silu_mul") == layers * (sp["max_new_tokens"] - 1) * len(prompts)
    assert calls.count("gemv_add_rmsnorm") == 2 * calls.count("gemv_silu_mul")
