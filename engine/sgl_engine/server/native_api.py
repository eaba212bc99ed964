"""SGLang's native routes: /generate, /health, /get_model_info, /flush_cache, /metrics."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from sgl_engine.errors import InvalidRequestError
from sgl_engine.openai_format import finish_message, finish_reason, raise_if_rejected
from sgl_engine.sampling_params import MAX_N
from sgl_engine.server.app import (
    MAX_SEQUENCES_PER_REQUEST,
    ServerState,
    engine_health,
    error_response,
    require_healthy,
)
from sgl_engine.server.metrics import prometheus_text
from sgl_engine.server.protocol import GenerateRequest
from sgl_engine.server.streaming import (
    DONE,
    abort_on_disconnect,
    finite,
    merge_streams,
    sse,
    sse_response,
)

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.sgl


def _rids(body: GenerateRequest) -> tuple[Any, list[str]]:
    """The rid argument for the engine and every id the engine will use (n expands)."""
    count = len(body.text) if isinstance(body.text, list) else None
    if count is None and body.input_ids and isinstance(body.input_ids[0], list):
        count = len(body.input_ids)
    rid = body.rid
    if rid is None:
        prefix = uuid.uuid4().hex
        rid = prefix if count is None else [f"{prefix}-{i}" for i in range(count)]
    rids = [rid] if isinstance(rid, str) else list(rid)
    params = body.sampling_params
    per = params if isinstance(params, list) else [params] * len(rids)
    used = []
    for r, p in zip(rids, per, strict=False):
        n = (p or {}).get("n", 1) if isinstance(p, dict) else 1
        n = n if type(n) is int and 1 <= n <= MAX_N else 1  # else the engine refuses it
        used += [r] if n == 1 else [f"{r}-{k}" for k in range(n)]
    if len(used) > MAX_SEQUENCES_PER_REQUEST:
        raise InvalidRequestError(
            f"{len(used)} sequences (prompts times n) in one request; the limit is "
            f"{MAX_SEQUENCES_PER_REQUEST}",
            "text" if body.text is not None else "input_ids",
        )
    return rid, used


def _with_token_text(tok: Any, out: dict) -> dict:
    """Fill the text slot of SGLang's (logprob, token_id, text) tuples."""
    meta = dict(out["meta_info"])
    for key in ("input_token_logprobs", "output_token_logprobs"):
        if key in meta:
            meta[key] = [(lp, t, tok.decode([t])) for lp, t, _ in meta[key]]
    for key in ("input_top_logprobs", "output_top_logprobs"):
        if key in meta:
            meta[key] = [
                None if tops is None else [(lp, t, tok.decode([t])) for lp, t, _ in tops]
                for tops in meta[key]
            ]
    return {**out, "meta_info": meta}


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request) -> Any:
    eng = _state(request).engine
    await require_healthy(eng)  # 503 before anything starts, a stream before its first byte
    body.check_unicode()
    if body.text is not None and body.input_ids is not None:
        raise InvalidRequestError("give either text or input_ids, not both", "text")
    rid, used = _rids(body)
    args = dict(
        prompt=body.text,
        input_ids=body.input_ids,
        sampling_params=body.sampling_params,
        return_logprob=body.return_logprob,
        logprob_start_len=body.logprob_start_len,
        top_logprobs_num=body.top_logprobs_num,
        rid=rid,
    )
    if body.stream:
        stream = await eng.async_generate(**args, stream=True)
        return sse_response(_events(eng, body, stream, used))
    out = await abort_on_disconnect(request, eng, used, eng.async_generate(**args))
    raise_if_rejected(out if isinstance(out, list) else [out])
    if body.return_text_in_logprobs:
        out = (
            [_with_token_text(eng.tokenizer, o) for o in out]
            if isinstance(out, list)
            else (_with_token_text(eng.tokenizer, out))
        )
    return JSONResponse(finite(out))


async def _events(eng: Any, body: GenerateRequest, stream, used: list[str]) -> AsyncIterator[str]:
    async for _, chunk in merge_streams(eng, [stream], used):
        if body.return_text_in_logprobs:
            chunk = _with_token_text(eng.tokenizer, chunk)
        yield sse(chunk)
    yield DONE


@router.get("/health")
async def health(request: Request) -> Response:
    """200 while the engine can serve; 503 with the reason (`Engine.health()`) once it cannot."""
    message = await engine_health(_state(request).engine)
    return Response(status_code=200) if message is None else error_response(message, 503)


@router.get("/health_generate")
async def health_generate(request: Request) -> Response:
    """200 once a one-token request finishes; 503 if the engine is unhealthy or it aborts."""
    eng = _state(request).engine
    message = await engine_health(eng)
    if message is None:
        ids = [eng.tokenizer.eos_token_id or 0]
        out = await eng.async_generate(input_ids=ids, sampling_params={"max_new_tokens": 1})
        if finish_reason(out["meta_info"])[0] == "abort":
            message = finish_message(out["meta_info"]) or "the health check's request was aborted"
    return Response(status_code=200) if message is None else error_response(message, 503)


@router.get("/get_model_info")
async def get_model_info(request: Request) -> dict:
    s = _state(request)
    eng = s.engine
    return {
        "model_path": s.model_name,
        "tokenizer_path": s.model_name,
        "served_model_name": s.model_name,
        "is_generation": True,
        "context_length": eng.context_length,
    }


@router.post("/flush_cache")
async def flush_cache(request: Request) -> PlainTextResponse:
    ok = await asyncio.to_thread(_state(request).engine.flush_cache)
    if ok:
        return PlainTextResponse("Cache flushed.\n")
    return PlainTextResponse("Cache not flushed: requests are in flight.\n", status_code=400)


@router.get("/metrics")
async def metrics(request: Request) -> PlainTextResponse:
    s = _state(request)
    values = await asyncio.to_thread(s.engine.metrics)
    return PlainTextResponse(
        prometheus_text(values, s.model_name), media_type="text/plain; version=0.0.4"
    )
