"""LangChain's own standard test suites (langchain-tests 1.1.9) against the embedded SmolLM2,
over the `local` backend (in-process) and over the `http` backend (our server, started by the
test on the same engine, its URL read from $SGL_ADAPTERS_BASE_URL).

Greedy decoding with small `max_tokens` keeps the integration suite fast on two CPU cores.
Tool calling, tool choice, structured output, JSON mode and usage metadata (with cache_read)
are on; only the modalities the text-only 135M model lacks are xfailed. Skips that remain:
model override (one embedded model; an http server serves one model), serialisation
(`ChatSGLang` is not lc-serializable), init from env over `local` (nothing to read).
"""

from __future__ import annotations

import os

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from sgl_adapters.engines import ENGINES
from sgl_adapters.langchain import ChatSGLang
from sgl_adapters.langchain.params import BASE_URL_ENV

ENGINE_KWARGS = {"device": "cpu", "max_total_tokens": 32768}
PARAMS = {
    "model": None,
    "max_tokens": 64,
    "temperature": 0.0,
    "max_string_length": 40,
    "engine_kwargs": ENGINE_KWARGS,
}
NO_IMAGES = "SmolLM2-135M-Instruct is a text-only model: no image inputs"
NO_AUDIO = "SmolLM2-135M-Instruct is a text-only model: no audio inputs"
NO_PDF = "SmolLM2-135M-Instruct is a text-only model: no PDF/file inputs"


class _Features:
    @property
    def chat_model_class(self) -> type[ChatSGLang]:
        return ChatSGLang

    @property
    def chat_model_params(self) -> dict:
        return dict(PARAMS)

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supported_usage_metadata_details(self) -> dict:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}


class TestChatSGLangUnit(_Features, ChatModelUnitTests):
    @property
    def chat_model_params(self) -> dict:
        return {k: v for k, v in PARAMS.items() if k != "max_tokens"}


class TestChatSGLangIntegration(_Features, ChatModelIntegrationTests):
    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        """A long shared system prompt sent twice: the second call reads it from the cache."""
        model = ChatSGLang(**{**self.chat_model_params, "max_tokens": 8})
        system = SystemMessage("You are a terse assistant. " * 40)
        model.invoke([system, HumanMessage("Say hi.")])
        messages = [system, HumanMessage("Say bye.")]
        if not stream:
            msg = model.invoke(messages)
        else:
            full = None
            for chunk in model.stream(messages):
                full = chunk if full is None else full + chunk
            msg = full
        assert msg.usage_metadata["input_token_details"]["cache_read"] > 200
        return msg

    @pytest.mark.xfail(reason=NO_IMAGES)
    def test_image_inputs(self, model) -> None:
        super().test_image_inputs(model)

    @pytest.mark.xfail(reason=NO_IMAGES)
    def test_image_tool_message(self, model) -> None:
        super().test_image_tool_message(model)

    @pytest.mark.xfail(reason=NO_AUDIO)
    def test_audio_inputs(self, model) -> None:
        super().test_audio_inputs(model)

    @pytest.mark.xfail(reason=NO_PDF)
    def test_pdf_inputs(self, model) -> None:
        super().test_pdf_inputs(model)

    @pytest.mark.xfail(reason=NO_PDF)
    def test_pdf_tool_message(self, model) -> None:
        super().test_pdf_tool_message(model)


HTTP_PARAMS = {k: v for k, v in PARAMS.items() if k not in ("model", "engine_kwargs")}
HTTP_PARAMS["backend"] = "http"


@pytest.fixture(scope="class")
def sglang_server():
    """Our server on the embedded model's shared engine; its URL in $SGL_ADAPTERS_BASE_URL."""
    from sgl_engine.server import ServerThread, create_app

    engine = ENGINES.get(None, ENGINE_KWARGS)
    with (
        ServerThread(create_app(engine, model_name="SmolLM2-135M-Instruct")) as srv,
        pytest.MonkeyPatch.context() as mp,
    ):
        mp.setenv(BASE_URL_ENV, srv.base_url)
        yield srv.base_url


class _OverHttp:
    @property
    def chat_model_params(self) -> dict:
        return dict(HTTP_PARAMS)

    @property
    def init_from_env_params(self) -> tuple[dict, dict, dict]:
        url = "http://127.0.0.1:30000"
        return {BASE_URL_ENV: url}, {"backend": "http"}, {"base_url": url}


class TestChatSGLangHttpUnit(_OverHttp, _Features, ChatModelUnitTests):
    @property
    def chat_model_params(self) -> dict:
        return {k: v for k, v in HTTP_PARAMS.items() if k != "max_tokens"}


@pytest.mark.usefixtures("sglang_server")
class TestChatSGLangHttpIntegration(_OverHttp, TestChatSGLangIntegration):
    async def test_backend_is_http(self, model) -> None:
        assert model.client().name == "http" and model.base_url == os.environ[BASE_URL_ENV]
