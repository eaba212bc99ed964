"""Batched next-token sampling: penalties, bans, grammar mask, then greedy or filtered sampling.

One call per decode step over the whole batch. Every op is vectorised over [B, V] on the logits'
device; Python only builds small per-row tensors from the params (and loops over the rows that
carry their own generator).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np
import torch

from .forward_batch import to_device
from .sampling_params import SamplingParams

_NEG_INF = float("-inf")
_TOPK_SELECT_MAX = 1024


@dataclass
class SampleOutput:
    """What one sampler call returns.

    `logprobs` is log_softmax of the raw logits (before penalties, temperature and masks): what
    `return_logprob` reports. `mask_empty[i]` is True when `allowed_mask` left row i no token at
    all; that row's token was then chosen without the mask and the engine should finish the
    request with an error.
    """

    next_token_ids: list[int]
    logprobs: torch.Tensor
    chosen_logprobs: list[float]
    mask_empty: list[bool] = field(default_factory=list)


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A `torch.Generator` on `device` seeded with `seed`, or None for the shared default RNG."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def top_logprobs(logprobs: torch.Tensor, k: int) -> list[list[tuple[float, int]]]:
    """The k most likely (logprob, token id) pairs of each row, most likely first."""
    rows = logprobs.shape[0]
    k = min(k, logprobs.shape[-1])
    if k <= 0:
        return [[] for _ in range(rows)]
    values, indices = torch.topk(logprobs, k, dim=-1)
    return [
        list(zip(v, i, strict=True)) for v, i in zip(values.tolist(), indices.tolist(), strict=True)
    ]


def _row_index(
    rows: Sequence[int], ids_per_row: Sequence[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(ids) for ids in ids_per_row], dtype=torch.long)
    row_idx = torch.repeat_interleave(torch.tensor(list(rows), dtype=torch.long), lengths)
    flat = np.fromiter(chain.from_iterable(ids_per_row), dtype=np.int64, count=int(lengths.sum()))
    return to_device(row_idx, torch.long, device), to_device(flat, torch.long, device)


def _per_row(device: torch.device, *columns: Sequence[float]) -> torch.Tensor:
    """A [B, k] float32 tensor of k per-row scalar columns, copied to the device once."""
    return to_device(
        torch.tensor(columns, dtype=torch.float32).T.contiguous(), torch.float32, device
    )


def apply_penalties(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    output_ids: Sequence[Sequence[int]],
    prompt_ids: Sequence[Sequence[int]],
) -> None:
    """Mutates `logits` [B, V] in place.

    Repetition penalty (HF/vLLM): every token seen in prompt + output has its logit divided by
    the penalty if positive, multiplied if not. Frequency/presence (OpenAI): subtract
    `frequency * count + presence * (count > 0)` over the output tokens.
    """
    device = logits.device
    rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if rep_rows:
        row_idx, col_idx = _row_index(
            [i for i in rep_rows for _ in (0, 1)],
            [ids for i in rep_rows for ids in (prompt_ids[i], output_ids[i])],
            device,
        )
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[row_idx, col_idx] = True
        penalty = _per_row(device, [p.repetition_penalty for p in params])
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits.copy_(torch.where(seen, penalised, logits))
    fp_rows = [
        i for i, p in enumerate(params) if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
    ]
    if fp_rows:
        row_idx, col_idx = _row_index(fp_rows, [output_ids[i] for i in fp_rows], device)
        counts = torch.zeros_like(logits)
        counts.index_put_((row_idx, col_idx), torch.ones_like(col_idx, dtype=counts.dtype), True)
        coef = _per_row(
            device, [p.frequency_penalty for p in params], [p.presence_penalty for p in params]
        )
        logits.sub_(coef[:, :1] * counts + coef[:, 1:] * (counts > 0))


def _ban(logits: torch.Tensor, banned_ids: Sequence[Sequence[int]]) -> torch.Tensor | None:
    vocab = logits.shape[-1]
    rows = [i for i, ids in enumerate(banned_ids) if ids]
    if not rows:
        return None
    ids = [[t for t in banned_ids[i] if 0 <= t < vocab] for i in rows]
    row_idx, col_idx = _row_index(rows, ids, logits.device)
    banned = logits.clone()
    banned[row_idx, col_idx] = _NEG_INF
    return banned


def _fit_mask(allowed_mask: torch.Tensor, shape: torch.Size, device: torch.device) -> torch.Tensor:
    mask = allowed_mask.to(device=device, dtype=torch.bool)
    if mask.shape[0] != shape[0] or mask.shape[1] > shape[1]:
        raise ValueError(f"allowed_mask shape {tuple(mask.shape)} does not fit logits {shape}")
    if mask.shape[1] < shape[1]:
        mask = torch.nn.functional.pad(mask, (0, shape[1] - mask.shape[1]), value=False)
    return mask


def constrain(
    logits: torch.Tensor,
    allowed_mask: torch.Tensor | None,
    banned_ids: Sequence[Sequence[int]] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (constrained logits, mask_empty [B] bool); does not mutate `logits`.

    Banned ids and disallowed tokens become -inf. A row left with no token drops its bans first
    (the grammar wins over min_new_tokens), then, if the mask alone empties it, its mask too
    (flagged in mask_empty). A mask narrower than V disallows the extra columns.
    """
    empty = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    banned = _ban(logits, banned_ids) if banned_ids is not None else None
    if allowed_mask is None:
        if banned is None:
            return logits, empty
        alive = torch.isfinite(banned).any(dim=-1, keepdim=True)
        return torch.where(alive, banned, logits), empty
    mask = _fit_mask(allowed_mask, logits.shape, logits.device)
    masked = logits.masked_fill(~mask, _NEG_INF)
    if banned is not None:
        both = banned.masked_fill_(~mask, _NEG_INF)
        masked = torch.where(torch.isfinite(both).any(dim=-1, keepdim=True), both, masked)
    empty = ~torch.isfinite(masked).any(dim=-1)
    return torch.where(empty.unsqueeze(1), logits, masked), empty


