"""`sgl-adapters serve` flags reach the engine as EngineConfig fields, and only when given."""

from __future__ import annotations

import argparse

import pytest
from sgl_engine.config import EngineConfig
from sgl_engine.server import launch


def _engine_kwargs(monkeypatch, argv: list[str]) -> dict:
    seen: dict = {}

    def fake_serve(model, host, port, **kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(launch, "serve", fake_serve)
    parser = launch.add_serve_arguments(argparse.ArgumentParser())
    launch.serve_from_args(parser.parse_args(argv))
    server_only = {
        "api_key",
        "max_body_bytes",
        "served_model_name",
        "allowed_hosts",
        "graceful_timeout",
        "families",
    }
    return {k: v for k, v in seen.items() if k not in server_only | {"log_level"}}


def test_no_engine_flags_means_engine_defaults(monkeypatch):
    assert _engine_kwargs(monkeypatch, []) == {}


def test_gpu_flags_become_engine_config_fields(monkeypatch):
    kwargs = _engine_kwargs(
        monkeypatch,
        [
            "--device=cuda",
            "--attention-backend=flashinfer",
            "--cuda-graph-max-bs=0",
            "--mem-fraction-static=0.7",
            "--chunked-prefill-size=2048",
            "--enable-mixed-chunk",
            "--disable-radix-cache",
            "--no-overlap-schedule",
            "--no-cascade-attention",
            "--tp=2",
            "--tp-all-reduce=push",
            "--decode-gemv=triton",
        ],
    )
    assert kwargs == {
        "device": "cuda",
        "attention_backend": "flashinfer",
        "cuda_graph_max_bs": 0,
        "mem_fraction_static": 0.7,
        "chunked_prefill_size": 2048,
        "enable_mixed_chunk": True,
        "disable_radix_cache": True,
        "overlap_schedule": False,
        "cascade_attention": False,
        "tp_size": 2,
        "tp_all_reduce": "push",
        "decode_gemv": "triton",
    }
    EngineConfig.from_kwargs(**kwargs)


def test_every_engine_flag_is_an_engine_config_field():
    assert set(launch.ENGINE_ARGS) <= set(EngineConfig.__dataclass_fields__)


def test_negative_graph_size_is_rejected():
    with pytest.raises(ValueError, match="cuda_graph_max_bs"):
        EngineConfig(cuda_graph_max_bs=-1)
