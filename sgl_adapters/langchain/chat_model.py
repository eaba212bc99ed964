"""`ChatSGLang`: a LangChain chat model served by the in-process SGLang-style engine."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.tools import BaseTool
from pydantic import Field
from sgl_engine.families import ModelFamily, OutputStream, family_of, parse_output, prepare_chat
from sgl_engine.openai_format import chat_logprobs

from sgl_adapters.engines import EngineClient, Request, model_display_name
from sgl_adapters.json_schema import cap_strings
from sgl_adapters.langchain import prefetch, structured
from sgl_adapters.langchain import tools as tools_mod
from sgl_adapters.langchain.messages import render, to_openai_dicts
from sgl_adapters.langchain.params import (
    SGLangParams,
    finish_reason,
    usage_metadata,
)


@dataclass(frozen=True)
class _Call:
    """A prepared call: the engine client, its request, the model's family and how the answer
    decodes and reads back."""

    client: EngineClient
    request: Request
    model_name: str
    family: ModelFamily
    decoding: tools_mod.Decoding
    n: int = 1
    logprobs: int | None = None
    """Top alternatives per output token when logprobs are asked for (None: not asked)."""


class ChatSGLang(SGLangParams, BaseChatModel):
    """Chat model on `sgl_engine.Engine` (RadixAttention prefix cache, grammar decoding).

    Prompts are rendered with the tokenizer's chat template (tools offered through it); the
    model's family (tool-call format, reasoning markers) is detected from the template.
    Tool calls and structured output are decoded under a grammar, so they always parse.
    `batch`/`abatch` submit all prompts to the engine at once, so a shared prefix is
    prefilled once.
    """

    streaming: bool = False
    """Whether `invoke` streams internally (callbacks then get every token)."""
    n: int = 1
    """Completions per prompt (`generate` returns them all; `invoke` the first)."""
    seed: int | None = None
    logprobs: bool | None = None
    """Return output token logprobs in `response_metadata["logprobs"]` (as ChatOpenAI)."""
    top_logprobs: int | None = None
    family: str | None = None
    """Model family name (see `sgl_plugins` `register_model_families`); None: detected."""
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra chat template variables, e.g. {"enable_thinking": False} for Qwen3."""

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

    def _resolve_model_profile(self) -> ModelProfile | None:
        """Tool calling and structured output under a grammar; the context from the model's
        config (read without loading the engine)."""
        profile = ModelProfile(
            tool_calling=True,
            tool_choice=True,
            tool_call_streaming=True,
            structured_output=True,
            text_inputs=True,
            text_outputs=True,
        )
        context = _context_length(self.model)
        if context:
            profile["max_input_tokens"] = context
        return profile

    # ---- the model's family and tokenizer ----------------------------------------------
    def model_family(self, client: EngineClient | None = None) -> ModelFamily:
        """The family of this model: `family` by name, else detected from its chat template."""
        client = client or self.client()
        registry = self.registry.manager.model_families()
        if self.family is not None:
            return registry.get(self.family)
        return family_of(getattr(client.backend, "engine", client.backend), registry)

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of `text` with the model's own tokenizer (no special tokens added)."""
        return list(self.client().tokenizer.encode(text, add_special_tokens=False))

    def get_num_tokens_from_messages(
        self, messages: list[BaseMessage], tools: Sequence[Any] | None = None
    ) -> int:
        """Prompt tokens of `messages` (and `tools`) as the engine counts them."""
        kwargs: dict[str, Any] = {"tools": tools_mod.tool_specs(tools)} if tools else {}
        call = self._prepare(messages, None, kwargs)
        return len(call.client.tokenizer.encode(call.request.prompt))

    # ---- building requests ---------------------------------------------------------------
    def _prepare(
        self, messages: Sequence[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> _Call:
        kwargs = dict(kwargs)
        bound = kwargs.pop("tools", None)
        choice = kwargs.pop("tool_choice", None)
        parallel = kwargs.pop("parallel_tool_calls", None)
        kwargs.pop("strict", None)
        schema = tools_mod.response_format_schema(kwargs.pop("response_format", None))
        logprobs = kwargs.pop("logprobs", self.logprobs)
        top = kwargs.pop("top_logprobs", self.top_logprobs)
        n = int(kwargs.pop("n", self.n))
        template_kwargs = {**self.chat_template_kwargs, **kwargs.pop("chat_template_kwargs", {})}
        params = self.sampling_params(stop, kwargs)
        if self.seed is not None:
            params.setdefault("seed", self.seed)
        if schema is not None:
            params["json_schema"] = schema
        model = kwargs.get("model", self.model)
        client = self.client(model)
        family = self.model_family(client)
        offered = None
        if bound and tools_mod.resolve_tool_choice(choice, bound)[0] != "none":
            offered = [{"type": "function", "function": s} for s in bound]
        template = getattr(client.tokenizer, "chat_template", None)
        history = to_openai_dicts(messages)
        chat, tools = prepare_chat(
            family, template if isinstance(template, str) else "", history, offered
        )
        prompt = None
        if client.renders_chat:
            prompt = render(
                chat, lambda m: client.apply_chat_template(m, tools=tools, **template_kwargs)
            )
        name = self.served_model_name(client, model)
        if isinstance(params.get("json_schema"), dict):
            params["json_schema"] = cap_strings(params["json_schema"], self.max_string_length)
        decoding = tools_mod.plan_decoding(
            family,
            prompt or "",
            params,
            bound,
            choice,
            parallel is not False,
            self.max_string_length,
            family.auto_mode(history),
        )
        lp = int(top or 0) if (logprobs or top) else None
        request = Request(prompt, params, tuple(chat))
        return _Call(client, request, name, family, decoding, n, lp)

    def _parse(self, call: _Call, text: str) -> Any:
        d = call.decoding
        return parse_output(
            text,
            call.family.tool_format if d.parse_tools else None,
            call.family.reasoning if d.reasoning else None,
            d.opened,
        )

    def _message(self, call: _Call, result: dict) -> AIMessage:
        meta = result["meta_info"]
        reason = finish_reason(meta)
        out = self._parse(call, result["text"])
        extra = {} if out.reasoning is None else {"reasoning_content": out.reasoning}
        metadata = self._response_metadata(call, reason)
        if call.logprobs is not None:
            metadata["logprobs"] = chat_logprobs(call.client.tokenizer, meta)
        return AIMessage(
            content=out.content,
            additional_kwargs=extra,
            tool_calls=tools_mod.lc_tool_calls(out.calls),
            usage_metadata=usage_metadata(meta),
            response_metadata=metadata,
            id=f"run-{meta['id']}",
        )

    @staticmethod
    def _response_metadata(call: _Call, reason: str) -> dict[str, Any]:
        return {"model_name": call.model_name, "finish_reason": reason, "model_provider": "sglang"}

    def _requests(self, call: _Call) -> list[Request]:
        """The call's request, n times (seeds step per choice, as the engine's own n does)."""
        if call.n <= 1:
            return [call.request]
        seed = call.request.params.get("seed")
        return [
            Request(
                call.request.prompt,
                {**call.request.params, **({} if seed is None else {"seed": seed + k})},
            )
            for k in range(call.n)
        ]

    def _result(self, call: _Call, results: list[dict]) -> ChatResult:
        return ChatResult(
            generations=[ChatGeneration(message=self._message(call, r)) for r in results]
        )

    # ---- generate --------------------------------------------------------------------------
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        call = self._prepare(messages, stop, kwargs)
        if call.logprobs is not None:
            leaf = _logprob_leaf(call)
            return self._result(call, [call.client.call(r, **leaf) for r in self._requests(call)])
        result = prefetch.take(call.client, call.request) if call.n == 1 else None
        results = [result] if result is not None else call.client.generate(self._requests(call))
        return self._result(call, results)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        call = self._prepare(messages, stop, kwargs)
        if call.logprobs is not None:
            leaf = _logprob_leaf(call)
            requests = self._requests(call)
            return self._result(call, [await call.client.acall(r, **leaf) for r in requests])
        result = await prefetch.atake(call.client, call.request) if call.n == 1 else None
        if result is not None:
            return self._result(call, [result])
        return self._result(call, await call.client.agenerate(self._requests(call)))

    # ---- streaming ---------------------------------------------------------------------------
    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        call = self._prepare(messages, stop, kwargs)
        step = _Stepper(self, call)
        for raw in call.client.stream(call.request, **_logprob_leaf(call)):
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
        call = self._prepare(messages, stop, kwargs)
        step = _Stepper(self, call)
        async for raw in call.client.astream(call.request, **_logprob_leaf(call)):
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
        calls = [c for c in calls if c.n == 1 and c.logprobs is None]
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
        parallel_tool_calls: bool | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools; calls are decoded under the family's tool grammar, so they always parse
        and their arguments validate (`strict` is always in effect). None/"auto" let the model
        answer or call, "any"/"required"/a name force calls, "none" forbids them;
        `parallel_tool_calls=False` allows one call per turn. `response_format=` (bound or
        per call) makes the non-call answer JSON of that schema."""
        specs = tools_mod.tool_specs(tools)
        tools_mod.resolve_tool_choice(tool_choice, specs)
        extra = {} if parallel_tool_calls is None else {"parallel_tool_calls": parallel_tool_calls}
        return super().bind(tools=specs, tool_choice=tool_choice, **extra, **kwargs)

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
        d = call.decoding
        self.parser = OutputStream(
            call.family.tool_format if d.parse_tools else None,
            call.family.reasoning if d.reasoning else None,
            d.opened,
        )
        self.ids = tools_mod.ChunkIds()

    def __call__(self, raw: dict) -> ChatGenerationChunk | None:
        meta = raw["meta_info"]
        last = bool(meta.get("finish_reason"))
        step = self.parser.feed(raw["text"], final=last)
        chunks = self.ids.chunks(step.calls)
        extra = {"reasoning_content": step.reasoning} if step.reasoning else {}
        metadata: dict[str, Any] = {}
        new = raw.get("delta_logprobs") or {}
        if self.call.logprobs is not None and new.get("output_token_logprobs"):
            metadata["logprobs"] = chat_logprobs(self.call.client.tokenizer, new)
        if not last:
            if not step.content and not chunks and not extra and not metadata:
                return None
            return ChatGenerationChunk(
                message=AIMessageChunk(
                    content=step.content,
                    additional_kwargs=extra,
                    tool_call_chunks=chunks,
                    response_metadata=metadata,
                )
            )
        reason = finish_reason(meta)
        return ChatGenerationChunk(
            message=AIMessageChunk(
                content=step.content,
                additional_kwargs=extra,
                tool_call_chunks=chunks,
                usage_metadata=usage_metadata(meta),
                response_metadata={
                    **metadata,
                    **ChatSGLang._response_metadata(self.call, reason),
                },
                chunk_position="last",
            ),
            generation_info={"finish_reason": reason},
        )


def _logprob_leaf(call: _Call) -> dict[str, Any]:
    """The leaf options asking the backend for the call's logprobs (none when not asked)."""
    if call.logprobs is None:
        return {}
    return {"return_logprob": True, "top_logprobs_num": call.logprobs}


def _context_length(model: str | None) -> int | None:
    """max_position_embeddings of a local model folder's config (None when unknown)."""
    import json
    import os

    path = os.path.join(model, "config.json") if model else None
    if path is None or not os.path.isfile(path):
        return 8192 if model is None else None
    with open(path) as f:
        config = json.load(f)
    return config.get("max_position_embeddings")


__all__ = ["ChatSGLang"]
