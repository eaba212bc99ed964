"""The architecture facts our Llama-family model needs, read from a transformers config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    max_position_embeddings: int
    hf_config: Any

    @classmethod
    def from_hf(cls, hf: Any) -> ModelConfig:
        archs = list(getattr(hf, "architectures", None) or [])
        model_type = getattr(hf, "model_type", "")
        arch = next((SUPPORTED[a] for a in archs if a in SUPPORTED), None)
        if arch is None and model_type in SUPPORTED.values():
            arch = model_type
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or model_type!r}; supported: "
                + ", ".join(sorted(SUPPORTED))
            )
        heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        bias = bool(getattr(hf, "attention_bias", False)) or arch == "qwen2"
        return cls(
            arch=arch,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=bias,
            qk_norm=arch == "qwen3",
            max_position_embeddings=getattr(hf, "max_position_embeddings", 4096),
            hf_config=hf,
        )

    def shard(self, tp_size: int) -> ModelConfig:
        """One tensor-parallel rank's view: its share of the query and KV heads (for the KV
        pool and the attention backend)."""
        if tp_size == 1:
            return self
        for what, n in (("attention heads", self.num_heads), ("KV heads", self.num_kv_heads)):
            if n % tp_size:
                raise ValueError(f"{what} ({n}) are not divisible by tp_size ({tp_size})")
        return dataclasses.replace(
            self, num_heads=self.num_heads // tp_size, num_kv_heads=self.num_kv_heads // tp_size
        )
