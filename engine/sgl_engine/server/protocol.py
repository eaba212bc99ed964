"""Request bodies of the HTTP API (pydantic): OpenAI's completions and chat, SGLang's /generate.

Unknown fields are ignored (clients send vendor extras such as `user` or `service_tier`);
fields we know are validated, and a bad one becomes a 400 naming it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sgl_engine.errors import InvalidRequestError


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    def check_unicode(self) -> None:
        """Raise `InvalidRequestError` naming the first string (key or value) that is not valid
        Unicode: JSON can carry a lone surrogate such as "\\ud800"; no tokenizer encodes it."""
        _check_unicode(self.model_dump(exclude_none=True, by_alias=True), "")


def _check_unicode(value: Any, path: str) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            where = path or "body"
            raise InvalidRequestError(f"{where} is not valid Unicode text", where) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(str(key), path or "body")
            _check_unicode(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_unicode(item, f"{path}.{i}")


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDef(_Body):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class ToolChoiceFunction(_Body):
    name: str


class ToolChoice(_Body):
    type: Literal["function"] = "function"
    function: ToolChoiceFunction


class SamplingExtras(_Body):
    """SGLang sampling fields accepted beside OpenAI's (as `extra_body` in the openai client)."""

    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    no_stop_trim: bool | None = None
    stop_token_ids: list[int] | None = None
    regex: str | None = None
    ebnf: str | None = None
    json_schema: dict[str, Any] | str | None = None
    choices: list[str] | None = None


class _OpenAIBase(SamplingExtras):
    model: str | None = None
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    response_format: ResponseFormat | None = None


class CompletionRequest(_OpenAIBase):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _text_parts(cls, content: Any) -> Any:
        for i, part in enumerate(content if isinstance(content, list) else []):
            if part.get("type", "text") == "text" and not isinstance(part.get("text"), str):
                raise ValueError(f"content part {i} is a text part whose 'text' is not a string")
        return content

    @field_validator("tool_calls")
    @classmethod
    def _calls(cls, calls: Any) -> Any:
        for i, call in enumerate(calls or []):
            fn = call.get("function")
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ValueError(f"tool call {i}: 'function' must be an object with a 'name'")
            if not isinstance(fn.get("arguments", ""), str | dict):
                raise ValueError(f"tool call {i}: 'arguments' must be a JSON string or object")
        return calls


class ChatCompletionRequest(_OpenAIBase):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    separate_reasoning: bool = True


class GenerateRequest(_Body):
    """SGLang's /generate body: `text` or `input_ids` (one request or a list of them)."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    return_logprob: bool | list[bool] = False
    logprob_start_len: int | list[int] = -1
    top_logprobs_num: int | list[int] = 0
    return_text_in_logprobs: bool = False
    stream: bool = False
    rid: str | list[str] | None = None
