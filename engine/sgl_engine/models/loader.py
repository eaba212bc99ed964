"""Build our model from a HF folder (safetensors, or .bin as a fallback), or with random weights."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sgl_engine.distributed.group import TPGroup
from sgl_engine.distributed.layers import full_shape, load_full
from sgl_engine.models import gemv
from sgl_engine.models.layers import RotaryEmbedding
from sgl_engine.models.llama import LlamaForCausalLM
from sgl_engine.models.model_config import ModelConfig
from sgl_engine.models.ops import choose_ops


def iter_weights(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():
                    yield name, fh.get_tensor(name)
        return
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {folder}")
    for f in bins:
        yield from torch.load(f, map_location="cpu", weights_only=True).items()


def _resolve_folder(model_path: str) -> Path:
    p = Path(model_path)
    if p.is_dir():
        return p
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_path, allow_patterns=["*.json", "*.safetensors"]))


def build_model(
    model_path: str | None,
    hf_config: Any,
    device: torch.device,
    dtype: torch.dtype,
    max_positions: int,
    random_weights: bool = False,
    ops: str = "auto",
    tp: TPGroup | None = None,
    decode_gemv: str = "cublas",
) -> LlamaForCausalLM:
    """Allocate directly on `device` in `dtype` (no fp32 copy of big models), then fill weights
    (with `tp`, only this rank's shard is kept; random weights are the same at every tp_size)."""
    cfg = ModelConfig.from_hf(hf_config)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, max_positions, tp)
    model = model.to(dtype).to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rope = RotaryEmbedding(hf_config, cfg.head_dim, max_positions).to(device)
    model.ops = choose_ops(ops, device, dtype)
    if gemv.choose(decode_gemv, device, dtype) == "triton":
        use_triton_gemv(model)
    if random_weights:
        _init_random(model)
    else:
        model.load_weights(iter_weights(_resolve_folder(str(model_path))))
    return model.eval()


def use_triton_gemv(model: torch.nn.Module) -> None:
    """Route one-row products of the decoder's linear layers through models/gemv.py."""
    from sgl_engine.distributed.layers import ColumnParallelLinear, RowParallelLinear
    from sgl_engine.models.gemv import gemv

    for m in model.modules():
        if isinstance(m, ColumnParallelLinear | RowParallelLinear):
            m.gemv = gemv


def _init_random(model: torch.nn.Module, std: float = 0.02) -> None:
    """Draw every parameter at its full shape, in order, from a generator seeded alike in every
    process, and keep this rank's slice: the same weights at every tp_size and every time."""
    gens: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
                continue
            if p.device not in gens:
                gens[p.device] = torch.Generator(device=p.device).manual_seed(0)
            full = torch.empty(full_shape(model, name), dtype=p.dtype, device=p.device)
            full.normal_(0.0, std, generator=gens[p.device])
            load_full(model, name, full)
