"""The fused one-row kernels on the CPU: tests/fused_gemv_checks.py in a subprocess under
Triton's interpreter (TRITON_INTERPRET=1 must be set before triton is imported, and must not
reach the GPU tests of this process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

CHECKS = Path(__file__).with_name("fused_gemv_checks.py")


def _run_checks(select: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", select]
    proc = subprocess.run([*cmd, str(CHECKS)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def test_fused_kernels_equal_the_unfused_ops():
    """fp32/fp16/bf16, N and K below, at and over the block sizes, with and without residual;
    inputs untouched, the new residual in a new tensor."""
    _run_checks("not tiny_model")


def test_tiny_model_with_fused_layers_decodes_the_plain_tokens():
    _run_checks("tiny_model")


def test_decode_gemv_accepts_fused():
    from sgl_engine.config import EngineConfig

    assert EngineConfig(decode_gemv="fused").decode_gemv == "fused"
    with pytest.raises(ValueError, match="'cublas', 'triton' or 'fused'"):
        EngineConfig(decode_gemv="fast")
