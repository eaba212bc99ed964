"""The FastAPI app: state, safety middleware (API key, Host check, body size limit), served
model names and error responses. docs/SECURITY.md says what this promises."""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sgl_engine.errors import EngineUnavailableError, InvalidRequestError

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_SEQUENCES_PER_REQUEST = 1024
"""The most sequences (prompts times n) one HTTP request may ask for."""
OPEN_PATHS = frozenset({"/health"})
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ServerState:
    """What every handler reads: the engine (thread-safe) and fixed facts about the model.

    `model_name` is the served name (never a cache path); `model_aliases` are the other names
    a request's `model` may give (the path or hub id the model was loaded from, its folder
    name)."""

    engine: Any
    model_name: str
    family: Any = None
    """The model's `sgl_engine.families.ModelFamily` (tool-call format, reasoning markers)."""
    model_aliases: frozenset[str] = frozenset()
    created: int = field(default_factory=lambda: int(time.time()))

    def check_model(self, model: str | None) -> None:
        """Raise `ModelNotFoundError` unless `model` is None, the served name or an alias."""
        if model is not None and model != self.model_name and model not in self.model_aliases:
            raise ModelNotFoundError(model)


class ModelNotFoundError(Exception):
    """A request named a model this server does not serve (404 model_not_found)."""

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.model = model


def served_names(engine: Any, served_model_name: str | None) -> tuple[str, frozenset[str]]:
    """The name to serve under and its aliases. The default name is the folder name or hub id
    the model was given as (the embedded model's own name), so no cache path is exposed."""
    config = getattr(engine, "config", None)
    given = getattr(config, "model_path", None)
    resolved = getattr(engine, "model_path", None)
    aliases = {str(p) for p in (given, resolved) if p}
    aliases |= {os.path.basename(os.path.normpath(p)) for p in aliases}
    if given is None:
        default = EMBEDDED_NAME
    elif os.path.isdir(os.path.expanduser(str(given))):
        default = os.path.basename(os.path.normpath(str(given)))
    else:
        default = str(given)
    name = served_model_name or getattr(config, "served_model_name", None) or default
    return name, frozenset(aliases | {default} - {""})


def create_app(
    engine: Any,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    model_name: str | None = None,
    allowed_hosts: tuple[str, ...] = (),
    families: Any = None,
) -> FastAPI:
    """An app serving `engine` with the OpenAI API and SGLang's native API.

    `api_key` (when given) is required as `Authorization: Bearer <key>` on every path but
    /health. Without a key only requests whose Host header names a loopback address or one of
    `allowed_hosts` ("*" for any) are served (DNS rebinding cannot reach the API). Bodies
    larger than `max_body_bytes` get 413. `model_name` is the served name (default: see
    `served_names`). `families` (a `sgl_engine.families.FamilyRegistry`, default the
    built-ins) picks the model's family. The app never shuts the engine down: whoever made the
    engine owns it (see `launch.serve`).
    """
    from sgl_engine.server import admin_api, native_api, openai_api

    name, aliases = served_names(engine, model_name)
    app = FastAPI(title="sgl-adapters", docs_url=None, redoc_url=None, openapi_url=None)
    from sgl_engine.families import family_of

    family = family_of(engine, families)
    app.state.sgl = ServerState(
        engine=engine, model_name=name, model_aliases=aliases, family=family
    )
    app.include_router(openai_api.router)
    app.include_router(native_api.router)
    app.include_router(admin_api.router)
    _install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    elif "*" not in allowed_hosts:
        app.add_middleware(HostCheckMiddleware, allowed=LOOPBACK_HOSTS | set(allowed_hosts))
    return app


async def engine_health(engine: Any) -> str | None:
    """`engine.health()` run off the event loop (a `ProcessEngine` asks its child): None when
    it can serve, else why not. An engine-shaped object without `health` counts as healthy."""
    health = getattr(engine, "health", None)
    return None if health is None else await asyncio.to_thread(health)


async def require_healthy(engine: Any) -> None:
    """Raise `EngineUnavailableError` (answered 503) unless the engine can serve."""
    message = await engine_health(engine)
    if message is not None:
        raise EngineUnavailableError(message)


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def error_body(
    message: str, status: int, param: str | None = None, code: int | str | None = None
) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    body = {"message": message, "type": kind, "param": param, "code": code or status}
    return {"error": body}


def error_response(
    message: str, status: int = 400, param: str | None = None, code: int | str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, status, param, code), status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(InvalidRequestError)
    async def _invalid(_: Request, exc: InvalidRequestError) -> JSONResponse:
        return error_response(exc.message, 400, exc.field)

    @app.exception_handler(ModelNotFoundError)
    async def _no_model(request: Request, exc: ModelNotFoundError) -> JSONResponse:
        served = request.app.state.sgl.model_name
        message = f"the model {exc.model!r} does not exist; this server serves {served!r}"
        return error_response(message, 404, "model", "model_not_found")

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_message(exc.errors()), 400, _first_param(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        param = "body" if exc.status_code in (400, 422) else None  # e.g. a body not in UTF-8
        return error_response(str(exc.detail), exc.status_code, param)

    @app.exception_handler(RuntimeError)
    async def _runtime(_: Request, exc: RuntimeError) -> JSONResponse:
        return error_response(f"the server cannot take requests: {exc}", 503)


def validation_message(errors: Any) -> str:
    parts = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx", {}).get("error", "")
            parts.append(f"the request body is not valid JSON: {ctx}".rstrip(": "))
            continue
        where = ".".join(loc) or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts[:5])


def _first_param(errors: Any) -> str | None:
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if loc and err.get("type") != "json_invalid":
            return ".".join(loc)
    return "body"


async def _send_json(send: Send, status: int, body: dict, headers: list | None = None) -> None:
    raw = json.dumps(body).encode()
    base = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": base + (headers or [])})
    await send({"type": "http.response.body", "body": raw})


class ApiKeyMiddleware:
    """Rejects requests without `Authorization: Bearer <api_key>` (401); /health is open."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers", [])).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            body = error_body("missing or invalid API key (send 'Authorization: Bearer ...')", 401)
            return await _send_json(send, 401, body, [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


def _host_name(scope: Scope) -> str:
    host = dict(scope.get("headers", [])).get(b"host", b"").decode("latin-1").lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class HostCheckMiddleware:
    """Serves only requests whose Host header names one of `allowed` (400 otherwise), so a web
    page cannot reach a key-less local server through DNS rebinding; /health stays open."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str] | set[str]) -> None:
        self.app = app
        self.allowed = {h.lower() for h in allowed}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        if _host_name(scope) not in self.allowed:
            message = (
                "the Host header names no allowed host; without an API key only loopback "
                "names are served (see --allowed-hosts)"
            )
            return await _send_json(send, 400, error_body(message, 400, "Host"))
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Reads the whole request body first and answers 413 when it exceeds `max_bytes`; later
    `receive` calls (disconnect notices) pass through untouched."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_json(send, 413, self._too_large())
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await _send_json(send, 413, self._too_large())
            if not message.get("more_body", False):
                break
        replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks)}]

        async def replaying_receive() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, replaying_receive, send)

    def _too_large(self) -> dict:
        return error_body(f"the request body exceeds the limit of {self.max_bytes} bytes", 413)
