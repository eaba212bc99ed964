"""Scoring continuations of a prefix by prompt logprobs (what SGLang's `select` computes).

The tokenisation boundary is handled as SGLang's `select` does: each continuation is scored
inside `tokenize(prefix + continuation)`, not as `tokenize(continuation)` glued to the prefix's
tokens, so the model sees the tokens it would see for the whole text. The continuation's tokens
are those from the first position where `tokenize(prefix + continuation)` and `tokenize(prefix)`
differ; when a tokenizer merges the prefix's last token with the start of the continuation
(`"Answer:"` + `" 4"` becoming one token), that merged token counts as the continuation's, as
SGLang's token healing counts the healed token. All continuations go to the engine as one
batch with `max_new_tokens=0`: the in-round prefix dedup prefills the shared prefix once, and
each continuation then recomputes only its tokens plus the one before them (the logprob of a
token comes from the position before it, whose logits the cache does not keep).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sgl_engine.errors import InvalidRequestError
from sgl_engine.inputs import GenerateRequest, check_text
from sgl_engine.radix_cache import common_prefix_len


@dataclass(frozen=True)
class ContinuationLogprobs:
    """One continuation's logprobs given the prefix: per token, summed, and the token count
    (divide `logprob_sum` by `num_tokens`, or read `logprob_mean`, to length-normalise as
    SGLang's `select` does)."""

    text: str
    token_ids: tuple[int, ...]
    token_logprobs: tuple[float, ...]
    logprob_sum: float
    num_tokens: int

    @property
    def logprob_mean(self) -> float:
        return self.logprob_sum / self.num_tokens


@dataclass(frozen=True)
class ScorePlan:
    """The token ids of each prefix + continuation and where its continuation's tokens start."""

    continuations: tuple[str, ...]
    input_ids: tuple[tuple[int, ...], ...]
    starts: tuple[int, ...]

    def request(self) -> GenerateRequest:
        """One batched `generate` call: prompt logprobs from each continuation's first token,
        nothing generated."""
        return GenerateRequest(
            input_ids=[list(ids) for ids in self.input_ids],
            sampling_params=[{"max_new_tokens": 0} for _ in self.input_ids],
            return_logprob=True,
            logprob_start_len=list(self.starts),
        )

    def results(self, outs: Sequence[dict[str, Any]]) -> list[ContinuationLogprobs]:
        """Read each continuation's logprobs out of the engine's results."""
        scores = []
        for text, ids, start, out in zip(
            self.continuations, self.input_ids, self.starts, outs, strict=True
        ):
            cont = ids[start:]
            entries = out["meta_info"]["input_token_logprobs"][-len(cont) :]
            if tuple(e[1] for e in entries) != cont or any(e[0] is None for e in entries):
                reason = out["meta_info"].get("finish_reason")
                raise RuntimeError(f"the engine did not score continuation {text!r}: {reason}")
            lps = tuple(float(e[0]) for e in entries)
            scores.append(ContinuationLogprobs(text, cont, lps, sum(lps), len(cont)))
        return scores


def plan_scores(
    prefix: str,
    continuations: Sequence[str],
    encode: Callable[[list[str]], list[list[int]]],
    check_text_length: Callable[[str, str], None],
    max_tokens: int,
) -> ScorePlan:
    """Validate and tokenise a `score` call. `encode` tokenises a list of texts,
    `check_text_length(text, field)` refuses texts too long to tokenise, and a prefix plus
    continuation must have fewer than `max_tokens` tokens. Raises `InvalidRequestError`."""
    if not isinstance(prefix, str):
        raise InvalidRequestError("prefix must be a string", "prefix")
    if not prefix:
        raise InvalidRequestError("prefix must not be empty", "prefix")
    check_text("prefix", prefix)
    if isinstance(continuations, str) or not isinstance(continuations, Sequence):
        raise InvalidRequestError("continuations must be a list of strings", "continuations")
    if not continuations:
        raise InvalidRequestError("continuations must not be empty", "continuations")
    for i, text in enumerate(continuations):
        field = f"continuations[{i}]"
        if not isinstance(text, str):
            raise InvalidRequestError(f"{field} must be a string", field)
        if not text:
            raise InvalidRequestError(f"{field} is empty: there is nothing to score", field)
        check_text(field, text)
        check_text_length(prefix + text, field)
    prefix_ids, *fulls = encode([prefix, *(prefix + c for c in continuations)])
    starts = []
    for i, ids in enumerate(fulls):
        field = f"continuations[{i}]"
        if len(ids) >= max_tokens:
            raise InvalidRequestError(
                f"prefix + {field} has {len(ids)} tokens; at most {max_tokens - 1} fit", field
            )
        start = common_prefix_len(prefix_ids, ids)
        if start == 0:
            raise InvalidRequestError(
                f"{field} merges with the whole prefix into its first token, which has no "
                "context to be scored against; give a longer prefix",
                field,
            )
        if start == len(ids):
            raise InvalidRequestError(f"{field} adds no tokens to the prefix", field)
        starts.append(start)
    return ScorePlan(tuple(continuations), tuple(tuple(ids) for ids in fulls), tuple(starts))
