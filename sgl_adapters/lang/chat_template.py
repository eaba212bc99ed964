"""Role prefixes and suffixes for `sgl.system/user/assistant`, read off a model's chat template.

The tokenizer's Jinja template is rendered on conversations with marker contents; the text
around each marker is that role's prefix and suffix. A template that inserts a system message
when none is given yields `default_system_prompt`, emitted when a program's first role is not
system (as SGLang does).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_MARK = ("XqSYSq0X", "XqUSRq1X", "XqASTq2X")


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    role_prefix_and_suffix: dict[str, tuple[str, str]] = field(default_factory=dict)
    default_system_prompt: str | None = None
    stop_str: tuple[str, ...] = ()

    def get_prefix_and_suffix(self, role: str, hist_messages: Any = None) -> tuple[str, str]:
        if role not in self.role_prefix_and_suffix:
            raise ValueError(f"unknown role {role!r} for chat template {self.name!r}")
        return self.role_prefix_and_suffix[role]


PLAIN = ChatTemplate(
    "plain",
    {"system": ("", "\n\n"), "user": ("User: ", "\n"), "assistant": ("Assistant: ", "\n")},
)


def _render(tokenizer: Any, messages: list[dict[str, str]], gen: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def _split(text: str, mark: str) -> tuple[str, str]:
    i = text.index(mark)
    return text[:i], text[i + len(mark) :]


def from_tokenizer(tokenizer: Any, name: str = "model") -> ChatTemplate:
    """The template of `tokenizer` (HF, with `chat_template`); `PLAIN` when it has none or
    when its template cannot be split into per-role prefixes and suffixes."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return PLAIN
    try:
        return _derive(tokenizer, name)
    except Exception:  # noqa: BLE001 -- any template we cannot read falls back to plain
        return PLAIN


def _derive(tokenizer: Any, name: str) -> ChatTemplate:
    sys_m, usr_m, ast_m = _MARK
    system = {"role": "system", "content": sys_m}
    user = {"role": "user", "content": usr_m}
    assistant = {"role": "assistant", "content": ast_m}
    s = _render(tokenizer, [system], False)
    su = _render(tokenizer, [system, user], False)
    sua = _render(tokenizer, [system, user, assistant], False)
    gen = _render(tokenizer, [system, user], True)
    if not (su.startswith(s) and sua.startswith(su) and gen.startswith(su)):
        raise ValueError("chat template is not incremental")
    roles = {
        "system": _split(s, sys_m),
        "user": _split(su[len(s) :], usr_m),
        "assistant": _split(sua[len(su) :], ast_m),
    }
    gen_prefix = gen[len(su) :]
    if gen_prefix and gen_prefix != roles["assistant"][0]:
        roles["assistant"] = (gen_prefix, roles["assistant"][1])
    return ChatTemplate(name, roles, _default_system(tokenizer, roles))


def _default_system(tokenizer: Any, roles: dict[str, tuple[str, str]]) -> str | None:
    usr_m = _MARK[1]
    u = _render(tokenizer, [{"role": "user", "content": usr_m}], False)
    head = u[: u.index(roles["user"][0] + usr_m)] if roles["user"][0] + usr_m in u else ""
    prefix, suffix = roles["system"]
    if head and head.startswith(prefix) and head.endswith(suffix):
        return head[len(prefix) : len(head) - len(suffix)] or None
    return None


def _chatml(name: str, system: str | None = None) -> ChatTemplate:
    roles = {r: (f"<|im_start|>{r}\n", "<|im_end|>\n") for r in ("system", "user", "assistant")}
    return ChatTemplate(name, roles, system, ("<|im_end|>",))


def _llama3(name: str) -> ChatTemplate:
    roles = {
        r: (f"<|start_header_id|>{r}<|end_header_id|>\n\n", "<|eot_id|>")
        for r in ("system", "user", "assistant")
    }
    return ChatTemplate(name, roles, None, ("<|eot_id|>",))


