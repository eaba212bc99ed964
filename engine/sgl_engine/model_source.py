"""Where a model comes from: the embedded default, a local folder, or a Hugging Face hub id."""

from __future__ import annotations

import os
from pathlib import Path

from sgl_engine.embedded import ensure_embedded_model


def resolve_model_path(model_path: str | os.PathLike | None) -> str:
    """A path or hub id that transformers can load.

    `None` gives the embedded model's converted folder (converting it on first use, which
    writes the user cache); an existing local folder is returned as is (with `~` expanded);
    anything else is taken for a hub id and returned unchanged, for transformers to resolve.
    Raises `FileNotFoundError` for a missing path that cannot be a hub id (a `PathLike`, an
    absolute or relative path, more than one `/`), `NotADirectoryError` for a file and
    `ValueError` for an empty string.
    """
    if model_path is None:
        return str(ensure_embedded_model())
    text = os.fspath(model_path)
    if not text:
        raise ValueError("model path is empty; pass None for the embedded model")
    local = Path(text).expanduser()
    if local.is_dir():
        return str(local)
    if local.exists():
        raise NotADirectoryError(f"model path {text!r} is a file; expected a model folder")
    if not isinstance(model_path, str) or _looks_local(text):
        raise FileNotFoundError(f"model folder {text!r} does not exist")
    return text


def _looks_local(text: str) -> bool:
    return os.path.isabs(text) or text.startswith((".", "~")) or "\\" in text or text.count("/") > 1


def load_tokenizer(model_path: str | os.PathLike | None, trust_remote_code: bool = False):
    """The model's tokenizer via `AutoTokenizer` (a fast tokenizer where one exists)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        resolve_model_path(model_path), trust_remote_code=trust_remote_code
    )


def load_hf_config(model_path: str | os.PathLike | None, trust_remote_code: bool = False):
    """The model's transformers config via `AutoConfig`."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(
        resolve_model_path(model_path), trust_remote_code=trust_remote_code
    )
