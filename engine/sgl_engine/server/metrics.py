"""Engine counters in the Prometheus text exposition format (version 0.0.4)."""

from __future__ import annotations

from collections.abc import Mapping

PREFIX = "sgl_engine_"

COUNTERS: dict[str, str] = {
    "prompt_tokens": "Prompt tokens received",
    "prefill_tokens": "Prompt tokens computed by prefill",
    "cached_tokens": "Prompt tokens reused from the radix cache",
    "decode_tokens": "Tokens computed by decode steps",
    "sampled_tokens": "Tokens sampled",
    "forced_tokens": "Tokens appended by grammar jump-forward",
    "forward_passes": "Model forward passes",
    "prefill_passes": "Forward passes that prefilled",
    "retractions": "Requests retracted for lack of KV space",
    "finished_requests": "Requests finished",
    "aborted_requests": "Requests aborted",
    "internal_errors": "Forward passes or scheduler steps that failed with an internal error",
}

GAUGES: dict[str, str] = {
    "hit_rate": "Cached share of all prompt tokens",
    "kv_used": "KV slots in use (running requests and the radix cache)",
    "kv_total": "KV slots in the pool",
    "kv_usage": "Share of KV slots in use",
    "cache_tokens": "Tokens held by the radix cache",
    "running": "Requests running",
    "waiting": "Requests waiting",
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(values: Mapping[str, float], model_name: str) -> str:
    """One sample per known metric present in `values`, labelled with the model name."""
    label = f'{{model_name="{_escape(model_name)}"}}'
    lines: list[str] = []
    for kinds, suffix, kind in ((COUNTERS, "_total", "counter"), (GAUGES, "", "gauge")):
        for key, help_text in kinds.items():
            if key not in values:
                continue
            name = f"{PREFIX}{key}{suffix}"
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            lines.append(f"{name}{label} {float(values[key])!r}")
    return "\n".join(lines) + "\n"
