"""An agent loop on the embedded SmolLM2: tool call, ToolMessage, final answer.

The first turn forces a tool call (tool_choice="any"), which the grammar makes valid even for
a 135M model; later turns let the model choose ("auto") and the loop stops on a text answer
or after a step budget, when the model is asked to answer without tools.
"""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool

from sgl_adapters.langchain import ChatSGLang

PARAMS = {"max_tokens": 48, "max_string_length": 40, "engine_kwargs": {"device": "cpu"}}
CALLS: list[dict] = []


@tool
def get_weather(location: str) -> str:
    """Get the current weather for a location."""
    CALLS.append({"location": location})
    return f"It's sunny in {location}."


def _run_agent(model: ChatSGLang, question: str, max_steps: int = 3) -> list:
    messages: list = [HumanMessage(question)]
    choice = "any"
    for _ in range(max_steps):
        reply = model.bind_tools([get_weather], tool_choice=choice).invoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            return messages
        for call in reply.tool_calls:
            messages.append(get_weather.invoke(call))
        choice = "auto"
    messages.append(model.bind_tools([get_weather], tool_choice="none").invoke(messages))
    return messages


@pytest.mark.parametrize("stream", [False, True])
def test_agent_loop_calls_the_tool_then_answers(stream):
    CALLS.clear()
    model = ChatSGLang(**PARAMS, streaming=stream)
    messages = _run_agent(model, "What is the weather in San Francisco, CA?")
    first = messages[1]
    assert isinstance(first, AIMessage) and len(first.tool_calls) == 1
    assert first.tool_calls[0]["name"] == "get_weather"
    assert isinstance(first.tool_calls[0]["args"]["location"], str)
    assert CALLS[0] == first.tool_calls[0]["args"]
    result = messages[2]
    assert isinstance(result, ToolMessage) and result.tool_call_id == first.tool_calls[0]["id"]
    final = messages[-1]
    assert isinstance(final, AIMessage) and not final.tool_calls
    assert final.text.strip()
    usage = final.usage_metadata
    assert usage["input_token_details"]["cache_read"] > 0
