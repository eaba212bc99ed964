"""How `select` picks a choice from prompt logprobs (SGLang's three choice methods).

Each method receives, per choice, the logprobs of the choice's tokens given the prompt
(`input_token_logprobs`: lists of (logprob, token_id, text) after token healing) and their
mean (`normalized_prompt_logprobs`); the unconditional method also receives the logprobs of
the same tokens with no prompt. Methods are pure functions of their inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

LogprobEntry = Sequence[Any]  # (logprob | None, token_id, text | None)


@dataclass(frozen=True)
class ChoicesDecision:
    decision: str
    meta_info: dict[str, Any] = field(default_factory=dict)


def _values(entries: Sequence[LogprobEntry]) -> list[float]:
    return [float(e[0]) for e in entries if e[0] is not None]


def mean_logprob(entries: Sequence[LogprobEntry]) -> float:
    values = _values(entries)
    return sum(values) / len(values) if values else -math.inf


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


class ChoicesSamplingMethod:
    """Base class: `__call__` returns the decision; `requires_unconditional_logprobs` asks
    the backend to also score each choice with an empty prompt."""

    requires_unconditional_logprobs: bool = False

    def __call__(
        self,
        *,
        choices: Sequence[str],
        normalized_prompt_logprobs: Sequence[float],
        input_token_logprobs: Sequence[Sequence[LogprobEntry]],
        output_token_logprobs: Sequence[Sequence[LogprobEntry]],
        unconditional_token_logprobs: Sequence[Sequence[LogprobEntry]] | None = None,
    ) -> ChoicesDecision:
        raise NotImplementedError

    def __repr__(self) -> str:
        return type(self).__name__


def _base_meta(normalized, inputs, outputs) -> dict[str, Any]:
    return {
        "normalized_prompt_logprobs": list(normalized),
        "input_token_logprobs": [list(x) for x in inputs],
        "output_token_logprobs": [list(x) for x in outputs],
    }


class TokenLengthNormalized(ChoicesSamplingMethod):
    """The choice with the highest mean token logprob."""

    def __call__(
        self,
        *,
        choices,
        normalized_prompt_logprobs,
        input_token_logprobs,
        output_token_logprobs,
        unconditional_token_logprobs=None,
    ) -> ChoicesDecision:
        best = _argmax(normalized_prompt_logprobs)
        meta = _base_meta(normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs)
        return ChoicesDecision(choices[best], meta)


class GreedyTokenSelection(ChoicesSamplingMethod):
    """Compare token by token, keeping the choices with the best logprob at each position;
    a shorter choice is padded with its own mean logprob."""

    def __call__(
        self,
        *,
        choices,
        normalized_prompt_logprobs,
        input_token_logprobs,
        output_token_logprobs,
        unconditional_token_logprobs=None,
    ) -> ChoicesDecision:
        rows = [_values(entries) for entries in input_token_logprobs]
        width = max((len(r) for r in rows), default=0)
        matrix = [r + [sum(r) / len(r) if r else -math.inf] * (width - len(r)) for r in rows]
        remaining = list(range(len(choices)))
        for j in range(width):
            best = max(matrix[i][j] for i in remaining)
            remaining = [i for i in remaining if matrix[i][j] == best]
            if len(remaining) == 1:
                break
        meta = _base_meta(normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs)
        meta["greedy_logprob_matrix"] = matrix
        return ChoicesDecision(choices[remaining[0]], meta)


class UnconditionalLikelihoodNormalized(ChoicesSamplingMethod):
    """The choice with the highest mean of (logprob given the prompt - logprob given nothing);
    an unconditional first token without a logprob counts as 0."""

    requires_unconditional_logprobs = True

    def __call__(
        self,
        *,
        choices,
        normalized_prompt_logprobs,
        input_token_logprobs,
        output_token_logprobs,
        unconditional_token_logprobs=None,
    ) -> ChoicesDecision:
        if unconditional_token_logprobs is None:
            raise ValueError("unconditional_likelihood_normalized needs unconditional logprobs")
        scores = []
        for cond, uncond in zip(input_token_logprobs, unconditional_token_logprobs, strict=True):
            if len(cond) != len(uncond):
                raise ValueError("conditional and unconditional logprobs differ in length")
            diffs = [
                float(c[0] or 0.0) - float(u[0] or 0.0) for c, u in zip(cond, uncond, strict=True)
            ]
            scores.append(sum(diffs) / len(diffs) if diffs else -math.inf)
        meta = _base_meta(normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs)
        meta["unconditional_token_logprobs"] = [list(x) for x in unconditional_token_logprobs]
        meta["normalized_unconditional_prompt_logprobs"] = scores
        return ChoicesDecision(choices[_argmax(scores)], meta)


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()
