"""`ChatSGLang`: a LangChain chat model served by the in-process SGLang-style engine."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.tools import BaseTool

from sgl_adapters.engines import EngineClient, Request, model_display_name
from sgl_adapters.json_schema import cap_strings
from sgl_adapters.langchain import prefetch, structured
from sgl_adapters.langchain import tools as tools_mod
from sgl_adapters.langchain.messages import render, to_chat_dicts
from sgl_adapters.langchain.params import (
    SGLangParams,
    finish_reason,
    usage_metadata,
)


@dataclass(frozen=True)
class _Call:
    """A prepared call: the engine client, its request, and whether tools are bound."""

    client: EngineClient
    request: Request
    model_name: str
    tools: bool
    text_request: Request | None = None
    """tool_choice "auto": the plain-text alternative to `request` (a forced call)."""


class ChatSGLang(SGLangParams, BaseChatModel):
    """Chat model on `sgl_engine.Engine` (RadixAttention prefix cache, grammar decoding).

    Prompts are rendered with the tokenizer's chat template; tool calls and structured output
    are decoded under a grammar, so they always parse. `batch`/`abatch` submit all prompts to
    the engine at once, so a shared prefix is prefilled once.
    """

    streaming: bool = False
    """Whether `invoke` streams internally (callbacks then get every token)."""
    tool_call_bias: float = 0.0
    """tool_choice "auto" compares the log-probability of starting the answer with a tool call
    against the best plain-text first token; this many nats are added to the call's side
    (small models under-call: SmolLM2-135M needs about 4.5 for clear tool questions)."""

    @property
    def _llm_type(self) -> str:
        return "sglang-chat"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        model = kwargs.get("model", self.model)
        name = self.model_name if model == self.model else model_display_name(model)
        params = LangSmithParams(
            ls_provider="sglang",
            ls_model_name=name,
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        stops = stop or kwargs.get("stop") or self.stop
        if stops:
            params["ls_stop"] = list(stops)
        return params

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "temperature": self.temperature}

    # ---- building requests ---------------------------------------------------------------
    def _prepare(
        self, messages: Sequence[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> _Call:
        kwargs = dict(kwargs)
        bound = kwargs.pop("tools", None)
        choice = kwargs.pop("tool_choice", None)
        params = self.sampling_params(stop, kwargs)
        model = kwargs.get("model", self.model)
        client = self.client(model)
        tool_prompt = tools_mod.tool_system_prompt(bound) if bound else None
        chat = to_chat_dicts(messages, tool_prompt)
        prompt = render(chat, client.apply_chat_template) if client.renders_chat else None
        name = self.served_model_name(client, model)
        if isinstance(params.get("json_schema"), dict):
            params["json_schema"] = cap_strings(params["json_schema"], self.max_string_length)
        if not bound:
            return _Call(client, Request(prompt, params, tuple(chat)), name, False)
        forced, allowed = tools_mod.resolve_tool_choice(choice, bound)
        text = Request(prompt, {**params, "ebnf": tools_mod.TEXT_GRAMMAR})
        if not allowed:
            return _Call(client, text, name, True)
        capped = [
            {**t, "parameters": cap_strings(t["parameters"], self.max_string_length)}
            for t in allowed
        ]
        call = Request(prompt, {**params, "ebnf": tools_mod.tool_grammar(capped, True)})
        return _Call(client, call, name, True, None if forced else text)

    def _resolve(self, call: _Call) -> _Call:
        """Settle tool_choice "auto" by scoring the tool-call start (one engine request)."""
        if call.text_request is None:
            return call
        tok = call.client.require_tokenizer("tool_choice 'auto'")
        ids, start = tools_mod.probe_ids(tok, call.request.prompt)
        meta = call.client.probe(ids, start)
        return self._decided(call, meta)

    async def _aresolve(self, call: _Call) -> _Call:
        if call.text_request is None:
            return call
        tok = call.client.require_tokenizer("tool_choice 'auto'")
        ids, start = tools_mod.probe_ids(tok, call.request.prompt)
        meta = await call.client.aprobe(ids, start)
        return self._decided(call, meta)

    def _decided(self, call: _Call, meta: dict) -> _Call:
        tok = call.client.tokenizer
        if tools_mod.prefers_call(meta, tok, self.tool_call_bias):
            return replace(call, text_request=None)
        return replace(call, request=call.text_request, text_request=None)

    def _message(self, call: _Call, result: dict) -> AIMessage:
        meta = result["meta_info"]
        reason = finish_reason(meta)
        content, calls, invalid = result["text"], [], []
        if call.tools:
            content, calls, invalid = tools_mod.parse_output(content)
        return AIMessage(
            content=content,
            tool_calls=calls,
            invalid_tool_calls=invalid,
            usage_metadata=usage_metadata(meta),
            response_metadata=self._response_metadata(call, reason),
            id=f"run-{meta['id']}",
        )

    @staticmethod
    def _response_metadata(call: _Call, reason: str) -> dict[str, Any]:
        return {"model_name": call.model_name, "finish_reason": reason, "model_provider": "sglang"}

    # ---- generate --------------------------------------------------------------------------
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        call = self._resolve(self._prepare(messages, stop, kwargs))
        result = prefetch.take(call.client, call.request)
        if result is None:
            (result,) = call.client.generate([call.request])
        return ChatResult(generations=[ChatGeneration(message=self._message(call, result))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        call = await self._aresolve(self._prepare(messages, stop, kwargs))
        result = await prefetch.atake(call.client, call.request)
        if result is None:
            (result,) = await call.client.agenerate([call.request])
        return ChatResult(generations=[ChatGeneration(message=self._message(call, result))])

    # ---- streaming ---------------------------------------------------------------------------
    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        call = self._resolve(self._prepare(messages, stop, kwargs))
        step = _Stepper(self, call)
        for raw in call.client.stream(call.request):
            chunk = step(raw)
            if chunk is not None:
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        call = await self._aresolve(self._prepare(messages, stop, kwargs))
        step = _Stepper(self, call)
        async for raw in call.client.astream(call.request):
            chunk = step(raw)
            if chunk is not None:
                if run_manager:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    # ---- batch: one engine submission ---------------------------------------------------
    def _batch_calls(
        self, inputs: Sequence[LanguageModelInput], kwargs: dict[str, Any]
    ) -> list[_Call]:
        calls = []
        stop = kwargs.get("stop")
        rest = {k: v for k, v in kwargs.items() if k != "stop"}
        for value in inputs:
            try:
                messages = self._convert_input(value).to_messages()
                calls.append(self._prepare(messages, stop, rest))
            except Exception:  # noqa: BLE001 -- the input's own invoke reports it
                continue
        calls = [c for c in calls if c.text_request is None]
        return [c for c in calls if c.client.backend is calls[0].client.backend]

    def batch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[AIMessage]:
        """Submit every input's request to the engine together, then run LangChain's batch."""
        calls = self._batch_calls(inputs, kwargs)
        client = calls[0].client if calls else None
        with prefetch.submitted(client, [c.request for c in calls]):
            return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)

    async def abatch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[AIMessage]:
        calls = self._batch_calls(inputs, kwargs)
        client = calls[0].client if calls else None
        with prefetch.submitted(client, [c.request for c in calls]):
            return await super().abatch(
                inputs, config, return_exceptions=return_exceptions, **kwargs
            )

    # ---- tools and structured output -----------------------------------------------------
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: str | dict | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools; calls are decoded under a grammar. "any"/"required"/a name force a call,
        "none" forbids one; None/"auto" let the model choose (see `tool_call_bias`)."""
        specs = tools_mod.tool_specs(tools)
        tools_mod.resolve_tool_choice(tool_choice, specs)
        return super().bind(tools=specs, tool_choice=tool_choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict | type | None = None,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict | Any]:
        """Output parsed into `schema` (pydantic, TypedDict or JSON schema). Every method
        decodes under a grammar, so `strict` is always in effect; `json_mode` with a schema
        constrains to that schema, without one to any JSON object."""
        if kwargs:
            raise ValueError(f"unsupported arguments: {sorted(kwargs)}")
        return structured.build(self, schema, method, include_raw)


