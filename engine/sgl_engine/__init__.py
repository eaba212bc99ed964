"""sgl_engine: an in-process RadixAttention inference engine (continuous batching, prefix reuse)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sgl_engine.config import EngineConfig
from sgl_engine.errors import InvalidRequestError

if TYPE_CHECKING:
    from sgl_engine.engine import Engine

__all__ = ["Engine", "EngineConfig", "InvalidRequestError"]


def __getattr__(name: str):
    if name == "Engine":
        from sgl_engine.engine import Engine

        return Engine
    raise AttributeError(name)
