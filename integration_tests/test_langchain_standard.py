"""LangChain's own standard test suites (langchain-tests 1.1.9) against the embedded SmolLM2.

Greedy decoding with small `max_tokens` keeps the integration suite fast on two CPU cores.
Tool calling, tool choice, structured output, JSON mode and usage metadata (with cache_read)
are on; only the modalities the text-only 135M model lacks are xfailed.
"""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from sgl_adapters.langchain import ChatSGLang

ENGINE_KWARGS = {"device": "cpu", "max_total_tokens": 32768}
PARAMS = {
    "model": None,
    "max_tokens": 64,
    "temperature": 0.0,
    "max_string_length": 40,
    "tool_call_bias": 4.5,
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
        model = ChatSGLang(**{**PARAMS, "max_tokens": 8})
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
