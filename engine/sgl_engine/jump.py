"""Engine-side jump-forward: apply one grammar jump-forward step to a running request.

The grammar layer (`sgl_engine.grammar.jump_forward`) decides which output tokens to drop and
which tokens the forced text becomes (its module docstring states the retokenisation rule).
Here that decision is applied to a `Req`: its token ids, its KV slots and its logprobs. Only
tokens the request owns may be dropped: never prompt tokens and never KV that belongs to the
radix tree (positions below `prefix_len`). Dropped tokens that already have KV give their slots
back (the caller frees them); the forced tokens have no KV yet, so the next run step prefills
them all in one extend pass. A forced run never grows the output past `max_new_tokens` or the
context length: it is truncated there (the request then finishes with "length").
"""

from __future__ import annotations

from dataclasses import dataclass

from sgl_engine.grammar import jump_forward
from sgl_engine.request import Req

MAX_RETOKENIZE = 4


@dataclass(frozen=True)
class JumpStep:
    """What one jump did: `dropped` output tokens removed, `forced` tokens appended, and the
    KV slots of dropped tokens that the caller must return to the pool."""

    dropped: int
    forced: int
    freed_slots: tuple[int, ...]

    @property
    def passes_saved(self) -> int:
        """Decode passes the jump spared: one per net output token it added."""
        return max(self.forced - self.dropped, 0)


def droppable(req: Req) -> int:
    """How many trailing output tokens a jump may drop (owned by the request, not the tree)."""
    first = max(req.prefix_len, len(req.input_ids))
    return max(0, min(len(req.output_ids), req.seq_len - first))


def apply_jump(req: Req, tokenizer, context_length: int) -> JumpStep | None:
    """Run one jump-forward step on `req` (which must have a grammar matcher that accepted its
    output). Mutates `req.grammar`, `req.output_ids`, `req.slots`, `req.forced_tokens` and the
    output logprob lists (forced tokens get None); text and finish are the caller's job.
    Returns None (nothing changed) when the grammar forces nothing."""
    window = min(MAX_RETOKENIZE, droppable(req))
    step = jump_forward(req.grammar, tokenizer, req.output_ids, window)
    if step is None:
        return None
    keep = len(req.output_ids) - step.num_dropped
    limit = min(req.params.max_new_tokens, context_length - len(req.input_ids))
    new = list(step.new_tokens)[: max(limit - keep, 0)]
    kv_keep = len(req.input_ids) + keep
    freed = tuple(req.slots[kv_keep:])
    del req.slots[kv_keep:]
    del req.output_ids[keep:]
    req.output_ids.extend(new)
    if req.return_logprob:
        del req.output_logprobs[keep:]
        del req.output_top_logprobs[keep:]
        req.output_logprobs.extend([None] * len(new))
        req.output_top_logprobs.extend([None] * len(new))
    req.forced_tokens += len(new)
    return JumpStep(step.num_dropped, len(new), freed)
