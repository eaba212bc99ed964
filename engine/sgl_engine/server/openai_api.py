"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (SSE streaming)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from sgl_engine.errors import InvalidRequestError
from sgl_engine.openai_format import (
    chat_logprobs,
    completion_logprobs,
    finish_message,
    finish_reason,
    raise_if_rejected,
    rejection,
    usage,
)
from sgl_engine.server import tools as tool_calls
from sgl_engine.server.app import (
    MAX_SEQUENCES_PER_REQUEST,
    ServerState,
    error_body,
    require_healthy,
)
from sgl_engine.server.protocol import ChatCompletionRequest, CompletionRequest, _OpenAIBase
from sgl_engine.server.streaming import (
    DONE,
    Deltas,
    abort_on_disconnect,
    merge_streams,
    sse,
    sse_response,
)

router = APIRouter()

_EXTRA_KEYS = (
    "top_k",
    "min_p",
    "repetition_penalty",
    "ignore_eos",
    "skip_special_tokens",
    "no_stop_trim",
    "stop_token_ids",
    "regex",
    "ebnf",
    "json_schema",
    "choices",
)


def _state(request: Request) -> ServerState:
    return request.app.state.sgl


def sampling_params(body: _OpenAIBase, max_new_tokens: int) -> dict[str, Any]:
    """SGLang sampling params for an OpenAI request (None means the engine's default)."""
    params: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": body.min_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "seed": body.seed,
        "stop": body.stop,
        "n": body.n,
        **{key: getattr(body, key) for key in _EXTRA_KEYS},
    }
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        params["json_schema"] = {"type": "object"}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise InvalidRequestError(
                "response_format json_schema needs json_schema.schema", "response_format"
            )
        params["json_schema"] = fmt.json_schema.schema_
    return {k: v for k, v in params.items() if v is not None}


def _max_tokens(requested: int | None, prompt_len: int, context_length: int) -> int:
    room = context_length - prompt_len
    return room if requested is None else min(requested, max(room, 0))


def _rids(prefix: str, count: int, n: int) -> tuple[list[str], list[str]]:
    """Request ids to send (one per prompt) and the ids the engine will use (n per prompt)."""
    base = [f"{prefix}-{i}" for i in range(count)]
    used = base if n == 1 else [f"{b}-{k}" for b in base for k in range(n)]
    return base, used


async def open_streams(
    eng: Any, inputs: list[list[int]], params: dict, rids: list[str], logprob_args: dict, n: int
) -> list[AsyncIterator[dict]]:
    """One engine stream per choice (the engine streams n=1 only); seeds step per choice as
    the engine's own n expansion does. Validation errors raise before anything streams."""
    streams = []
    for k, (ids, rid) in enumerate(zip(inputs, rids, strict=True)):
        p = {**params, "n": 1}
        if p.get("seed") is not None:
            p["seed"] = p["seed"] + k % n
        streams.append(
            await eng.async_generate(
                input_ids=ids, sampling_params=p, stream=True, rid=rid, **logprob_args
            )
        )
    return streams


async def _raise_if_unavailable(eng: Any, results: list[dict]) -> None:
    """A non-streamed request aborted because the engine became unable to serve while it ran
    (a dead tensor-parallel rank): 503 with the reason rather than 200 with an abort."""
    if any(finish_reason(out["meta_info"])[0] == "abort" for out in results):
        await require_healthy(eng)


# ---- /v1/models ---------------------------------------------------------------------------------


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    s = _state(request)
    card = {
        "id": s.model_name,
        "object": "model",
        "created": s.created,
        "owned_by": "sgl-adapters",
        "max_model_len": s.engine.context_length,
    }
    return {"object": "list", "data": [card]}


# ---- /v1/completions ----------------------------------------------------------------------------


def _check_prompt_chars(eng: Any, texts: list[str], field: str) -> None:
    """The engine's cheap length check, before tokenising or rendering anything."""
    check = getattr(getattr(eng, "builder", None), "check_prompt_text", None)
    if check is not None:
        check("".join(texts), field)


