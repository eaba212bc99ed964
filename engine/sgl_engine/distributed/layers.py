"""Tensor-parallel layers (Megatron-style), equal to the plain layers when `tp` is None.

Column-parallel layers split their output features across ranks and need no communication;
row-parallel layers split their input features and all-reduce the partial sums (once per
attention and once per MLP); the embedding and lm_head split the vocabulary. Each layer loads
its rank's slice from the full (Hugging Face) tensor through `load_full(name, full, shard)` and
tells the full shape of a parameter through `full_shape(name)`, so a loader or a random
initialiser works on full tensors whatever the rank.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sgl_engine.distributed.group import TPGroup, shard_range

GemvFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gemv: GemvFn | None
) -> torch.Tensor:
    """F.linear, or `gemv` (a one-row kernel: models/gemv.py) when x is a single row."""
    if gemv is None or x.shape[0] != 1:
        return F.linear(x, weight, bias)
    y = gemv(x, weight)
    return y if bias is None else y + bias


def _rank_size(tp: TPGroup | None) -> tuple[int, int]:
    return (tp.rank, tp.size) if tp is not None else (0, 1)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with the output features split across ranks; no communication.

    `out_sizes` are the full sizes of the logical outputs held side by side: one for a plain
    layer, [q, k, v] for merged QKV, [gate, up] for merged gate/up. Each is split on its own, so
    rank r holds the r-th slice of every one, in order (its heads of q, then of k, then of v).
    """

    def __init__(
        self,
        in_features: int,
        out_sizes: list[int],
        bias: bool = False,
        tp: TPGroup | None = None,
        units: list[int] | None = None,
    ) -> None:
        super().__init__()
        rank, size = _rank_size(tp)
        units = units or [1] * len(out_sizes)
        self.out_sizes = list(out_sizes)
        self.ranges = []
        for n, unit in zip(out_sizes, units, strict=True):
            s, e = shard_range(n // unit, rank, size, f"an output of {n // unit} heads")
            self.ranges.append((s * unit, e * unit))
        self.local_sizes = [e - s for s, e in self.ranges]
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(sum(self.local_sizes), in_features))
        self.bias = nn.Parameter(torch.empty(sum(self.local_sizes))) if bias else None
        self.gemv: GemvFn | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.gemv)

    def full_shape(self, name: str) -> tuple[int, ...]:
        total = sum(self.out_sizes)
        return (total, self.in_features) if name == "weight" else (total,)

    @torch.no_grad()
    def load_full(self, name: str, full: torch.Tensor, shard: int | None = None) -> None:
        """Copy this rank's slice of `full` into parameter `name`: `full` is logical output
        `shard` (HF's q_proj, say), or all outputs merged when `shard` is None."""
        param = getattr(self, name)
        shards = range(len(self.out_sizes)) if shard is None else [shard]
        for i in shards:
            base = sum(self.out_sizes[:i]) if shard is None else 0
            s, e = self.ranges[i]
            dst = sum(self.local_sizes[:i])
            param[dst : dst + e - s].copy_(full[base + s : base + e].to(param.dtype))


class QKVParallelLinear(ColumnParallelLinear):
    """Merged q/k/v projection split by heads: each rank holds whole query and KV heads."""

    def __init__(
        self,
        hidden: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        tp: TPGroup | None = None,
    ) -> None:
        sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        super().__init__(hidden, sizes, bias, tp, units=[head_dim] * 3)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_r W_r^T) + b with the input features split across ranks (x arrives
    split the same way, from a column-parallel layer); the one collective of a block half.
    `forward(x, reduce=False)` returns this rank's partial sum instead (its share of the bias
    added), for a caller that fuses the all-reduce with what follows."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, tp: TPGroup | None = None
    ) -> None:
        super().__init__()
        rank, size = _rank_size(tp)
        self.tp = tp if size > 1 else None
        self.range = shard_range(in_features, rank, size, "input features")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features // size))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.gemv: GemvFn | None = None

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        push = self.tp.push if self.tp is not None and not reduce else None
        if push is not None and self.gemv is not None and self.bias is None:
            if push.fits(x, self.weight):
                return push.product(x, self.weight)
        y = linear(x, self.weight, None, self.gemv)
        if self.tp is None:
            return y if self.bias is None else y + self.bias
        if not reduce:
            return y if self.bias is None else y + self.bias / self.tp.size
        y = self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias

    def full_shape(self, name: str) -> tuple[int, ...]:
        return (self.out_features, self.in_features) if name == "weight" else (self.out_features,)

    @torch.no_grad()
    def load_full(self, name: str, full: torch.Tensor, shard: int | None = None) -> None:
        param = getattr(self, name)
        s, e = self.range
        param.copy_((full[:, s:e] if name == "weight" else full).to(param.dtype))


class VocabParallelEmbedding(nn.Module):
    """The embedding table split by vocabulary rows (padded to a multiple of tp_size); a token
    outside this rank's rows contributes zeros, and an all-reduce sums the ranks' rows."""

    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup | None = None) -> None:
        super().__init__()
        rank, size = _rank_size(tp)
        self.tp = tp if size > 1 else None
        self.vocab_size, self.hidden = vocab_size, hidden
        per_rank = -(-vocab_size // size)
        self.start = rank * per_rank
        self.end = self.start + per_rank
        self.weight = nn.Parameter(torch.empty(per_rank, hidden))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return F.embedding(ids, self.weight)
        inside = (ids >= self.start) & (ids < self.end)
        local = torch.where(inside, ids - self.start, 0)
        out = F.embedding(local, self.weight) * inside.unsqueeze(-1).to(self.weight.dtype)
        return self.tp.all_reduce(out)

    def full_shape(self, name: str) -> tuple[int, ...]:
        return (self.vocab_size, self.hidden)

    @torch.no_grad()
    def load_full(self, name: str, full: torch.Tensor, shard: int | None = None) -> None:
        rows = full[self.start : min(self.end, self.vocab_size)]
        self.weight[: rows.shape[0]].copy_(rows.to(self.weight.dtype))
        self.weight[rows.shape[0] :].zero_()


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection split by vocabulary rows (the same layout as the embedding, so the
    two can share a weight); `forward` all-gathers the full logits on every rank."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        if self.tp is None:
            return logits
        return self.tp.all_gather_last(logits)[..., : self.vocab_size]


def load_full(model: nn.Module, name: str, full: torch.Tensor, shard: int | None = None) -> None:
    """Load parameter `name` of `model` (dotted) from its full tensor, sharded where it is."""
    path, _, attr = name.rpartition(".")
    module = model.get_submodule(path)
    if hasattr(module, "load_full"):
        module.load_full(attr, full, shard)
        return
    if shard is not None:
        raise ValueError(f"{name} is not a merged layer")
    with torch.no_grad():
        param = getattr(module, attr)
        param.copy_(full.to(param.dtype))


def full_shape(model: nn.Module, name: str) -> tuple[int, ...]:
    """The full (unsharded) shape of parameter `name` of `model`."""
    path, _, attr = name.rpartition(".")
    module = model.get_submodule(path)
    if hasattr(module, "full_shape"):
        return module.full_shape(attr)
    return tuple(getattr(module, attr).shape)
