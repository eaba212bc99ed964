"""An agent loop on the embedded SmolLM2: tool call, ToolMessage, final answer.

Every turn lets the model choose (tool_choice="auto": the log-probability of starting with a
tool call, plus `tool_call_bias`, against the best plain-text start); a call is decoded under
the tool grammar, so it is valid even from a 135M model. The loop stops on a text answer or
after a step budget, when the model is asked to answer without tools.
"""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool

from sgl_adapters.langchain import ChatSGLang

PARAMS = {
    "max_tokens": 48,
    "max_string_length": 40,
    "tool_call_bias": 4.5,
    "engine_kwargs": {"device": "cpu", "max_total_tokens": 32768},
}
CALLS: list[dict] = []


@tool
def get_weather(location: str) -> str:
    """Get the current weather for a location."""
    CALLS.append({"location": location})
    return f"It's sunny in {location}."


def _run_agent(model: ChatSGLang, question: str, max_steps: int = 3) -> list:
    messages: list = [HumanMessage(question)]
    for _ in range(max_steps):
        reply = model.bind_tools([get_weather], tool_choice="auto").invoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            return messages
        for call in reply.tool_calls:
            messages.append(get_weather.invoke(call))
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
    assert final.text.strip() and not final.text.lstrip().startswith("<")
    assert len(messages) == 4, "the model should answer right after the tool result"
    usage = final.usage_metadata
    assert usage["input_token_details"]["cache_read"] > 0