class _Stepper:
    """Turns cumulative engine stream chunks into LangChain chunks (mutates only itself)."""

    def __init__(self, model: ChatSGLang, call: _Call) -> None:
        self.model = model
        self.call = call
        self.parser = tools_mod.ToolStreamParser() if call.tools else None
        self.sent = 0

    def __call__(self, raw: dict) -> ChatGenerationChunk | None:
        meta = raw["meta_info"]
        last = bool(meta.get("finish_reason"))
        text = raw["text"]
        tool_chunks: list = []
        if self.parser is not None:
            step = self.parser.finish if last else self.parser.feed
            delta, tool_chunks = step(text)
        else:
            delta = text[self.sent :] if text.startswith(text[: self.sent]) else ""
            self.sent = max(self.sent, len(text))
        if not last:
            if not delta and not tool_chunks:
                return None
            return ChatGenerationChunk(
                message=AIMessageChunk(content=delta, tool_call_chunks=tool_chunks)
            )
        reason = finish_reason(meta)
        return ChatGenerationChunk(
            message=AIMessageChunk(
                content=delta,
                tool_call_chunks=tool_chunks,
                usage_metadata=usage_metadata(meta),
                response_metadata=ChatSGLang._response_metadata(self.call, reason),
                chunk_position="last",
            ),
            generation_info={"finish_reason": reason},
        )


__all__ = ["ChatSGLang"]
