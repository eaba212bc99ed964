"""DSPy 3.4+ engine contract on any sgl-adapters backend: `dspy.LM(..., engine=SGLangEngine(...))`.

`SGLangEngine.complete(Request) -> Response` and `stream(Request)` run one canonical lm15
request on a shared `Backend` (default: the in-process engine) through `EngineClient`, i.e.
the Backend protocol only; `AsyncSGLangEngine` is its asyncio twin. Both are stateless apart
from their settings, so DSPy's threads (`module.batch`, `dspy.Parallel`) call them
concurrently and the backend batches whatever arrives together.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from dspy.lm15 import (
    ContextLengthError,
    InvalidRequestError,
    Message,
    Request,
    Response,
    ServerError,
    StreamDeltaEvent,
    StreamEndEvent,
    StreamStartEvent,
    TextDelta,
    TextPart,
    TokenLogprob,
    TopLogprob,
    UnsupportedFeatureError,
    Usage,
)

from sgl_adapters import engines as _engines
from sgl_adapters.dspy import translate
from sgl_adapters.dspy.translate import EngineCall, GenerationDefaults

PROVIDER = "sglang"


class SGLangEngine:
    """A DSPy engine on the backend `backend` ("local": the `sgl_engine.Engine` of (`model`,
    `engine_kwargs`); a plugin name built with `backend_kwargs`; or a `Backend` instance),
    taken from an `EngineRegistry` (default: the process-wide one LangChain shares). `model`
    is a local HF folder or None for the embedded SmolLM2-135M-Instruct. Mutates nothing of
    its own; the backend it borrows is closed by its registry, not here."""

    supports_response_schema = True
    supports_function_calling = False
    supports_reasoning = False
    supported_params = translate.SUPPORTED_PARAMS

    def __init__(
        self,
        model: str | None = None,
        *,
        engine_kwargs: Mapping[str, Any] | None = None,
        default_max_tokens: int = GenerationDefaults.max_tokens,
        max_string_length: int | None = None,
        registry: _engines.EngineRegistry | None = None,
        backend: Any = "local",
        backend_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.engine_kwargs = translate.engine_kwargs_or_default(engine_kwargs)
        self.defaults = GenerationDefaults(default_max_tokens, max_string_length)
        self.registry = registry
        self.backend = backend
        self.backend_kwargs = dict(backend_kwargs or {})

    @property
    def client(self) -> _engines.EngineClient:
        """The client of the shared backend (built on first use, under the registry's lock)."""
        registry = self.registry if self.registry is not None else _engines.ENGINES
        if self.backend == "local":
            return registry.client(self.model, {**self.engine_kwargs, **self.backend_kwargs})
        return registry.client(self.model, None, self.backend, self.backend_kwargs)

    def plan(self, request: Request) -> EngineCall:
        """The backend submission for `request`; unsupported features raise lm15 errors."""
        client = self.client
        messages = _messages(request)
        with _engine_errors():
            prompt = client.apply_chat_template(messages) if client.renders_chat else None
        params, logprobs = translate.options_to_params(_options(request), self.defaults)
        return EngineCall(prompt, params, logprobs, tuple(messages))

    def _submit(self, call: EngineCall) -> tuple[_engines.EngineClient, _engines.Request, dict]:
        leaf = {}
        if call.logprobs is not None:
            leaf = {"return_logprob": True, "top_logprobs_num": call.logprobs}
        return self.client, _engines.Request(call.prompt, call.params, call.messages), leaf

    def complete(self, request: Request) -> Response:
        call = self.plan(request)
        client, req, leaf = self._submit(call)
        with _engine_errors():
            result = client.call(req, **leaf)
        return self._response(request, result, call)

    def stream(self, request: Request) -> Iterator[Any]:
        call = self.plan(request)
        client, req, _ = self._submit(call)
        with _engine_errors():
            client.check(req)
            chunks = client.stream(req)
        yield StreamStartEvent(model=request.model)
        last = None
        try:
            for last in chunks:
                if last.get("delta"):
                    yield StreamDeltaEvent(delta=TextDelta(text=last["delta"]))
        finally:
            chunks.close()
        yield _end_event(last)

    def close(self) -> None:
        """Nothing to release: the registry owns the backend."""

    def dump_state(self) -> dict:
        """Settings only; a backend given as an instance is kept as that object."""
        return {
            "model": self.model,
            "engine_kwargs": self.engine_kwargs,
            "default_max_tokens": self.defaults.max_tokens,
            "max_string_length": self.defaults.max_string_length,
            "backend": self.backend,
            "backend_kwargs": self.backend_kwargs,
        }

    @classmethod
    def load_state(cls, state: Mapping[str, Any]) -> SGLangEngine:
        return cls(**state)

    def __reduce__(self) -> tuple:
        """Pickles as its state: an unpickled engine uses the process-wide registry."""
        return (type(self).load_state, (self.dump_state(),))

    def __deepcopy__(self, memo: dict) -> SGLangEngine:
        return self

    def _response(self, request: Request, result: dict, call: EngineCall) -> Response:
        meta = result["meta_info"]
        with _engine_errors():
            reason = translate.finish_reason(meta)
        logprobs = None
        if call.logprobs is not None:
            tokenizer = self.client.require_tokenizer("logprobs as tokens")
            logprobs = tuple(_token_logprob(t) for t in translate.token_logprobs(result, tokenizer))
        return Response(
            id=meta.get("id"),
            model=request.model,
            message=Message.assistant(result["text"]),
            finish_reason=reason,
            usage=_usage([result]),
            logprobs=logprobs,
        )


class AsyncSGLangEngine:
    """The asyncio twin of an `SGLangEngine` (same engine, same settings)."""

    supports_response_schema = True
    supports_function_calling = False
    supports_reasoning = False
    supported_params = translate.SUPPORTED_PARAMS

    def __init__(self, sync: SGLangEngine) -> None:
        self.sync = sync

    async def complete(self, request: Request) -> Response:
        call = self.sync.plan(request)
        client, req, leaf = self.sync._submit(call)
        with _engine_errors():
            if leaf or req.prompt is None:
                result = await client.acall(req, **leaf)
            else:
                (result,) = await client.agenerate([req])
        return self.sync._response(request, result, call)

    async def stream(self, request: Request) -> AsyncIterator[Any]:
        call = self.sync.plan(request)
        client, req, _ = self.sync._submit(call)
        with _engine_errors():
            client.check(req)
            chunks = client.astream(req)
        yield StreamStartEvent(model=request.model)
        last = None
        try:
            async for last in chunks:
                if last.get("delta"):
                    yield StreamDeltaEvent(delta=TextDelta(text=last["delta"]))
        finally:
            await chunks.aclose()
        yield _end_event(last)

    async def aclose(self) -> None:
        """Nothing to release: the registry owns the engine."""

    def dump_state(self) -> dict:
        return self.sync.dump_state()

    @classmethod
    def load_state(cls, state: Mapping[str, Any]) -> AsyncSGLangEngine:
        return cls(SGLangEngine.load_state(state))

    def __reduce__(self) -> tuple:
        return (type(self).load_state, (self.dump_state(),))

    def __deepcopy__(self, memo: dict) -> AsyncSGLangEngine:
        return self


def _messages(request: Request) -> list[dict[str, str]]:
    if request.tools:
        raise UnsupportedFeatureError(
            "tools are not supported by the sglang engine", provider=PROVIDER
        )
    out = []
    if request.system is not None:
        system = request.system
        out.append(
            {"role": "system", "content": system if isinstance(system, str) else _text(system)}
        )
    for message in request.messages:
        if message.role not in ("user", "assistant", "system", "developer"):
            raise UnsupportedFeatureError(
                f"{message.role} messages are not supported", provider=PROVIDER
            )
        role = "system" if message.role == "developer" else message.role
        out.append({"role": role, "content": _text(message.parts)})
    return out


def _text(parts: Any) -> str:
    texts = []
    for part in parts:
        if not isinstance(part, TextPart):
            raise UnsupportedFeatureError(f"{part.type} parts are not supported", provider=PROVIDER)
        texts.append(part.text)
    return "".join(texts)


def _options(request: Request) -> dict[str, Any]:
    config = request.config
    refused = [
        name
        for name in ("tool_choice", "reasoning", "probabilities")
        if getattr(config, name) is not None
    ]
    if refused:
        raise UnsupportedFeatureError(
            f"not supported by the sglang engine: {refused}", provider=PROVIDER
        )
    extensions = dict(config.extensions or {})
    unknown = set(extensions) - translate.SGLANG_KEYS
    if unknown:
        raise UnsupportedFeatureError(
            f"unknown Config.extensions {sorted(unknown)}; the sglang engine takes SGLang sampling "
            f"keys {sorted(translate.SGLANG_KEYS)}",
            provider=PROVIDER,
        )
    options = {
        "max_tokens": config.max_tokens,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "top_k": config.top_k,
        "stop": list(config.stop),
        "seed": config.seed,
        "frequency_penalty": config.frequency_penalty,
        "presence_penalty": config.presence_penalty,
        "response_format": config.response_format,
        **extensions,
    }
    if config.logprobs is not None:
        options.update(logprobs=True, top_logprobs=config.logprobs)
    return options


def _usage(results: list[dict]) -> Usage:
    counts = translate.usage_counts(results)
    return Usage(
        input_tokens=counts["prompt_tokens"],
        output_tokens=counts["completion_tokens"],
        total_tokens=counts["total_tokens"],
        cache_read_tokens=counts["cached_tokens"],
    )


def _token_logprob(entry: dict) -> TokenLogprob:
    top = tuple(
        TopLogprob(token=t["token"], logprob=t["logprob"], token_id=t["token_id"])
        for t in entry["top_logprobs"]
    )
    return TokenLogprob(
        token=entry["token"], logprob=entry["logprob"], token_id=entry["token_id"], top=top
    )


def _end_event(last: dict | None) -> StreamEndEvent:
    if last is None:
        raise ServerError("the engine ended the stream without a result", provider=PROVIDER)
    with _engine_errors():
        reason = translate.finish_reason(last["meta_info"])
    return StreamEndEvent(finish_reason=reason, usage=_usage([last]))


@contextmanager
def _engine_errors() -> Iterator[None]:
    """Re-raise the backend's refusals and aborts as the lm15 errors DSPy expects."""
    from sgl_engine.errors import InvalidRequestError as EngineInvalidRequest

    try:
        yield
    except EngineInvalidRequest as exc:
        too_long = exc.field == "prompt" and "tokens" in exc.message
        cls = ContextLengthError if too_long else InvalidRequestError
        raise cls(exc.message, provider=PROVIDER) from exc
    except _engines.BackendCapabilityError as exc:
        raise UnsupportedFeatureError(str(exc), provider=PROVIDER) from exc
    except translate.EngineAbort as exc:
        raise ServerError(str(exc), provider=PROVIDER) from exc
    except ValueError as exc:  # a remote backend's 4xx (e.g. the http plugin's)
        cls = ContextLengthError if "too long" in str(exc) else InvalidRequestError
        raise cls(str(exc), provider=PROVIDER) from exc
