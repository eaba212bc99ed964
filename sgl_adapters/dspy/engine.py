"""DSPy 3.4+ engine contract on any sgl-adapters backend: `dspy.LM(..., engine=SGLangEngine(...))`.

`SGLangEngine.complete(Request) -> Response` and `stream(Request)` run one canonical lm15
request on a shared `Backend` (default: the in-process engine) through `EngineClient`, i.e.
the Backend protocol only; `AsyncSGLangEngine` is its asyncio twin. Both are stateless apart
from their settings, so DSPy's threads (`module.batch`, `dspy.Parallel`) call them
concurrently and the backend batches whatever arrives together.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from dspy.lm15 import (
    ContextLengthError,
    FunctionTool,
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
    ThinkingPart,
    TokenLogprob,
    ToolCallPart,
    ToolResultPart,
    TopLogprob,
    UnsupportedFeatureError,
    Usage,
)
from sgl_engine.families import ModelFamily, family_of, parse_output, prepare_chat
from sgl_engine.families.decoding import plan_decoding

from sgl_adapters import engines as _engines
from sgl_adapters.dspy import translate
from sgl_adapters.dspy.translate import EngineCall, GenerationDefaults
from sgl_adapters.json_schema import cap_strings

PROVIDER = "sglang"


class SGLangEngine:
    """A DSPy engine on the backend `backend` ("local": the `sgl_engine.Engine` of (`model`,
    `engine_kwargs`); a plugin name built with `backend_kwargs`; or a `Backend` instance),
    taken from an `EngineRegistry` (default: the process-wide one LangChain shares). `model`
    is a local HF folder or None for the embedded SmolLM2-135M-Instruct. Mutates nothing of
    its own; the backend it borrows is closed by its registry, not here."""

    supports_response_schema = True
    supports_function_calling = True
    supports_reasoning = True
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

    def family(self, client: _engines.EngineClient) -> ModelFamily:
        """The model's family (tool-call format, reasoning markers), from its chat template."""
        registry = (self.registry or _engines.ENGINES).manager.model_families()
        return family_of(getattr(client.backend, "engine", client.backend), registry)

    def plan(self, request: Request) -> EngineCall:
        """The backend submission for `request`; unsupported features raise lm15 errors.
        Tools are offered through the model's chat template and decoded under the family's
        tool grammar (so calls always parse and validate); a reasoning family's `<think>`
        block comes back as a ThinkingPart."""
        client = self.client
        family = self.family(client)
        history = _messages(request)
        mode, specs = _tool_mode(request)
        cap = self.defaults.max_string_length
        specs = [{**t, "parameters": cap_strings(t["parameters"], cap)} for t in specs]
        offered = [{"type": "function", "function": s} for s in specs] if mode != "none" else None
        template = getattr(client.tokenizer, "chat_template", None)
        messages, tools = prepare_chat(
            family, template if isinstance(template, str) else "", history, offered
        )
        template_kwargs = _template_kwargs(request)
        with _engine_errors():
            prompt = None
            if client.renders_chat:
                prompt = client.apply_chat_template(messages, tools=tools, **template_kwargs)
        params, logprobs = translate.options_to_params(_options(request), self.defaults)
        if mode == "auto":
            mode = family.auto_mode(history)
        parallel = (
            request.config.tool_choice is None or request.config.tool_choice.parallel is not False
        )
        with _engine_errors():
            decoding = plan_decoding(family, prompt or "", params, specs or None, mode, parallel)
        call = EngineCall(prompt, params, logprobs, tuple(messages))
        return replace(call, family=family, decoding=decoding)

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
        parts, called = _parts(call, result["text"])
        return Response(
            id=meta.get("id"),
            model=request.model,
            message=Message.assistant(parts),
            finish_reason="tool_call" if called and reason == "stop" else reason,
            usage=_usage([result]),
            logprobs=logprobs,
        )


class AsyncSGLangEngine:
    """The asyncio twin of an `SGLangEngine` (same engine, same settings)."""

    supports_response_schema = True
    supports_function_calling = True
    supports_reasoning = True
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


def _tool_mode(request: Request) -> tuple[str, list[dict]]:
    """("auto" | "required" | "none", the function specs a call may name)."""
    specs = []
    for tool in request.tools:
        if not isinstance(tool, FunctionTool):
            raise UnsupportedFeatureError(
                f"{type(tool).__name__} tools are not supported", provider=PROVIDER
            )
        params = dict(tool.parameters or {"type": "object", "properties": {}})
        specs.append(
            {"name": tool.name, "description": tool.description or "", "parameters": params}
        )
    choice = request.config.tool_choice
    if not specs or (choice is not None and choice.mode == "none"):
        return "none", specs
    if choice is not None and choice.allowed:
        specs = [s for s in specs if s["name"] in choice.allowed]
    return ("required" if choice is not None and choice.mode == "required" else "auto"), specs


def _template_kwargs(request: Request) -> dict[str, Any]:
    """Chat template variables: reasoning effort "none" switches thinking off (Qwen3)."""
    reasoning = request.config.reasoning
    if reasoning is not None and getattr(reasoning, "effort", None) == "none":
        return {"enable_thinking": False}
    return {}


def _parts(call: EngineCall, text: str) -> tuple[list, bool]:
    """The assistant parts of an answer (thinking, text, tool calls) and whether it calls."""
    family, decoding = call.family, call.decoding
    if family is None or decoding is None:
        return [TextPart(text)], False
    out = parse_output(
        text,
        family.tool_format if decoding.parse_tools else None,
        family.reasoning if decoding.reasoning else None,
        decoding.opened,
    )
    parts: list = []
    if out.reasoning:
        parts.append(ThinkingPart(out.reasoning))
    if out.content or not out.calls:
        parts.append(TextPart(out.content))
    for c in out.calls:
        parts.append(
            ToolCallPart(id="call_" + uuid.uuid4().hex[:24], name=c.name, input=c.arguments)
        )
    return parts, bool(out.calls)


def _messages(request: Request) -> list[dict[str, Any]]:
    """OpenAI-shaped messages (tool calls and results kept structured)."""
    out: list[dict[str, Any]] = []
    if request.system is not None:
        system = request.system
        out.append(
            {"role": "system", "content": system if isinstance(system, str) else _text(system)}
        )
    for message in request.messages:
        role = "system" if message.role == "developer" else message.role
        calls = [p for p in message.parts if isinstance(p, ToolCallPart)]
        results = [p for p in message.parts if isinstance(p, ToolResultPart)]
        others = [
            p
            for p in message.parts
            if not isinstance(p, (ToolCallPart, ToolResultPart, ThinkingPart))
        ]
        for r in results:
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": r.id,
                    "content": _text(r.content),
                    **({"name": r.name} if r.name else {}),
                }
            )
        if results and not others:
            continue
        if role not in ("user", "assistant", "system", "tool"):
            raise UnsupportedFeatureError(
                f"{message.role} messages are not supported", provider=PROVIDER
            )
        entry: dict[str, Any] = {
            "role": "user" if role == "tool" else role,
            "content": _text(others),
        }
        if calls:
            entry["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": dict(c.input)},
                }
                for c in calls
            ]
        out.append(entry)
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
    refused = [name for name in ("probabilities",) if getattr(config, name) is not None]
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
