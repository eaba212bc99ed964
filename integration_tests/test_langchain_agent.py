"""Agent loops on the embedded SmolLM2, with no bias knob: every turn decodes under the family's
tool grammar (tool_choice "auto": plain text or well-formed calls), so whatever the 135M model
chooses parses, and calls are valid against their tools' schemas.
"""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool

from sgl_adapters.langchain import ChatSGLang

PARAMS = {
    "max_tokens": 64,
    "max_string_length": 40,
    "engine_kwargs": {"device": "cpu", "max_total_tokens": 32768},
}
CALLS: list[tuple[str, dict]] = []


@tool
def get_weather(location: str) -> str:
    """Get the current weather for a location."""
    CALLS.append(("get_weather", {"location": location}))
    return f"It's sunny in {location}."


@tool
def get_time(location: str) -> str:
    """Get the current local time in a location."""
    CALLS.append(("get_time", {"location": location}))
    return f"It is 10:30 in {location}."


def test_smollm2_is_detected_as_its_own_family():
    model = ChatSGLang(**PARAMS)
    assert model.model_family().name == "smollm2"
    assert model.profile["tool_calling"] and model.profile["structured_output"]


def test_create_agent_runs_a_two_tool_loop_to_a_final_answer():
    from langchain.agents import create_agent

    CALLS.clear()
    agent = create_agent(ChatSGLang(**PARAMS), tools=[get_weather, get_time])
    state = agent.invoke(
        {"messages": [HumanMessage("What is the weather and the time in Paris?")]},
        {"recursion_limit": 12},
    )
    messages = state["messages"]
    called = [m for m in messages if isinstance(m, AIMessage) and m.tool_calls]
    results = [m for m in messages if isinstance(m, ToolMessage)]
    assert called and results, [m.pretty_repr() for m in messages]
    names = {c["name"] for m in called for c in m.tool_calls}
    assert names <= {"get_weather", "get_time"}
    assert [name for name, _ in CALLS] == [c["name"] for m in called for c in m.tool_calls]
    assert {r.tool_call_id for r in results} == {c["id"] for m in called for c in m.tool_calls}
    final = messages[-1]
    assert isinstance(final, AIMessage) and not final.tool_calls and final.text.strip()
    assert "<tool_call>" not in final.text


@pytest.mark.parametrize("stream", [False, True])
def test_bound_model_calls_with_parallel_and_strict(stream):
    CALLS.clear()
    model = ChatSGLang(**PARAMS, streaming=stream)
    bound = model.bind_tools(
        [get_weather, get_time], tool_choice="any", parallel_tool_calls=True, strict=True
    )
    reply = bound.invoke("What is the weather and the time in San Francisco?")
    assert reply.tool_calls and not reply.invalid_tool_calls
    for call in reply.tool_calls:
        assert call["name"] in ("get_weather", "get_time")
        assert isinstance(call["args"]["location"], str)
    assert reply.usage_metadata["input_tokens"] == model.get_num_tokens_from_messages(
        [HumanMessage("What is the weather and the time in San Francisco?")],
        tools=[get_weather, get_time],
    )
