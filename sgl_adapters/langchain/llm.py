"""`SGLang`: a LangChain text-completion LLM served by the in-process engine."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult

from sgl_adapters.engines import Request, model_display_name
from sgl_adapters.langchain.params import SGLangParams, finish_reason, usage_metadata


class SGLang(SGLangParams, BaseLLM):
    """Completion model on `sgl_engine.Engine`. `generate`/`batch` send all prompts in one
    engine submission, so a prefix they share is prefilled once."""

    @property
    def _llm_type(self) -> str:
        return "sglang"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "temperature": self.temperature}

    def _requests(self, prompts: list[str], stop: list[str] | None, kwargs: dict) -> list[Request]:
        params = self.sampling_params(stop, kwargs)
        return [Request(p, params) for p in prompts]

    def _result(self, results: list[dict], model: str | None) -> LLMResult:
        generations = []
        total = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0, "cache_read": 0}
        for r in results:
            usage = usage_metadata(r["meta_info"])
            info = {"finish_reason": finish_reason(r["meta_info"]), "usage_metadata": usage}
            generations.append([Generation(text=r["text"], generation_info=info)])
            for key in ("input_tokens", "output_tokens", "total_tokens"):
                total[key] += usage[key]
            total["cache_read"] += usage["input_token_details"]["cache_read"]
        name = model_display_name(model)
        return LLMResult(generations=generations, llm_output={"model_name": name, "usage": total})

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        model = kwargs.get("model", self.model)
        results = self.client(model).generate(self._requests(prompts, stop, kwargs))
        return self._result(results, model)

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        model = kwargs.get("model", self.model)
        results = await self.client(model).agenerate(self._requests(prompts, stop, kwargs))
        return self._result(results, model)

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        (request,) = self._requests([prompt], stop, kwargs)
        sent = 0
        for raw in self.client(kwargs.get("model")).stream(request):
            chunk, sent = _chunk(raw, sent)
            if chunk is not None:
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        (request,) = self._requests([prompt], stop, kwargs)
        sent = 0
        async for raw in self.client(kwargs.get("model")).astream(request):
            chunk, sent = _chunk(raw, sent)
            if chunk is not None:
                if run_manager:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk


def _chunk(raw: dict, sent: int) -> tuple[GenerationChunk | None, int]:
    text, meta = raw["text"], raw["meta_info"]
    delta = text[sent:]
    sent = max(sent, len(text))
    if not meta.get("finish_reason"):
        return (GenerationChunk(text=delta) if delta else None), sent
    info = {"finish_reason": finish_reason(meta), "usage_metadata": usage_metadata(meta)}
    return GenerationChunk(text=delta, generation_info=info), sent
