"""Logprob fields of `meta_info`: token text for `return_text_in_logprobs`, and the running
(cumulative) and incremental views of a streamed generation's output logprobs.

Entries are SGLang's `(logprob, token_id, text)` tuples; top-logprob slots are lists of them
(or None). Functions return new dicts and never mutate their arguments.
"""

from __future__ import annotations

from typing import Any

Meta = dict[str, Any]

TOKEN_KEYS = ("input_token_logprobs", "output_token_logprobs")
TOP_KEYS = ("input_top_logprobs", "output_top_logprobs")
STREAMED_KEYS = ("output_token_logprobs", "output_top_logprobs")


def _with_text(entry: Any, tokenizer: Any) -> Any:
    lp, tid = entry[0], entry[1]
    text = entry[2] if len(entry) > 2 and entry[2] is not None else tokenizer.decode([tid])
    return (lp, tid, text)


def fill_token_text(meta: Meta | None, tokenizer: Any) -> Meta | None:
    """A copy of `meta` whose logprob entries carry their token's text (decoded with
    `tokenizer` where the backend left the slot None)."""
    if not meta or tokenizer is None:
        return meta
    out = dict(meta)
    for key in TOKEN_KEYS:
        if out.get(key):
            out[key] = [_with_text(e, tokenizer) for e in out[key]]
    for key in TOP_KEYS:
        if out.get(key):
            out[key] = [
                None if tops is None else [_with_text(e, tokenizer) for e in tops]
                for tops in out[key]
            ]
    return out


def accumulate(running: Meta | None, chunk: Meta) -> Meta:
    """The running meta_info after a streamed chunk. Chunks may carry all output logprobs so
    far (our engine) or only the new ones (servers streaming incrementally): a chunk whose
    list is shorter than its `completion_tokens` is taken as incremental and appended."""
    out = dict(chunk)
    done = chunk.get("completion_tokens")
    for key in STREAMED_KEYS:
        new = chunk.get(key)
        if new is None:
            continue
        if running is not None and done is not None and len(new) < done:
            out[key] = list(running.get(key) or []) + list(new)
    return out


def increment(running: Meta, sent: dict[str, int]) -> Meta:
    """`running` with each streamed logprob list cut to the entries after `sent[key]`;
    updates `sent` to the new lengths (the reader's own counter)."""
    out = dict(running)
    for key in STREAMED_KEYS:
        if key in running and running[key] is not None:
            out[key] = list(running[key][sent.get(key, 0) :])
            sent[key] = len(running[key])
    return out


def has_unsent(running: Meta | None, sent: dict[str, int]) -> bool:
    return bool(running) and any(len(running.get(k) or []) > sent.get(k, 0) for k in STREAMED_KEYS)
