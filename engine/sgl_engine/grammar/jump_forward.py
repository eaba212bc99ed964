"""Jump-forward decoding (the paper's compressed FSM): append the text a grammar forces without
sampling it token by token, retokenising the tail so the tokens are the tokenizer's own.

The retokenisation rule. Let `forced` be the forced text and `j` the window: the last `j`
output tokens, with `j <= max_retokenize` and `j <=` how far the matcher can roll back (tokens
of the prompt are never touched). Re-encode `decode(last j tokens) + forced`; the new tail is
kept only if `decode(output[:-j] + new) == decode(output) + forced` exactly (this rejects
windows that start or end inside a UTF-8 character, and tokenizers that add a prefix space).
Windows are tried from the largest down to 0 (plain `encode(forced)` appended); the first exact
one wins. Tokens shared by the old and new tail are kept, so the result is
`(k = tokens to drop, new tokens to append)` with `k` as small as the chosen window allows.

A grammar literal that spells a special token (`"<|im_end|>"`) is never forced as that token,
which would end the turn or change the template's structure: forced text is cut before the
first special token's text (the model then samples it character by character under the
grammar's mask), and a retokenised tail that contains a special token id is rejected. Whether
a grammar matcher would accept the special token for that text differs between xgrammar
releases; this rule does not depend on it. (Encoding with `split_special_tokens` would need
the tokenizer's mutable state, which other threads use at the same time.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sgl_engine.grammar.xgrammar_backend import GrammarMatcher
from sgl_engine.radix_cache import common_prefix_len


@dataclass(frozen=True)
class JumpForward:
    """One jump-forward step: drop the last `num_dropped` output tokens, append `new_tokens`;
    the output text grows by exactly `text`."""

    num_dropped: int
    new_tokens: tuple[int, ...]
    text: str


def jump_forward_tokens(
    tokenizer, output_ids: Sequence[int], forced: str, max_retokenize: int = 4
) -> tuple[int, list[int]]:
    """(k, new) with `decode(output_ids[:len-k] + new) == decode(output_ids) + forced`, by the
    rule in the module docstring; `(0, [])` if no window decodes exactly. Pure."""
    if not forced:
        return 0, []
    ids = list(output_ids)
    target = _decode(tokenizer, ids) + forced
    special = set(tokenizer.all_special_ids)
    for j in range(min(max_retokenize, len(ids)), -1, -1):
        head, tail = ids[: len(ids) - j], ids[len(ids) - j :]
        new = _encode(tokenizer, _decode(tokenizer, tail) + forced)
        if special.isdisjoint(new) and _decode(tokenizer, head + new) == target:
            common = common_prefix_len(tail, new)
            return j - common, new[common:]
    return 0, []


def jump_forward(
    matcher: GrammarMatcher, tokenizer, output_ids: Sequence[int], max_retokenize: int = 4
) -> JumpForward | None:
    """Apply one jump-forward step to `matcher`, which must have accepted `output_ids` (at least
    its last `rollback_limit()` tokens). Mutates only `matcher`: afterwards it has accepted
    `output_ids[:len-k] + new_tokens`. Returns None (matcher unchanged) if nothing is forced or
    no tokens for the forced text are accepted. If the retokenised tail is rejected, falls back
    to appending the longest accepted prefix of `encode(forced)` without dropping anything."""
    forced = _before_special_text(tokenizer, matcher.jump_forward_string())
    if not forced:
        return None
    ids = list(output_ids)
    window = min(max_retokenize, matcher.rollback_limit())
    k, new = jump_forward_tokens(tokenizer, ids, forced, window)
    if new and _replace_tail(matcher, ids, k, new):
        return JumpForward(k, tuple(new), forced)
    return _append_accepted(matcher, tokenizer, ids, forced)


def _replace_tail(matcher: GrammarMatcher, ids: list[int], k: int, new: list[int]) -> bool:
    matcher.rollback(k)
    for accepted, token in enumerate(new):
        if not matcher.accept_token(token):
            matcher.rollback(accepted)
            if not all(matcher.accept_token(t) for t in ids[len(ids) - k :]):
                raise RuntimeError("matcher rejected tokens it accepted before the rollback")
            return False
    return True


def _append_accepted(
    matcher: GrammarMatcher, tokenizer, ids: list[int], forced: str
) -> JumpForward | None:
    _, new = jump_forward_tokens(tokenizer, ids, forced, max_retokenize=0)
    accepted: list[int] = []
    for token in new:
        if not matcher.accept_token(token):
            break
        accepted.append(token)
    if not accepted:
        return None
    before = _decode(tokenizer, ids)
    after = _decode(tokenizer, ids + accepted)
    if not after.startswith(before) or not forced.startswith(after[len(before) :]):
        matcher.rollback(len(accepted))
        return None
    return JumpForward(0, tuple(accepted), after[len(before) :])


def _before_special_text(tokenizer, text: str) -> str:
    """`text` up to the first occurrence of a special token's text."""
    if not text:
        return text
    cut = min((i for t in tokenizer.all_special_tokens if (i := text.find(t)) >= 0), default=-1)
    return text if cut < 0 else text[:cut]


def _decode(tokenizer, ids: Sequence[int]) -> str:
    """`tokenizer.decode(ids)` with special tokens kept and no clean-up. A fast tokenizer's Rust
    backend is called directly: what the wrapper does for these arguments, without its per-call
    Python conversions (two thirds of a jump's time on a CPU)."""
    backend = _backend(tokenizer)
    if backend is not None:
        return backend.decode(list(ids), skip_special_tokens=False)
    return tokenizer.decode(
        list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
    )


def _encode(tokenizer, text: str) -> list[int]:
    """`tokenizer.encode(text, add_special_tokens=False)`, through the backend as `_decode`."""
    backend = _backend(tokenizer)
    if backend is not None:
        return list(backend.encode(text, add_special_tokens=False).ids)
    return list(tokenizer.encode(text, add_special_tokens=False))


def _backend(tokenizer):
    """The `tokenizers.Tokenizer` behind a fast Hugging Face tokenizer, or None."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    return getattr(tokenizer, "backend_tokenizer", None)
