"""The one-row fused kernels (models/fused_gemv.py) on the CPU, in Triton's interpreter.

Run by tests/test_fused_gemv.py in a subprocess with TRITON_INTERPRET=1 (the interpreter must
be on when triton is imported, which the main test process may already have done, and must not
leak into later GPU tests); skipped when collected otherwise.

Each kernel equals the unfused `gemv(TorchOps.op(x), w)`: exactly where it rounds as TorchOps
does (SiLU-mul in fp32 and fp16; the interpreter truncates fp32 -> bf16 where the GPU rounds to
nearest even), else within two steps of the dtype of each intermediate (bf16, and the
add-RMSNorm kernel, which applies the rms after the product and so never rounds the normed
row); a tiny model whose decoder layers take the fused path decodes the plain path's greedy
tokens. The bf16 results themselves are checked on a GPU (tests/test_gpu.py).
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


def _check(y: torch.Tensor, h_ref: torch.Tensor, w: torch.Tensor, h_rounded: bool) -> None:
    """y equals gemv(h_ref, w) where the kernel rounds h as TorchOps does (`h_rounded`: fp32,
    fp16), else lies within two steps of h's dtype of every h element plus the output's own
    rounding (bf16, whose interpreter rounding differs, and gemv_add_rmsnorm's unrounded h)."""
    from sgl_engine.models.gemv import gemv

    assert y.shape == (1, w.shape[0]) and y.dtype == h_ref.dtype
    if h_rounded and h_ref.dtype != torch.bfloat16:
        torch.testing.assert_close(y, gemv(h_ref, w), rtol=1e-6, atol=1e-6)
        return
    step = {torch.float32: 2**-22, torch.float16: 2**-10, torch.bfloat16: 2**-7}[h_ref.dtype]
    exact = h_ref.float() @ w.float().T
    bound = step * (h_ref.float().abs() @ w.float().abs().T) + step / 2 * exact.abs() + 1e-6
    assert ((y.float() - exact).abs() <= bound).all(), (y.float() - exact).abs().max()


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
    _check(y, normed, w, h_rounded=False)
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
    _check(y, TorchOps.rmsnorm(x, gamma, 1e-5), w, h_rounded=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_gemv_silu_mul_equals_silu_mul_then_gemv(n, k, dtype):
    from sgl_engine.models.fused_gemv import gemv_silu_mul
    from sgl_engine.models.ops import TorchOps

    _, _, _, w = _inputs(n, k, dtype, seed=2)
    gate_up = (3 * torch.randn(1, 2 * k, generator=torch.Generator().manual_seed(3))).to(dtype)
    before = gate_up.clone()
    y = gemv_silu_mul(gate_up, w)
    _check(y, TorchOps.silu_mul(gate_up), w, h_rounded=True)
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
