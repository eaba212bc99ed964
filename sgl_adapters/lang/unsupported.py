"""SGLang frontend names that cannot work here, each failing with the reason.

They exist so that a ported program fails at the call with an explanation instead of an
`AttributeError`; docs/SGLANG_COMPAT.md lists them.
"""

from __future__ import annotations

from typing import Any

TEXT_ONLY = (
    "this model is text-only: sgl_adapters serves Llama-family text models, which take no "
    "image or video input; describe the content in text instead"
)


class UnsupportedFeatureError(NotImplementedError):
    """An SGLang feature this project does not provide; the message says why."""


def image(expr: Any) -> Any:
    """SGLang's image input: refused (text-only models)."""
    raise UnsupportedFeatureError(f"sgl.image: {TEXT_ONLY}")


def video(path: str, num_frames: int) -> Any:
    """SGLang's video input: refused (text-only models)."""
    raise UnsupportedFeatureError(f"sgl.video: {TEXT_ONLY}")


def _api_backend(name: str, package: str) -> Any:
    def refuse(*_: Any, **__: Any) -> Any:
        raise UnsupportedFeatureError(
            f"sgl.{name}: the {package} API backend is not included; programs run on "
            "sgl.Runtime (in-process), sgl.RuntimeEndpoint (an SGLang-protocol server) or "
            "sgl.OpenAI (any OpenAI-compatible server, where available)"
        )

    refuse.__name__ = name
    refuse.__qualname__ = name
    return refuse


Anthropic = _api_backend("Anthropic", "Anthropic")
LiteLLM = _api_backend("LiteLLM", "LiteLLM")
VertexAI = _api_backend("VertexAI", "Vertex AI")