def _completion_prompts(prompt: Any, eng: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise InvalidRequestError("prompt must not be empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    for p in prompt:
        if isinstance(p, str):
            _check_prompt_chars(eng, [p], "prompt")
    return [eng.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    s = _state(request)
    eng = s.engine
    s.check_model(body.model)
    body.check_unicode()
    await require_healthy(eng)
    if body.suffix:
        raise InvalidRequestError("suffix is not supported", "suffix")
    prompts = await asyncio.to_thread(_completion_prompts, body.prompt, eng)
    longest = max(len(p) for p in prompts)
    params = sampling_params(body, _max_tokens(body.max_tokens, longest, eng.context_length))
    want_lp = body.logprobs is not None
    rid_prefix = f"cmpl-{uuid.uuid4().hex}"
    if len(prompts) * body.n > MAX_SEQUENCES_PER_REQUEST:
        raise InvalidRequestError(
            f"{len(prompts) * body.n} sequences (prompts times n) in one request; the limit "
            f"is {MAX_SEQUENCES_PER_REQUEST}",
            "prompt",
        )
    base, used = _rids(rid_prefix, len(prompts), body.n)
    logprob_args = dict(
        return_logprob=want_lp,
        top_logprobs_num=body.logprobs or 0,
        logprob_start_len=0 if (want_lp and body.echo) else -1,
    )
    if body.stream:
        inputs = [prompts[i // body.n] for i in range(len(used))]
        streams = await open_streams(eng, inputs, params, used, logprob_args, body.n)
        return sse_response(_completion_events(s, body, rid_prefix, prompts, streams, used))
    work = eng.async_generate(input_ids=prompts, sampling_params=params, rid=base, **logprob_args)
    results = await abort_on_disconnect(request, eng, used, work)
    results = results if isinstance(results, list) else [results]
    raise_if_rejected(results)
    await _raise_if_unavailable(eng, results)
    choices = [
        _completion_choice(eng.tokenizer, body, i, prompts[i // body.n], out)
        for i, out in enumerate(results)
    ]
    return {
        "id": rid_prefix,
        "object": "text_completion",
        "created": int(time.time()),
        "model": s.model_name,
        "choices": choices,
        "usage": usage(results, body.n),
    }


def _completion_choice(tok: Any, body: CompletionRequest, index: int, prompt, out) -> dict:
    meta = out["meta_info"]
    text = out["text"]
    if body.echo:
        text = tok.decode(prompt) + text
    logprobs = None
    if body.logprobs is not None:
        logprobs = completion_logprobs(tok, meta, body.echo)
    reason, matched = finish_reason(meta)
    return {
        "index": index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": reason,
        "matched_stop": matched,
        **_finish_message(meta),
    }


def _finish_message(meta: dict) -> dict[str, str]:
    message = finish_message(meta)
    return {"finish_message": message} if message else {}


async def _completion_events(
    s: ServerState, body: CompletionRequest, rid: str, prompts, streams, used
) -> AsyncIterator[str]:
    tok = s.engine.tokenizer
    base = {"id": rid, "object": "text_completion", "created": int(time.time())}
    base["model"] = s.model_name
    finals: dict[int, dict] = {}
    sent_lp = [0] * len(streams)
    deltas = Deltas()
    if body.echo:
        for i in range(len(streams)):
            choice = {"index": i, "text": tok.decode(prompts[i // body.n]), "logprobs": None}
            yield sse({**base, "choices": [{**choice, "finish_reason": None}]})
    async for index, chunk in merge_streams(s.engine, streams, used):
        meta = chunk["meta_info"]
        done = meta.get("finish_reason") is not None
        if done and rejection(meta):
            yield sse(error_body(rejection(meta), 400, "sampling_params"))
            break
        logprobs = None
        if body.logprobs is not None:
            logprobs = completion_logprobs(tok, meta, False, start=sent_lp[index])
            sent_lp[index] = len(meta.get("output_token_logprobs", []))
        reason = finish_reason(meta)[0] if done else None
        choice = {"index": index, "text": deltas(index, chunk["text"]), "logprobs": logprobs}
        if done:
            finals[index] = chunk
            choice.update(_finish_message(meta))
        yield sse({**base, "choices": [{**choice, "finish_reason": reason}]})
    if body.stream_options and body.stream_options.include_usage:
        outs = [finals[i] for i in sorted(finals)]
        yield sse({**base, "choices": [], "usage": usage(outs, body.n)})
    yield DONE


# ---- /v1/chat/completions -----------------------------------------------------------------------


def _plan(eng: Any, body: ChatCompletionRequest, family: Any, params: dict) -> tuple:
    """(plan, prompt ids) of a chat request. Blocking (template rendering, grammar text and
    tokenising): run it off the event loop."""
    plan = tool_calls.plan_chat(eng, body, family, params)
    return plan, eng.tokenizer.encode(plan.prompt, add_special_tokens=False)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    s = _state(request)
    eng = s.engine
    s.check_model(body.model)
    body.check_unicode()
    await require_healthy(eng)
    _check_prompt_chars(eng, [_text_of(m.content) for m in body.messages], "messages")
    requested = (
        body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    )
    params = sampling_params(body, 0)
    plan, ids = await asyncio.to_thread(_plan, eng, body, s.family, params)
    params["max_new_tokens"] = _max_tokens(requested, len(ids), eng.context_length)
    rid_prefix = f"chatcmpl-{uuid.uuid4().hex}"
    base, used = _rids(rid_prefix, 1, body.n)
    logprob_args = dict(return_logprob=body.logprobs, top_logprobs_num=body.top_logprobs or 0)
    if body.stream:
        streams = await open_streams(eng, [ids] * len(used), params, used, logprob_args, body.n)
        return sse_response(_chat_events(s, body, rid_prefix, streams, used, plan))
    work = eng.async_generate(input_ids=ids, sampling_params=params, rid=base[0], **logprob_args)
    results = await abort_on_disconnect(request, eng, used, work)
    results = results if isinstance(results, list) else [results]
    raise_if_rejected(results)
    await _raise_if_unavailable(eng, results)
    choices = [_chat_choice(eng.tokenizer, body, i, out, plan) for i, out in enumerate(results)]
    return {
        "id": rid_prefix,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": s.model_name,
        "choices": choices,
        "usage": usage(results, body.n),
    }


def _text_of(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content)
    return content or ""


def _chat_choice(
    tok: Any, body: ChatCompletionRequest, index: int, out: dict, plan: tool_calls.ChatPlan
) -> dict:
    meta = out["meta_info"]
    message, has_calls = tool_calls.answer_message(plan, out["text"])
    reason, matched = finish_reason(meta)
    return {
        "index": index,
        "message": message,
        "logprobs": chat_logprobs(tok, meta) if body.logprobs else None,
        "finish_reason": "tool_calls" if has_calls and reason == "stop" else reason,
        "matched_stop": matched,
        **_finish_message(meta),
    }


async def _chat_events(
    s: ServerState, body: ChatCompletionRequest, rid: str, streams, used, plan
) -> AsyncIterator[str]:
    tok = s.engine.tokenizer
    base = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time())}
    base["model"] = s.model_name
    parsers = {i: tool_calls.ChoiceStream(plan) for i in range(len(streams))}
    finals: dict[int, dict] = {}
    sent_lp = [0] * len(streams)
    for i in range(len(streams)):
        first = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
        yield sse({**base, "choices": [{**first, "finish_reason": None}]})
    async for index, chunk in merge_streams(s.engine, streams, used):
        meta = chunk["meta_info"]
        done = meta.get("finish_reason") is not None
        if done and rejection(meta):
            yield sse(error_body(rejection(meta), 400, "sampling_params"))
            break
        choice: dict[str, Any] = {"index": index, "delta": {}, "logprobs": None}
        if body.logprobs:
            choice["logprobs"] = chat_logprobs(tok, meta, start=sent_lp[index])
            sent_lp[index] = len(meta.get("output_token_logprobs", []))
        choice["delta"] = parsers[index].feed(chunk["text"], final=done)
        reason = None
        if done:
            finals[index] = chunk
            reason = finish_reason(meta)[0]
            reason = "tool_calls" if parsers[index].called and reason == "stop" else reason
            choice.update(_finish_message(meta))
        if choice["delta"] or choice["logprobs"] or done:
            yield sse({**base, "choices": [{**choice, "finish_reason": reason}]})
    if body.stream_options and body.stream_options.include_usage:
        outs = [finals[i] for i in sorted(finals)]
        yield sse({**base, "choices": [], "usage": usage(outs, body.n)})
    yield DONE
