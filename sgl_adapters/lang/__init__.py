"""The native SGLang frontend: `import sgl_adapters.lang as sgl` runs SGLang programs.

@sgl.function
def qa(s, question):
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=64))

sgl.set_default_backend(sgl.Runtime())          # the embedded model, in-process
state = qa.run(question="What is 2 + 2?")
print(state["answer"])
"""

from __future__ import annotations

from sgl_adapters.lang.api import (
    Engine,
    assistant,
    assistant_begin,
    assistant_end,
    flush_cache,
    function,
    gen,
    gen_int,
    gen_string,
    get_default_backend,
    get_server_info,
    select,
    separate_reasoning,
    set_default_backend,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
)
from sgl_adapters.lang.backends import (
    BackendRuntime,
    LangBackend,
    OpenAI,
    Runtime,
    RuntimeEndpoint,
)
from sgl_adapters.lang.chat_template import (
    ChatTemplate,
    get_chat_template,
    get_chat_template_by_model_path,
)
from sgl_adapters.lang.choices import (
    ChoicesDecision,
    ChoicesSamplingMethod,
    greedy_token_selection,
    token_length_normalized,
    unconditional_likelihood_normalized,
)
from sgl_adapters.lang.function import SglFunction
from sgl_adapters.lang.global_config import GlobalConfig, global_config
from sgl_adapters.lang.interpreter import ProgramError, ProgramState, ProgramStateGroup
from sgl_adapters.lang.unsupported import (
    Anthropic,
    LiteLLM,
    UnsupportedFeatureError,
    VertexAI,
    image,
    video,
)

__version__ = "0.5.0"  # the SGLang frontend API version this package follows

__all__ = [
    "Anthropic",
    "BackendRuntime",
    "ChatTemplate",
    "ChoicesDecision",
    "ChoicesSamplingMethod",
    "Engine",
    "GlobalConfig",
    "LiteLLM",
    "LangBackend",
    "OpenAI",
    "ProgramError",
    "ProgramState",
    "ProgramStateGroup",
    "Runtime",
    "RuntimeEndpoint",
    "SglFunction",
    "UnsupportedFeatureError",
    "VertexAI",
    "__version__",
    "assistant",
    "assistant_begin",
    "assistant_end",
    "flush_cache",
    "function",
    "gen",
    "gen_int",
    "gen_string",
    "get_chat_template",
    "get_chat_template_by_model_path",
    "get_default_backend",
    "get_server_info",
    "global_config",
    "greedy_token_selection",
    "image",
    "select",
    "separate_reasoning",
    "set_default_backend",
    "system",
    "system_begin",
    "system_end",
    "token_length_normalized",
    "unconditional_likelihood_normalized",
    "user",
    "user_begin",
    "user_end",
    "video",
]
