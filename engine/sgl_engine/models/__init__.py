"""Model implementations; `ModelConfig.from_hf` maps a transformers config onto ours."""

from __future__ import annotations

from sgl_engine.models.model_config import ModelConfig

__all__ = ["ModelConfig"]
