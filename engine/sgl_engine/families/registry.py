"""Model families: tool-call format, reasoning markers and tool prompt, keyed by family name.

A `FamilyRegistry` holds `ModelFamily`s and picks one for a model from its chat template and
config `model_type` (`detect`). The built-ins are `builtin_registry()`'s; the plugin layer adds
third-party families through its `register_model_families` hook. Registries are plain values:
every server or front door builds (or is handed) its own.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from sgl_engine.families.reasoning import THINK, ReasoningFormat
from sgl_engine.families.tool_format import (
    HERMES,
    LLAMA3_JSON,
    MISTRAL,
    SMOLLM2,
    ParsedCall,
    ToolFormat,
)

ToolsPrompt = Callable[[ToolFormat, Sequence[dict]], str]


def generic_tools_prompt(fmt: ToolFormat, specs: Sequence[dict]) -> str:
    """System text offering `specs` to a model whose chat template cannot render tools."""
    listing = "\n".join(json.dumps(s, ensure_ascii=False) for s in specs)
    example = fmt.render([ParsedCall("<function name>", {"<argument>": "<value>"})])
    return (
        "You may call one or more functions to answer. Available functions:\n"
        f"<tools>\n{listing}\n</tools>\n"
        f"To call functions, answer with:\n{example}\nOtherwise answer in plain text."
    )


def smollm2_tools_prompt(fmt: ToolFormat, specs: Sequence[dict]) -> str:
    """The system text SmolLM2-Instruct was tuned on for function calling."""
    listing = json.dumps(list(specs), ensure_ascii=False)
    example = '{"name": "func_name1", "arguments": {"argument1": "value1", "argument2": "value2"}}'
    return (
        "You are an expert in composing functions. You are given a question and a set of "
        "possible functions. \nBased on the question, you will need to make one or more "
        "function/tool calls to achieve the purpose. \nIf none of the functions can be used, "
        "point it out and refuse to answer. \nIf the given question lacks the parameters "
        "required by the function, also point it out.\n\nYou have access to the following "
        f"tools:\n<tools>{listing}</tools>\n\nThe output MUST strictly adhere to the "
        "following format, and NO other text MUST be included.\nThe example format is as "
        "follows. Please make sure the parameter type is correct. If no function call is "
        "needed, please make the tool calls an empty list '[]'.\n"
        f"{fmt.begin}[\n{example},\n... (more tool calls as required)\n]{fmt.end}"
    )


@dataclass(frozen=True)
class ModelFamily:
    """What the front doors need to know about a family of models.

    Detection: every one of `template_markers` occurs in the chat template, or the config's
    `model_type` is one of `model_types`. Higher `priority` is
    tried first. `tools_prompt` offers tools when the template does not render them itself.
    """

    name: str
    tool_format: ToolFormat
    reasoning: ReasoningFormat | None = None
    template_markers: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()
    priority: int = 0
    tools_prompt: ToolsPrompt = generic_tools_prompt
    description: str = ""
    calls_first: bool = False
    """The family's tuned protocol answers a user turn that offers tools with the call list
    alone (an empty list declining): tool_choice "auto" then decodes that list (possibly
    empty) on user turns, and text or calls after tool results."""

    def matches(self, template: str, model_type: str | None) -> bool:
        if self.template_markers and all(m in template for m in self.template_markers):
            return True
        return model_type is not None and model_type in self.model_types

    def tools_system_prompt(self, specs: Sequence[dict]) -> str:
        return self.tools_prompt(self.tool_format, specs)

    def auto_mode(self, messages: Sequence[dict]) -> str:
        """The grammar mode of tool_choice "auto" for a conversation (OpenAI-shaped dicts):
        "list" on a user turn of a `calls_first` family, else "auto"."""
        last = messages[-1].get("role") if messages else "user"
        return "list" if self.calls_first and self.tool_format.array and last == "user" else "auto"


QWEN3 = ModelFamily(
    "qwen3",
    HERMES,
    THINK,
    template_markers=("<tool_call>", "<think>"),
    model_types=("qwen3", "qwen3_moe"),
    priority=30,
    description="Qwen3: Hermes tool calls, <think> reasoning",
)
DEEPSEEK_R1 = ModelFamily(
    "deepseek-r1",
    HERMES,
    THINK,
    template_markers=("<｜Assistant｜>", "<think>"),
    priority=30,
    description="DeepSeek-R1 distills: the template opens <think>",
)
HERMES_FAMILY = ModelFamily(
    "hermes",
    HERMES,
    template_markers=("<tool_call>",),
    model_types=("qwen2",),
    priority=20,
    description="Hermes / Qwen2.5: <tool_call>{json}</tool_call>, several per turn",
)
LLAMA3 = ModelFamily(
    "llama3",
    LLAMA3_JSON,
    template_markers=("<|start_header_id|>",),
    priority=10,
    description="Llama-3.1/3.2: JSON calls with parameters, joined by '; '",
)
MISTRAL_FAMILY = ModelFamily(
    "mistral",
    MISTRAL,
    template_markers=("[TOOL_CALLS]",),
    model_types=("mistral",),
    priority=10,
    description="Mistral: [TOOL_CALLS][...]",
)
SMOLLM2_FAMILY = ModelFamily(
    "smollm2",
    SMOLLM2,
    template_markers=("SmolLM",),
    priority=10,
    tools_prompt=smollm2_tools_prompt,
    description="SmolLM2-Instruct: <tool_call>[...]</tool_call>",
    calls_first=True,
)
BUILTIN_FAMILIES = (QWEN3, DEEPSEEK_R1, HERMES_FAMILY, LLAMA3, MISTRAL_FAMILY, SMOLLM2_FAMILY)
DEFAULT_FAMILY = "hermes"


class FamilyRegistry:
    """Families by name. `register` and `detect` are thread-safe (one lock over the dict);
    families themselves are immutable."""

    def __init__(self, families: Iterable[ModelFamily] = (), default: str = DEFAULT_FAMILY):
        self._families: dict[str, ModelFamily] = {}
        self._lock = threading.Lock()
        self.default = default
        for family in families:
            self.register(family)

    def register(self, family: ModelFamily, *, replace: bool = False) -> None:
        """Add `family`; a name already present raises ValueError unless `replace`."""
        if not isinstance(family, ModelFamily):
            raise TypeError(f"expected a ModelFamily, got {type(family).__name__}")
        with self._lock:
            if family.name in self._families and not replace:
                raise ValueError(f"model family {family.name!r} is already registered")
            self._families[family.name] = family

    def get(self, name: str) -> ModelFamily:
        with self._lock:
            family = self._families.get(name)
            known = sorted(self._families)
        if family is None:
            raise KeyError(f"unknown model family {name!r} (known: {', '.join(known)})")
        return family

    def names(self) -> list[str]:
        with self._lock:
            return list(self._families)

    def detect(self, template: str | None, model_type: str | None = None) -> ModelFamily:
        """The family whose markers the chat template has (or whose model_type it is); the
        default family when none matches."""
        with self._lock:
            ordered = sorted(self._families.values(), key=lambda f: -f.priority)
        for family in ordered:
            if family.matches(template or "", model_type):
                return family
        return self.get(self.default)


def builtin_registry() -> FamilyRegistry:
    """A new registry holding the built-in families."""
    return FamilyRegistry(BUILTIN_FAMILIES)


def family_of(engine_or_tokenizer: object, registry: FamilyRegistry | None = None) -> ModelFamily:
    """The family of an engine (or tokenizer) from its chat template and model config."""
    registry = registry or builtin_registry()
    tokenizer = getattr(engine_or_tokenizer, "tokenizer", engine_or_tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = "\n".join(template.values())
    model_type = getattr(getattr(engine_or_tokenizer, "hf_config", None), "model_type", None)
    return registry.detect(template if isinstance(template, str) else None, model_type)
