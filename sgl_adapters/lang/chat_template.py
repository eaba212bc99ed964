"""Role prefixes and suffixes for `sgl.system/user/assistant`, read off a model's chat template.

The tokenizer's Jinja template is rendered on conversations with marker contents; the text
around each marker is that role's prefix and suffix. A template that inserts a system message
when none is given yields `default_system_prompt`, emitted when a program's first role is not
system (as SGLang does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_MARK = ("XqSYSq0X", "XqUSRq1X", "XqASTq2X")


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    role_prefix_and_suffix: dict[str, tuple[str, str]] = field(default_factory=dict)
    default_system_prompt: str | None = None

    def get_prefix_and_suffix(self, role: str) -> tuple[str, str]:
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
