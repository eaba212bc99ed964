"""sgl_engine: an in-process RadixAttention inference engine (continuous batching, prefix reuse)."""

from __future__ import annotations
