"""The DSPy 3.3 path: a `dspy.BaseLM` whose forward/aforward return OpenAI-shaped responses.

DSPy 3.3 has no engine contract; `SGLangLM` is what `sgl_adapters.dspy.LM` returns there (it
also runs on 3.4, where DSPy marks the forward() interface deprecated). `n` choices are one
engine submission, so they share one prefill of the prompt.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import dspy

from sgl_adapters import engines as _engines
from sgl_adapters.dspy import translate
from sgl_adapters.dspy.translate import EngineCall, GenerationDefaults


class SGLangLM(dspy.BaseLM):
    """A DSPy LM on the `sgl_engine.Engine` of (`model`, `engine_kwargs`), taken from an
    `EngineRegistry` (default: the process-wide one). Thread-safe: holds no per-call state;
    DSPy's history and usage tracking are updated by `BaseLM` as usual."""

    forward_contract = "legacy"

    def __init__(
        self,
        model: str | None = None,
        *,
        engine_kwargs: Mapping[str, Any] | None = None,
        default_max_tokens: int = GenerationDefaults.max_tokens,
        max_string_length: int | None = None,
        registry: _engines.EngineRegistry | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        cache: bool = False,
        num_retries: int = 0,
        callbacks: list | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            model=f"sglang/{_engines.model_display_name(model)}",
            model_type="chat",
            temperature=temperature,
            max_tokens=max_tokens,
            cache=cache,
            callbacks=callbacks,
            num_retries=num_retries,
            **kwargs,
        )
        self.model_path = model
        self.engine_kwargs = translate.engine_kwargs_or_default(engine_kwargs)
        self.defaults = GenerationDefaults(default_max_tokens, max_string_length)
        self.registry = registry

    @property
    def engine(self) -> Any:
        return _engines.shared_engine(self.model_path, self.engine_kwargs, self.registry)

    @property
    def supports_response_schema(self) -> bool:
        return True

    @property
    def supported_params(self) -> set[str]:
        return set(translate.SUPPORTED_PARAMS)

    def plan(self, prompt: str | None, messages: list | None, kwargs: Mapping) -> EngineCall:
        """The engine submission for one forward() call (`self.kwargs` under `kwargs`)."""
        chat = translate.chat_messages(messages or [{"role": "user", "content": prompt or ""}])
        text = self.engine.apply_chat_template(chat)
        options = {**self.kwargs, **kwargs}
        params, logprobs = translate.options_to_params(options, self.defaults)
        return EngineCall(text, params, logprobs)

    def forward(self, prompt: str | None = None, messages: list | None = None, **kwargs: Any):
        call = self.plan(prompt, messages, kwargs)
        with self._errors():
            results = self.engine.generate(call.prompt, **call.generate_kwargs())
            return self._response(results, call)

    async def aforward(
        self, prompt: str | None = None, messages: list | None = None, **kwargs: Any
    ):
        call = self.plan(prompt, messages, kwargs)
        with self._errors():
            results = await self.engine.async_generate(call.prompt, **call.generate_kwargs())
            return self._response(results, call)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """The engine's refusals and aborts as DSPy's public LM errors."""
        from dspy.utils.exceptions import (
            ContextWindowExceededError,
            LMInvalidRequestError,
            LMProviderError,
        )
        from sgl_engine.errors import InvalidRequestError

        try:
            yield
        except InvalidRequestError as exc:
            if exc.field == "prompt" and "tokens" in exc.message:
                raise ContextWindowExceededError(model=self.model, message=exc.message) from exc
            raise LMInvalidRequestError(exc.message, model=self.model) from exc
        except translate.EngineAbort as exc:
            raise LMProviderError(str(exc), model=self.model) from exc

    def _response(self, results: dict | list[dict], call: EngineCall) -> SimpleNamespace:
        results = results if isinstance(results, list) else [results]
        choices = []
        for index, result in enumerate(results):
            logprobs = None
            if call.logprobs is not None:
                logprobs = {"content": translate.token_logprobs(result, self.engine.tokenizer)}
            choices.append(
                SimpleNamespace(
                    index=index,
                    finish_reason=translate.finish_reason(result["meta_info"]),
                    message=SimpleNamespace(
                        role="assistant", content=result["text"], tool_calls=None
                    ),
                    logprobs=logprobs,
                )
            )
        counts = translate.usage_counts(results)
        usage = {
            "prompt_tokens": counts["prompt_tokens"],
            "completion_tokens": counts["completion_tokens"],
            "total_tokens": counts["total_tokens"],
            "prompt_tokens_details": {"cached_tokens": counts["cached_tokens"]},
        }
        meta = results[0]["meta_info"]
        return SimpleNamespace(
            id=meta.get("id"),
            object="chat.completion",
            model=self.model,
            choices=choices,
            usage=usage,
        )

    def dump_state(self) -> dict[str, Any]:
        state = super().dump_state()
        state.pop("model", None)
        state.update(
            model_path=self.model_path,
            engine_kwargs=self.engine_kwargs,
            default_max_tokens=self.defaults.max_tokens,
            max_string_length=self.defaults.max_string_length,
        )
        return state

    @classmethod
    def load_state(cls, state: dict[str, Any], *, allow_custom_lm_class: bool = False) -> SGLangLM:
        state = {k: v for k, v in state.items() if k not in ("model_type", "_dspy_lm_class")}
        return cls(state.pop("model_path", None), **state)

    def __getstate__(self) -> dict[str, Any]:
        """Pickles without its registry: an unpickled LM uses the process-wide one."""
        return {**self.__dict__, "registry": None}

    def __deepcopy__(self, memo: dict) -> SGLangLM:
        return self.copy()
