"""Shared fixtures: tiny random models built in code (no network), engines that must not leak."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("SGL_ADAPTERS_LOAD_PLUGINS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """Folders with a random Llama, Qwen2 and Qwen3 model plus the tiny tokenizer."""
    from sgl_engine.testing import make_tiny_model_dir

    root = tmp_path_factory.mktemp("tiny-models")
    return {
        arch: str(make_tiny_model_dir(root / arch, arch=arch))
        for arch in ("llama", "qwen2", "qwen3")
    }


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_dirs):
    return tiny_model_dirs["llama"]


@pytest.fixture
def make_engine():
    """Build engines for a test; afterwards each must be idle with no KV slot or lock leaked."""
    from sgl_engine import Engine

    engines = []

    def make(path, **kwargs):
        kwargs.setdefault("device", "cpu")
        kwargs.setdefault("max_total_tokens", 4096)
        eng = Engine(path, **kwargs)
        engines.append(eng)
        return eng

    yield make
    try:
        for eng in engines:
            eng.check_invariants()
    finally:
        for eng in engines:
            eng.shutdown()
