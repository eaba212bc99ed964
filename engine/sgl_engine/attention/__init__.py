"""Attention backends behind one interface, chosen by name and imported lazily."""

from __future__ import annotations

import importlib
import importlib.util

from sgl_engine.attention.base import AttentionBackend

_BACKENDS = {
    "torch": "sgl_engine.attention.torch_backend:TorchAttentionBackend",
    "flashinfer": "sgl_engine.attention.flashinfer_backend:FlashInferAttentionBackend",
}


def flashinfer_available() -> bool:
    """Whether flashinfer can be imported (checked without importing it)."""
    return importlib.util.find_spec("flashinfer") is not None


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def create_backend(name: str, **kwargs) -> AttentionBackend:
    """Import and build the backend `name` (flashinfer is imported only when asked for)."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {backend_names()}")
    module, cls = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)


__all__ = ["AttentionBackend", "backend_names", "create_backend", "flashinfer_available"]
