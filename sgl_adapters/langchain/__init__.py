"""LangChain front door: `ChatSGLang` (chat model) and `SGLang` (LLM) on `sgl_engine`."""

from __future__ import annotations

from sgl_adapters.engines import ENGINES, EngineClient, EngineRegistry
from sgl_adapters.langchain.chat_model import ChatSGLang
from sgl_adapters.langchain.llm import SGLang

__all__ = ["ENGINES", "ChatSGLang", "EngineClient", "EngineRegistry", "SGLang"]
