"""Engine configuration: one frozen dataclass, passed down explicitly."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

TP_ALL_REDUCE_MODES = ("auto", "nccl", "one_shot", "fused", "push")
DECODE_GEMV_KERNELS = ("auto", "cublas", "triton")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs besides the weights.

    `max_total_tokens` is the KV pool size in tokens (None: derived from free memory on CUDA,
    16384 on CPU). `chunked_prefill_size` caps the tokens of one prefill batch (a longer prompt
    is prefilled in chunks; None: 4096 on CUDA, 1024 on CPU, where a chunk takes seconds and
    short requests are admitted and decoded between the chunks of a long one); -1 turns
    chunking off. `max_top_logprobs` caps a request's `top_logprobs_num`.
    `in_batch_prefix_min` is the shared length (tokens) above which a waiting request is held
    back one round so that another request of the same round prefills the shared prefix once. `overlap_schedule` launches each plain
    decode step before reading back the previous one's tokens (None: on CUDA only).
    `cuda_graph_max_bs` captures decode in CUDA graphs up to that batch size (flashinfer
    backend only; None: 64 when the backend is flashinfer, 0 = off). `tp_size` shards the model
    over that many ranks (tensor parallelism: rank 0 in this process, the others in worker
    processes; NCCL on CUDA, gloo on the CPU); `tp_timeout_s` bounds each of their collectives.
    `tp_all_reduce` picks the path of small all-reduces on CUDA: "auto" (the one-shot kernel over
    peer memory when every rank can map it, else NCCL), "one_shot" (required), "nccl", or
    "fused" (one_shot, and each block half's all-reduce, residual add and RMSNorm in one
    flashinfer TensorRT-LLM kernel; built on a machine's first use, minutes), or "push" (fused,
    and on two Hopper GPUs with the Triton `decode_gemv` batch-1 row-parallel products push their
    partial sums to the peer as they finish: distributed/push_norm.py).
    `decode_gemv` picks the kernel of one-row (batch-1 decode) linear layers on CUDA: "cublas"
    (the default), "triton" (the matrix-vector kernel of models/gemv.py: 12% faster batch-1
    decode on an H200, a few seconds more at start-up for Triton's compile and autotune), or
    "auto" (Triton on Hopper and later in bf16/fp16 when Triton imports, else cuBLAS:
    models/gemv.py:choose). Not the default: a batch-1 row then rounds differently from the
    same row in a batch (cuBLAS), so greedy outputs part at near-ties more often between a solo
    run and a busy engine (25 of 160 requests against at most 16 with cuBLAS, on an H200).
    `unroll_extends` replays small extends of running requests (the rounds after jump-forward)
    as decode graphs, one row per token (model_runner; None: whenever
    decode graphs are captured). `cascade_attention` gives decode graphs a shared-prefix variant:
    a batch whose rows share a long KV prefix (a few-shot batch) reads it once for all rows
    instead of once per row (None: on for MHA models, where an H200 measured it faster, off for
    grouped-query ones, where the split kernels measured slower). `enable_mixed_chunk` adds
    the running requests' next tokens to each prefill pass (a chunk of a long prompt, or new
    prompts) within `chunked_prefill_size`, so they decode during a long prefill instead of
    once between its chunks (scheduler docstring).
    """

    model_path: str | None = None
    tokenizer_path: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    attention_backend: str = "auto"
    fused_ops: str = "auto"
    decode_gemv: str = "cublas"
    max_total_tokens: int | None = None
    mem_fraction_static: float = 0.8
    page_size: int = 1
    disable_radix_cache: bool = False
    chunked_prefill_size: int | None = None
    max_running_requests: int = 256
    context_length: int | None = None
    schedule_policy: str = "lpm"
    in_batch_prefix_min: int = 16
    enable_jump_forward: bool = True
    unroll_extends: bool | None = None
    enable_mixed_chunk: bool = False
    cascade_attention: bool | None = None
    seed: int = 0
    trust_remote_code: bool = False
    cuda_graph_max_bs: int | None = None
    overlap_schedule: bool | None = None
    served_model_name: str | None = None
    max_top_logprobs: int = 20
    tp_size: int = 1
    tp_timeout_s: float = 300.0
    tp_all_reduce: str = "auto"

    def __post_init__(self) -> None:
        if self.page_size < 1:
            raise ValueError("page_size must be >= 1")
        if self.max_top_logprobs < 0:
            raise ValueError("max_top_logprobs must be >= 0")
        size = self.chunked_prefill_size
        if size is not None and (size == 0 or size < -1):
            raise ValueError("chunked_prefill_size must be positive or -1")
        if self.max_running_requests < 1:
            raise ValueError("max_running_requests must be >= 1")
        if self.schedule_policy not in ("lpm", "fcfs"):
            raise ValueError("schedule_policy must be 'lpm' or 'fcfs'")
        if self.decode_gemv not in DECODE_GEMV_KERNELS:
            raise ValueError("decode_gemv must be 'auto', 'cublas' or 'triton'")
        if self.cuda_graph_max_bs is not None and self.cuda_graph_max_bs < 0:
            raise ValueError("cuda_graph_max_bs must be >= 0 (0 turns CUDA graphs off)")
        if self.tp_size < 1:
            raise ValueError("tp_size must be >= 1")
        if self.tp_all_reduce not in TP_ALL_REDUCE_MODES:
            raise ValueError("tp_all_reduce must be 'auto', 'nccl', 'one_shot', 'fused' or 'push'")
        if self.tp_all_reduce == "push" and self.decode_gemv == "cublas":
            raise ValueError("tp_all_reduce='push' needs decode_gemv='triton' (or 'auto')")
        if self.tp_timeout_s <= 0:
            raise ValueError("tp_timeout_s must be positive")
        if self.max_total_tokens is not None and self.max_total_tokens < 2:
            raise ValueError("max_total_tokens must be >= 2")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}")
        return cls(**kwargs)

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)
