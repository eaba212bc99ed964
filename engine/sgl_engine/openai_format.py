"""Engine results as OpenAI response pieces: finish reasons, usage, logprobs, JSON-safe
numbers. Plain functions without HTTP (no FastAPI): the server and the LangChain front door
both use them."""

from __future__ import annotations

import math
from typing import Any

from sgl_engine.errors import InvalidRequestError

_REJECTED = "invalid constraint"
MIN_LOGPROB = -9999.0


def finite(value: Any) -> Any:
    """JSON-safe numbers: -inf logprobs become -9999.0 (as OpenAI does), NaN becomes None."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return MIN_LOGPROB if value < 0 else 9999.0
        return value
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def finish_reason(meta: dict) -> tuple[str | None, int | str | None]:
    """(OpenAI finish_reason, matched stop) of a result's meta_info."""
    reason = meta.get("finish_reason")
    if reason is None:
        return None, None
    return reason.get("type"), reason.get("matched")


def finish_message(meta: dict) -> str | None:
    """Why a request ended early, when the engine says (an abort -- KV cache exhausted, an
    internal error, a client abort -- or max tokens clamped to the context): the choice's
    `finish_message`, beside `finish_reason` "abort" or "length"."""
    reason = meta.get("finish_reason") or {}
    return reason.get("message")


def rejection(meta: dict) -> str | None:
    """The message when the engine refused the request itself (e.g. a bad constraint)."""
    reason = meta.get("finish_reason") or {}
    message = reason.get("message") or ""
    return message if reason.get("type") == "abort" and message.startswith(_REJECTED) else None


def raise_if_rejected(results: list[dict]) -> None:
    for out in results:
        message = rejection(out["meta_info"])
        if message:
            raise InvalidRequestError(message, "sampling_params")


def usage(results: list[dict], n: int) -> dict[str, Any]:
    """Usage over all choices: each prompt counted once, cached tokens of its first choice."""
    firsts = [out["meta_info"] for out in results[::n]]
    prompt = sum(m["prompt_tokens"] for m in firsts)
    completion = sum(out["meta_info"]["completion_tokens"] for out in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(m.get("cached_tokens", 0) for m in firsts)},
    }


def _token(tok: Any, token_id: int) -> str:
    return tok.decode([token_id])


def chat_logprobs(tok: Any, meta: dict, start: int = 0) -> dict[str, Any]:
    """OpenAI chat `logprobs` for output tokens from index `start` on."""
    entries = meta.get("output_token_logprobs", [])[start:]
    tops = meta.get("output_top_logprobs", [])[start:]
    content = []
    for k, (lp, tid, _) in enumerate(entries):
        text = _token(tok, tid)
        alts = tops[k] if k < len(tops) and tops[k] else []
        content.append(
            {
                "token": text,
                "logprob": finite(lp),
                "bytes": list(text.encode()),
                "top_logprobs": [
                    {
                        "token": _token(tok, a_id),
                        "logprob": finite(a_lp),
                        "bytes": list(_token(tok, a_id).encode()),
                    }
                    for a_lp, a_id, _ in alts
                ],
            }
        )
    return {"content": content}


def completion_logprobs(tok: Any, meta: dict, echo: bool, start: int = 0) -> dict[str, Any]:
    """OpenAI completions `logprobs` (tokens, token_logprobs, top_logprobs, text_offset)."""
    entries = list(meta.get("output_token_logprobs", [])[start:])
    tops = list(meta.get("output_top_logprobs", [])[start:])
    if echo:
        entries = list(meta.get("input_token_logprobs", [])) + entries
        tops = list(meta.get("input_top_logprobs", [])) + tops
    tokens, offsets, offset = [], [], 0
    for _, tid, _ in entries:
        tokens.append(_token(tok, tid))
        offsets.append(offset)
        offset += len(tokens[-1])
    top_maps = []
    for k in range(len(entries)):
        alts = tops[k] if k < len(tops) and tops[k] else None
        top_maps.append(
            None if alts is None else {_token(tok, a_id): finite(a_lp) for a_lp, a_id, _ in alts}
        )
    return {
        "tokens": tokens,
        "token_logprobs": [finite(lp) for lp, _, _ in entries],
        "top_logprobs": top_maps,
        "text_offset": offsets,
    }