def filter_probs(probs: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Zero the probabilities that top-k, then top-p, then min-p exclude (HF warper semantics).

    Top-p keeps the smallest most-likely set whose top-k-renormalised mass reaches top_p (never
    less than the most likely token, so a top_p that underflows to 0 still samples); min-p
    drops tokens below min_p times the most likely one. Equal probabilities rank by lower token
    id. When every row has a top_k of at most 1024, only those candidates are sorted. Returns a
    new unnormalised [S, V] tensor.
    """
    vocab = probs.shape[-1]
    top_ks = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
    knobs = _per_row(
        probs.device,
        top_ks,
        [p.top_p if p.top_p < 1.0 else 2.0 for p in params],
        [p.min_p for p in params],
    )
    top_k, top_p, min_p = knobs[:, :1], knobs[:, 1:2], knobs[:, 2:]
    widest = max(top_ks)
    if widest <= _TOPK_SELECT_MAX:
        candidates = torch.topk(probs, widest, dim=-1, sorted=False).indices.sort(dim=-1).values
        sorted_probs, rank = probs.gather(1, candidates).sort(dim=-1, descending=True, stable=True)
        order = candidates.gather(1, rank)
    else:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    position = torch.arange(sorted_probs.shape[-1], device=probs.device).unsqueeze(0)
    sorted_probs = sorted_probs.masked_fill(position >= top_k, 0.0)
    cumulative = sorted_probs.cumsum(dim=-1)
    mass_before = cumulative - sorted_probs
    outside = (mass_before >= top_p * cumulative[:, -1:]) & (position > 0)
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    sorted_probs = sorted_probs.masked_fill(sorted_probs < min_p * sorted_probs[:, :1], 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_probs)


def _exponential_noise(
    shape: torch.Size, device: torch.device, generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    noise = torch.empty(shape, dtype=torch.float32, device=device)
    noise.exponential_()
    for row, generator in enumerate(generators):
        if generator is not None:
            noise[row].exponential_(generator=generator)
    return noise.clamp_min_(torch.finfo(torch.float32).tiny)


def sample_rows(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Sample one token per row of `logits` [S, V] (each row's own temperature and filters).

    Uses the exponential-race form of multinomial sampling (argmax of p / Exp(1) noise), so a row
    with its own generator draws the same token whatever else is in the batch.
    """
    temperature = _per_row(logits.device, [p.temperature for p in params])
    probs = torch.softmax(logits / temperature, dim=-1)
    if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in params):
        probs = filter_probs(probs, params)
    noise = _exponential_noise(probs.shape, probs.device, generators)
    return (probs / noise).argmax(dim=-1)


@dataclass
class DeviceSample:
    """A sampler call's results still on the logits' device (nothing has been synchronised)."""

    next_ids: torch.Tensor
    logprobs: torch.Tensor
    chosen: torch.Tensor
    mask_empty: torch.Tensor

    def packed(self) -> torch.Tensor:
        """[3, B] float64: next ids, chosen logprobs, mask-empty flags (one copy to the host)."""
        return torch.stack([self.next_ids.double(), self.chosen.double(), self.mask_empty.double()])

    @staticmethod
    def unpack(host: list[list[float]], logprobs: torch.Tensor) -> SampleOutput:
        return SampleOutput(
            next_token_ids=[int(t) for t in host[0]],
            logprobs=logprobs,
            chosen_logprobs=host[1],
            mask_empty=[bool(f) for f in host[2]],
        )


class Sampler:
    """Stateless batched sampler; holds no tensors between calls and mutates none of its inputs."""

    def __call__(self, logits: torch.Tensor, *args: Any, **kwargs: Any) -> SampleOutput:
        """Sample one token per row of `logits` [B, V]; the arguments are `on_device`'s."""
        out = self.on_device(logits, *args, **kwargs)
        return DeviceSample.unpack(out.packed().tolist(), out.logprobs)

    def on_device(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        output_ids: Sequence[Sequence[int]],
        prompt_ids: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator | None],
        allowed_mask: torch.Tensor | None = None,
        banned_ids: Sequence[Sequence[int]] | None = None,
    ) -> DeviceSample:
        """Per row: penalties, bans and the grammar mask, then greedy or filtered sampling, with
        per-row params, generators and histories; nothing is read back to the host."""
        batch = logits.shape[0]
        lengths = {len(params), len(output_ids), len(prompt_ids), len(generators)}
        if logits.dim() != 2 or lengths != {batch}:
            raise ValueError(f"logits {tuple(logits.shape)} and per-row inputs {lengths} differ")
        if banned_ids is not None and len(banned_ids) != batch:
            raise ValueError(f"banned_ids has {len(banned_ids)} rows, logits {batch}")
        logits = logits.to(torch.float32)
        logprobs = torch.log_softmax(logits, dim=-1)
        processed = logits.clone()
        if any(p.has_penalties for p in params):
            apply_penalties(processed, params, output_ids, prompt_ids)
        processed, mask_empty = constrain(processed, allowed_mask, banned_ids)
        next_ids = processed.argmax(dim=-1)
        sampled = [i for i, p in enumerate(params) if not p.is_greedy]
        if sampled:
            index = to_device(sampled, torch.long, logits.device)
            next_ids[index] = sample_rows(
                processed[index], [params[i] for i in sampled], [generators[i] for i in sampled]
            )
        chosen = logprobs.gather(1, next_ids.unsqueeze(1)).squeeze(1)
        return DeviceSample(next_ids, logprobs, chosen, mask_empty)
