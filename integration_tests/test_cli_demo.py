"""`sgl-adapters demo` (the README's main job) runs every front door on the embedded model."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_every_front_door_and_prints_cache_statistics(smollm2_path):
    code = (
        "import sys; from sgl_adapters.cli import main; sys.exit(main(['demo', '--device', 'cpu']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=900, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for section in ("engine:", "SGLang program", "LangChain", "DSPy", "radix cache statistics"):
        assert section in text, text[-3000:]
    assert "(skipped" not in text, text
    stats = dict(
        line.strip().split(": ", 1)
        for line in text.splitlines()
        if line.startswith(" ") and ": " in line and line.strip().split(": ", 1)[0].isidentifier()
    )
    assert int(stats["cached_tokens"]) > 0 and float(stats["hit_rate"]) > 0.3
    assert int(stats["running"]) == 0 and int(stats["waiting"]) == 0
