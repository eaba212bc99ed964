"""`with_structured_output` for `ChatSGLang`: a grammar-constrained model piped into a parser."""

from __future__ import annotations

from operator import itemgetter
from typing import TYPE_CHECKING, Any

from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import (
    JsonOutputKeyToolsParser,
    PydanticToolsParser,
)
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema
from langchain_core.utils.pydantic import is_basemodel_subclass

from sgl_adapters.langchain.tools import tool_specs

if TYPE_CHECKING:
    from sgl_adapters.langchain.chat_model import ChatSGLang

METHODS = ("json_schema", "function_calling", "json_mode")


def build(model: ChatSGLang, schema: Any, method: str, include_raw: bool) -> Runnable:
    """The runnable `with_structured_output` returns (see there)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if schema is None and method != "json_mode":
        raise ValueError(f"method {method!r} needs a schema")
    is_model = isinstance(schema, type) and is_basemodel_subclass(schema)
    ls_format = {"kwargs": {"method": method}, "schema": schema}
    if method == "function_calling":
        name = tool_specs([schema])[0]["name"]
        llm = model.bind_tools([schema], tool_choice=name, ls_structured_output_format=ls_format)
        parser: Runnable = (
            PydanticToolsParser(tools=[schema], first_tool_only=True)
            if is_model
            else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
        )
    else:
        json_schema = {"type": "object"} if schema is None else convert_to_json_schema(schema)
        llm = model.bind(json_schema=json_schema, ls_structured_output_format=ls_format)
        parser = PydanticOutputParser(pydantic_object=schema) if is_model else JsonOutputParser()
    if not include_raw:
        return llm | parser
    parsed = RunnablePassthrough.assign(
        parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
    )
    fallback = RunnablePassthrough.assign(parsed=lambda _: None)
    return RunnableMap(raw=llm) | parsed.with_fallbacks([fallback], exception_key="parsing_error")
