"""SGLang's auxiliary native routes that its clients (and our `http` backend) use:
/get_server_info, /tokenize, /detokenize, /abort_request, and the OpenAI /v1/models/{id}."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel

from sgl_engine.server.app import ServerState, error_response

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.sgl


class TokenizeRequest(BaseModel):
    prompt: str | list[str]
    add_special_tokens: bool = True
    model: str | None = None


class DetokenizeRequest(BaseModel):
    tokens: list[int] | list[list[int]]
    model: str | None = None


class AbortRequest(BaseModel):
    rid: str | list[str] = ""
    abort_all: bool = False


def _config(engine: Any) -> dict[str, Any]:
    """The engine's settings, scalars only, without filesystem paths."""
    config = getattr(engine, "config", None)
    if config is None or not dataclasses.is_dataclass(config):
        return {}
    return {
        k: v if isinstance(v, str | int | float | bool | None) else str(v)
        for k, v in dataclasses.asdict(config).items()
        if not k.endswith("_path")
    }


@router.get("/get_server_info")
async def get_server_info(request: Request) -> dict:
    """The engine's settings and live counters, in SGLang's shape (server args flattened,
    `internal_states` holding the scheduler's metrics)."""
    s = _state(request)
    eng = s.engine
    values = await asyncio.to_thread(eng.metrics)
    tok = eng.tokenizer
    return {
        **_config(eng),
        "model_path": s.model_name,  # never the path in the cache (docs/SECURITY.md)
        "tokenizer_path": s.model_name,
        "served_model_name": s.model_name,
        "bos_token": getattr(tok, "bos_token", None),
        "eos_token": getattr(tok, "eos_token", None),
        "all_special_ids": list(getattr(tok, "all_special_ids", ())),
        "context_length": eng.context_length,
        "chat_template": getattr(eng.tokenizer, "chat_template", None),
        "internal_states": [values],
        "in_batch_prefix_dedup": True,
        "version": "sgl-adapters",
    }


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    """{"tokens", "count", "max_model_len"}; a list of prompts gives lists."""
    eng = _state(request).engine
    tok = eng.tokenizer

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=body.add_special_tokens)

    if isinstance(body.prompt, str):
        tokens: Any = await asyncio.to_thread(encode, body.prompt)
        count: Any = len(tokens)
    else:
        tokens = await asyncio.to_thread(lambda: [encode(p) for p in body.prompt])
        count = [len(t) for t in tokens]
    return {"tokens": tokens, "count": count, "max_model_len": eng.context_length}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> Any:
    eng = _state(request).engine
    tok = eng.tokenizer
    vocab = max(len(tok), int(getattr(getattr(eng, "hf_config", None), "vocab_size", 0) or 0))
    batch = body.tokens and isinstance(body.tokens[0], list)
    seqs = body.tokens if batch else [body.tokens]
    bad = [t for seq in seqs for t in seq if not 0 <= t < vocab]
    if bad:
        return error_response(
            f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", 400, "tokens"
        )
    texts = [tok.decode(seq) for seq in seqs]
    return {"text": texts if batch else texts[0]}


@router.post("/abort_request")
async def abort_request(body: AbortRequest, request: Request) -> dict:
    """Abort the request(s) with these ids (queued or running; unknown ids are ignored).
    `abort_all` is refused: the engine keeps no list of foreign requests to abort."""
    if body.abort_all:
        return error_response("abort_all is not supported; give rid", 400, "abort_all")
    eng = _state(request).engine
    rids = [body.rid] if isinstance(body.rid, str) else body.rid
    for rid in rids:
        if rid:
            eng.abort(rid)
    return {"aborted": [r for r in rids if r]}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> Any:
    s = _state(request)
    if model_id != s.model_name and model_id not in s.model_aliases:
        return error_response(f"model {model_id!r} not found", 404, "model", "model_not_found")
    return {
        "id": s.model_name,
        "object": "model",
        "created": s.created,
        "owned_by": "sgl-adapters",
        "max_model_len": s.engine.context_length,
    }