# SGLang's named templates (`sglang.lang.chat_template`) for the text models of the families
# served here; the role strings are the models' documented formats.
NAMED: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate(
            "default",
            {
                "system": ("SYSTEM:", "\n"),
                "user": ("USER:", "\n"),
                "assistant": ("ASSISTANT:", "\n"),
            },
        ),
        ChatTemplate(
            "claude",
            {"system": ("", ""), "user": ("\n\nHuman: ", ""), "assistant": ("\n\nAssistant:", "")},
        ),
        _chatml("chatml"),
        _chatml("qwen", "You are a helpful assistant."),
        _llama3("llama-3-instruct"),
        ChatTemplate(
            "vicuna_v1.1",
            {"system": ("", " "), "user": ("USER:", " "), "assistant": ("ASSISTANT:", "</s>")},
            "A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        ),
        ChatTemplate(
            "gemma-it",
            {
                "system": ("", ""),
                "user": ("<start_of_turn>user\n", "<end_of_turn>\n"),
                "assistant": ("<start_of_turn>model\n", "<end_of_turn>\n"),
            },
        ),
        ChatTemplate(
            "deepseek-v3",
            {
                "system": ("", ""),
                "user": ("<\uff5cUser\uff5c>", ""),
                "assistant": ("<\uff5cAssistant\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>"),
            },
            None,
            ("<\uff5cend\u2581of\u2581sentence\uff5c>",),
        ),
    )
}

# (substrings that must all occur in the lower-cased model path, template name), first wins.
_PATH_RULES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("deepseek-v3",), "deepseek-v3"),
    (("deepseek-r1",), "deepseek-v3"),
    (("vicuna",), "vicuna_v1.1"),
    (("llama-3", "instruct"), "llama-3-instruct"),
    (("llama3", "instruct"), "llama-3-instruct"),
    (("qwen", "instruct"), "qwen"),
    (("qwen", "chat"), "qwen"),
    (("smollm", "instruct"), "chatml"),
    (("gemma", "-it"), "gemma-it"),
)


def get_chat_template(name: str) -> ChatTemplate:
    """SGLang's `get_chat_template(name)`: a named template; ValueError lists the names."""
    if name not in NAMED:
        raise ValueError(
            f"unknown chat template {name!r}; known: {', '.join(sorted(NAMED))} "
            "(or pass chat_template=ChatTemplate(...), or a tokenizer whose template is used)"
        )
    return NAMED[name]


def get_chat_template_by_model_path(model_path: str | None) -> ChatTemplate:
    """SGLang's lookup by model name: the first rule whose words occur in the path, else
    SGLang's "default" template."""
    path = (model_path or "").lower()
    for words, name in _PATH_RULES:
        if all(w in path for w in words):
            return NAMED[name]
    return NAMED["default"]


class JinjaChatTemplate:
    """A served model's Jinja chat template (the text /get_server_info reports), rendered as
    transformers renders it, standing in for a tokenizer in `from_tokenizer`."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None) -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ValueError(message)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = raise_exception
        self.chat_template = source
        self._template = env.from_string(source)
        self._special = dict(special_tokens or {})

    def apply_chat_template(
        self, messages: list[dict[str, str]], tokenize: bool = False, add_generation_prompt=False
    ) -> str:
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self._special
        )


def for_served_model(
    model_info: dict[str, Any], server_info: Callable[[], dict[str, Any]] | None = None
) -> ChatTemplate:
    """The template of a served model: read off its tokenizer when the tokenizer folder is on
    this machine, else off the Jinja template its /get_server_info reports (`server_info`,
    called only then), else looked up by the model's name as SGLang does."""
    for key in ("tokenizer_path", "model_path"):
        path = model_info.get(key)
        if path and os.path.isdir(str(path)):
            try:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            except Exception:  # noqa: BLE001 -- not a tokenizer folder: try the next source
                continue
            derived = from_tokenizer(tokenizer, os.path.basename(str(path)))
            if derived is not PLAIN:
                return derived
    info = server_info() if server_info is not None else {}
    source = info.get("chat_template")
    name = info.get("served_model_name") or model_info.get("served_model_name")
    name = str(name or model_info.get("model_path") or "")
    if isinstance(source, str) and source:
        special = {k: info[k] for k in ("bos_token", "eos_token") if isinstance(info.get(k), str)}
        derived = from_tokenizer(JinjaChatTemplate(source, special), name or "served")
        if derived is not PLAIN:
            return derived
    return get_chat_template_by_model_path(name)
