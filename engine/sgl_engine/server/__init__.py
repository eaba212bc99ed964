"""The HTTP server: OpenAI-compatible API and SGLang's native API over one `Engine`."""

from __future__ import annotations

from sgl_engine.server.app import create_app
from sgl_engine.server.launch import ServerThread, serve

__all__ = ["ServerThread", "create_app", "serve"]
