"""Model-family knowledge: tool-call formats, reasoning markers, tool prompts, grammars.

One registry keyed by family (`FamilyRegistry`, built-ins in `builtin_registry()`), shared by
the server, LangChain, DSPy and the DSL; the plugin layer extends it through a hook.
"""

from __future__ import annotations

from sgl_engine.families.chat import prepare_chat
from sgl_engine.families.grammar import constraint_ebnf, tool_grammar, with_reasoning
from sgl_engine.families.reasoning import THINK, ReasoningFormat, ReasoningStream
from sgl_engine.families.registry import (
    BUILTIN_FAMILIES,
    FamilyRegistry,
    ModelFamily,
    builtin_registry,
    family_of,
)
from sgl_engine.families.stream import (
    CallDelta,
    OutputStream,
    ParsedOutput,
    StreamDelta,
    parse_output,
)
from sgl_engine.families.tool_format import (
    HERMES,
    LLAMA3_JSON,
    MISTRAL,
    SMOLLM2,
    ParsedCall,
    ToolFormat,
)

__all__ = [
    "BUILTIN_FAMILIES",
    "HERMES",
    "LLAMA3_JSON",
    "MISTRAL",
    "SMOLLM2",
    "THINK",
    "CallDelta",
    "FamilyRegistry",
    "ModelFamily",
    "OutputStream",
    "ParsedCall",
    "ParsedOutput",
    "ReasoningFormat",
    "ReasoningStream",
    "StreamDelta",
    "ToolFormat",
    "builtin_registry",
    "constraint_ebnf",
    "family_of",
    "parse_output",
    "prepare_chat",
    "tool_grammar",
    "with_reasoning",
]
