"""One Llama-family model (Llama, Mistral, Qwen2, Qwen3) reading K/V from the paged pool."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from sgl_engine.attention.base import AttentionBackend
from sgl_engine.distributed.group import TPGroup
from sgl_engine.distributed.layers import (
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    load_full,
)
from sgl_engine.forward_batch import ForwardBatch
from sgl_engine.kv_cache import KVPool
from sgl_engine.models.layers import RMSNorm, RotaryEmbedding, SwiGLU
from sgl_engine.models.model_config import ModelConfig
from sgl_engine.models.ops import TorchOps


class Attention(nn.Module):
    """Under TP each rank holds its share of the query and KV heads (and of the KV pool)."""

    def __init__(self, cfg: ModelConfig, layer: int, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.layer = layer
        size = tp.size if tp is not None else 1
        self.nh, self.nkv, self.hd = cfg.num_heads // size, cfg.num_kv_heads // size, cfg.head_dim
        self.q_size, self.kv_size = self.nh * self.hd, self.nkv * self.hd
        self.scale = self.hd**-0.5
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.attention_bias, tp
        )
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, tp=tp)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope: RotaryEmbedding,
        batch: ForwardBatch,
        pool: KVPool,
        attn: AttentionBackend,
        ops: Any,
        reduce: bool = True,
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:
            q = self.q_norm(q.reshape(-1, self.nh, self.hd), ops).reshape(-1, self.q_size)
            k = self.k_norm(k.reshape(-1, self.nkv, self.hd), ops).reshape(-1, self.kv_size)
        fused = getattr(ops, "rope_store", None)
        if fused is not None and getattr(attn, "accepts_stored_kv", False):
            q = fused(positions, q, k, v, rope.cos_sin, self.hd, pool.kv[self.layer], batch)
            k = v = None  # stored: the backend only attends
        else:
            q, k = rope(positions, q, k, ops)
        o = attn.forward(
            q.reshape(-1, self.nh, self.hd),
            None if k is None else k.reshape(-1, self.nkv, self.hd),
            None if v is None else v.reshape(-1, self.nkv, self.hd),
            self.layer,
            batch,
            pool,
            self.scale,
        )
        return self.o_proj(o, reduce)


class DecoderLayer(nn.Module):
    """Under TP each half's row-parallel layer returns its partial sum and the next norm
    all-reduces it (with the residual add and RMSNorm in one kernel on the fused path): the
    next layer's input norm, or the model's final one, for the MLP's."""

    def __init__(self, cfg: ModelConfig, layer: int, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.self_attn = Attention(cfg, layer, tp)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, positions, rope, batch, pool, attn, ops):
        """SGLang's residual style: returns (hidden, residual) with the add fused into the norm."""
        tp, reduce = self.tp, self.tp is None
        if residual is None:
            x, residual = self.input_layernorm(x, ops), x
        else:
            x, residual = self.input_layernorm(x, ops, residual, tp)
        x = self.self_attn(x, positions, rope, batch, pool, attn, ops, reduce)
        x, residual = self.post_attention_layernorm(x, ops, residual, tp)
        return self.mlp(x, ops, reduce), residual


class LlamaForCausalLM(nn.Module):
    """`forward` returns the final hidden states [T, H]; `logits` projects selected rows.

    With `tp`, this is one rank's shard: every rank runs `forward` and `logits` on the same
    batch in lockstep (they contain the group's collectives) and gets the same full results.
    """

    def __init__(self, cfg: ModelConfig, max_positions: int, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, tp) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope = RotaryEmbedding(cfg.hf_config, cfg.head_dim, max_positions)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.ops: Any = TorchOps()

    def forward(self, batch: ForwardBatch, pool: KVPool, attn: AttentionBackend) -> torch.Tensor:
        x, residual = self.embed_tokens(batch.input_ids), None
        for layer in self.layers:
            x, residual = layer(
                x, residual, batch.positions, self.rope, batch, pool, attn, self.ops
            )
        x, _ = self.norm(x, self.ops, residual, self.tp)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into our (merged qkv / gate_up, maybe sharded) parameters."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, w in weights:
            target, shard = _map_name(name, self.cfg)
            if target is None:
                continue
            if target not in params:
                raise ValueError(f"unexpected weight {name!r}")
            load_full(self, target, w, shard)
            loaded.add(name)
        _check_complete(loaded, self.cfg)


def _map_name(name: str, cfg: ModelConfig) -> tuple[str | None, int | None]:
    if "rotary_emb" in name:
        return None, None
    name = name.removeprefix("model.")
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
        return None, None
    fused = {
        "self_attn.q_proj.": ("self_attn.qkv_proj.", 0),
        "self_attn.k_proj.": ("self_attn.qkv_proj.", 1),
        "self_attn.v_proj.": ("self_attn.qkv_proj.", 2),
        "mlp.gate_proj.": ("mlp.gate_up_proj.", 0),
        "mlp.up_proj.": ("mlp.gate_up_proj.", 1),
    }
    for src, (dst, off) in fused.items():
        if src in name:
            return name.replace(src, dst), off
    return name, None


def _check_complete(loaded: set[str], cfg: ModelConfig) -> None:
    needed = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        needed.append("lm_head.weight")
    for i in range(cfg.num_layers):
        for part in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ):
            needed.append(f"model.layers.{i}.{part}.weight")
    missing = [n for n in needed if n not in loaded and n.removeprefix("model.") not in loaded]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} weights, e.g. {missing[:3]}")
