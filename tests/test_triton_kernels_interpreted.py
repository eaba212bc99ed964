"""The Triton kernels of batch-1 decode (models/gemv.py, distributed/push_norm.py) run by Triton's
interpreter on the CPU: their arithmetic, masks and the push path's Lamport rotation, checked in
every CI run (on GPUs they run compiled, in tests/test_gpu.py and benchmarks/tp_push_kernels.py).
Each check runs in a process of its own (tests/triton_interpreted.py), since the interpreter has
to be chosen before triton is imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
HELPER = Path(__file__).with_name("triton_interpreted.py")
NAMES = [
    "gemv_matches_an_fp32_product_on_masked_shapes",
    "gemv_push_writes_the_rounds_row_of_the_peer_and_nothing_else",
    "push_norm_sums_adds_normalises_resets_the_last_row_and_advances",
    "two_ranks_stay_in_step_through_rounds_not_a_multiple_of_three",
    "rope_store_matches_torch_rope_and_the_pools_write",
]


@pytest.mark.parametrize("name", NAMES)
def test_kernel_under_the_interpreter(name):
    """A failed assertion fails the check; a norm kernel that never sees its data would poll
    for good, so the process is bounded."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, str(HELPER), name], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
