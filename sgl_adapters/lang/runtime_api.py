"""SGLang's `Runtime` methods beyond running programs: `generate`, `async_generate`,
`encode`, `endpoint`, `get_server_info`, `get_model_name`, profiling.

`RuntimeAPI` is mixed into the in-process `Runtime`; it is written against the two calls of
`LangBackend` (`request`, `request_stream`) and the runtime's `server_info()`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from sgl_adapters.lang.ir import GenParams
from sgl_adapters.lang.unsupported import UnsupportedFeatureError

_END = object()


class RuntimeAPI:
    """SGLang's `Runtime` surface (`sglang.lang.backend.runtime_endpoint.Runtime`). Mixed in
    before a `LangBackend`, which provides `request` and `request_stream`; the runtime
    provides `server_info()`."""

    request: Any
    request_stream: Any
    server_info: Any

    @property
    def url(self) -> str:
        raise AttributeError(
            "Runtime.url: this runtime is in-process and launches no HTTP server; serve a "
            "model with `sgl-adapters serve` and connect with sgl.RuntimeEndpoint(url)"
        )

    generate_url = url

    def get_model_name(self) -> str:
        return str(self.server_info().get("model_path") or "")

    @property
    def endpoint(self) -> _Endpoint:
        """What SGLang's `Runtime.endpoint` is: the backend programs run on (this runtime),
        whose `get_server_info()` answers synchronously."""
        return _Endpoint(self)

    def generate(
        self,
        prompt: str | list[str],
        sampling_params: dict[str, Any] | None = None,
        return_logprob: bool | list[bool] = False,
        logprob_start_len: int | list[int] | None = None,
        top_logprobs_num: int | list[int] | None = None,
        lora_path: Any = None,
    ) -> Any:
        """One /generate call, answered as SGLang does: the JSON text of the result. (The
        interpreter's own call, `generate(prompt, GenParams)`, goes on to `LangBackend`.)"""
        if isinstance(sampling_params, GenParams):
            return super().generate(prompt, sampling_params)  # type: ignore[misc]
        if lora_path is not None:
            raise UnsupportedFeatureError("Runtime.generate: LoRA adapters are not supported")
        data: dict[str, Any] = {"text": prompt, "sampling_params": sampling_params or {}}
        if return_logprob:
            data["return_logprob"] = return_logprob
            if logprob_start_len is not None:
                data["logprob_start_len"] = logprob_start_len
            if top_logprobs_num is not None:
                data["top_logprobs_num"] = top_logprobs_num
        return json.dumps(self.request(data))

    async def async_generate(
        self, prompt: str, sampling_params: dict[str, Any] | None = None
    ) -> AsyncIterator[str]:
        """Stream one completion: its new text piece by piece (the blocking stream is read in
        a worker thread)."""
        data = {"text": prompt, "sampling_params": sampling_params or {}, "stream": True}
        chunks = iter(self.request_stream(data))
        loop = asyncio.get_running_loop()
        sent = 0
        while True:
            chunk = await loop.run_in_executor(None, next, chunks, _END)
            if chunk is _END:
                return
            text = chunk.get("text", "")
            if len(text) > sent:
                yield text[sent:]
                sent = len(text)

    add_request = async_generate

    def encode(self, prompt: Any) -> str:
        """SGLang's /encode (embeddings): refused, the served model is generative."""
        raise UnsupportedFeatureError(
            "Runtime.encode: /encode returns embeddings, which need an embedding model; this "
            "runtime serves a generative model (is_generation=True). For token ids use "
            "runtime.get_tokenizer().encode(text)"
        )

    async def get_server_info(self) -> dict[str, Any]:
        """SGLang's `Runtime.get_server_info` is a coroutine; `sgl.get_server_info(runtime)`
        and `runtime.endpoint.get_server_info()` answer synchronously."""
        return self.server_info()

    def start_profile(self) -> None:
        raise UnsupportedFeatureError(
            "Runtime.start_profile: the engine has no built-in profiler; see "
            "benchmarks/profile_gpu.py"
        )

    stop_profile = start_profile


class _Endpoint:
    """`runtime.endpoint`: delegates to the runtime; `get_server_info` is synchronous."""

    def __init__(self, runtime: RuntimeAPI) -> None:
        self._runtime = runtime

    def get_server_info(self) -> dict[str, Any]:
        return self._runtime.server_info()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runtime, name)


def engine_server_info(engine: Any) -> dict[str, Any]:
    """SGLang's /get_server_info shape for an in-process engine: its config fields, model
    paths, `internal_states` (the engine's metrics) and `version`."""
    import dataclasses
    from importlib.metadata import PackageNotFoundError, version

    config = getattr(engine, "config", None)
    info = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}
    path = str(engine.model_path) if getattr(engine, "model_path", None) else None
    try:
        ours = version("sgl-adapters")
    except PackageNotFoundError:
        ours = None
    return {
        **info,
        "model_path": path,
        "tokenizer_path": info.get("tokenizer_path") or path,
        "is_generation": True,
        "context_length": engine.context_length,
        "internal_states": [engine.metrics()],
        "version": ours,
    }
