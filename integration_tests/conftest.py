"""Shared fixtures for framework-level tests: the embedded SmolLM2-135M-Instruct model."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The embedded model's converted HF folder, as `resolve_model_path(None)` gives it.

    Converts into the user cache on first use (`$SGL_ADAPTERS_CACHE`, else
    `$XDG_CACHE_HOME/sgl-adapters`, else `~/.cache/sgl-adapters`); later sessions reuse it.
    """
    from sgl_engine.model_source import resolve_model_path

    return resolve_model_path(None)
