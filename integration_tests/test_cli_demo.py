"""`sgl-adapters demo` (the README's main job) runs every front door on the embedded model and
gets every answer right (greedy decoding, so the output is the same on every run)."""

from __future__ import annotations

import re
import subprocess
import sys

from sgl_adapters.demo import CAPITALS, explain_metrics


def sections(text: str) -> dict[str, str]:
    parts = re.split(r"^== (.+?) =*\s*$", text, flags=re.M)
    return {
        title.split(" (")[0].split(":")[0]: body
        for title, body in zip(parts[1::2], parts[2::2], strict=True)
    }


def test_demo_answers_correctly_through_every_front_door(smollm2_path):
    code = (
        "import sys; from sgl_adapters.cli import main; sys.exit(main(['demo', '--device', 'cpu']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=900, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Warning" not in out.stderr, out.stderr[-3000:]
    text = out.stdout
    assert text.startswith("loaded SmolLM2-135M-Instruct on cpu"), text[:200]
    got = sections(text)
    assert set(got) == {"engine", "SGLang program", "LangChain", "DSPy", "radix cache statistics"}
    for country, city in CAPITALS.items():
        assert re.search(rf"^\s*{country} -> {city}\s+prompt", got["engine"], re.M), got["engine"]
        assert re.search(
            rf"^\s*{country} -> select among 4 cities: {city}$", got["SGLang program"], re.M
        )
    assert re.search(r"^constrained to the regex .*: \d{4}-\d{2}-\d{2}$", got["engine"], re.M)
    assert re.search(r"^invoke: .*\bParis\b", got["LangChain"], re.M), got["LangChain"]
    assert (
        "structured output (JSON schema of City): name='Paris' country='France'" in got["LangChain"]
    )
    assert re.search(r": France -> Paris$", got["DSPy"], re.M), got["DSPy"]
    assert re.search(r": Japan -> .*\bTokyo\b", got["DSPy"], re.M), got["DSPy"]
    stats = got["radix cache statistics"]
    hit = int(re.search(r"hit rate (\d+)%", stats).group(1))
    assert hit >= 50 and ", 0 running, 0 waiting" in stats, stats


def test_statistics_add_up():
    metrics = {
        "prompt_tokens": 100, "cached_tokens": 60, "hit_rate": 0.6, "prefill_tokens": 45,
        "sampled_tokens": 20, "forced_tokens": 7, "forward_passes_saved": 6, "forward_passes": 30,
        "kv_used": 80, "kv_total": 1000, "finished_requests": 5, "running": 0, "waiting": 0,
    }  # fmt: skip
    lines = explain_metrics(metrics)
    assert lines[0].startswith("prompt tokens: 100, of which 60 (hit rate 60%)")
    assert "45 tokens = 40 uncached prompt tokens + 5 tokens appended" in lines[1]
    assert "saving 6 forward passes; 30 passes in all" in lines[2]
