"""The hook specification of sgl-adapters plugins (pluggy, project name "sgl_adapters").

A plugin is a module (or object) with `@hookimpl` functions, published under the entry-point
group `sgl_adapters`:

    [project.entry-points.sgl_adapters]
    mybackend = "my_package.plugin"

Hooks follow the registry-callback style: the manager calls each hook once per plugin with a
`register` callback and records what the plugin registered under the plugin's name. A hook may
only call `register`; it must not mutate global state or load models (factories do that,
lazily, when a backend is asked for).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

import pluggy

if TYPE_CHECKING:
    from sgl_engine.families import ModelFamily

    from sgl_plugins.backend import Backend

hookspec = pluggy.HookspecMarker("sgl_adapters")
hookimpl = pluggy.HookimplMarker("sgl_adapters")


class RegisterBackend(Protocol):
    def __call__(
        self,
        name: str,
        factory: Callable[..., Backend],
        capabilities: Iterable[str] = ...,
        *,
        description: str = ...,
    ) -> None: ...


class RegisterModelFamily(Protocol):
    def __call__(self, family: ModelFamily) -> None: ...


class RegisterChatTemplate(Protocol):
    def __call__(self, name: str, template: str, *, description: str = ...) -> None: ...


@hookspec
def register_backends(register: RegisterBackend) -> None:
    """Register backends: `register(name, factory, capabilities, description=...)`.

    `name` must be unique across plugins; `factory(**kwargs)` builds a `Backend` when
    `get_backend(name, **kwargs)` is called (it may load models; the hook itself must not);
    `capabilities` are names from `sgl_plugins.backend.CAPABILITIES` (others are allowed).
    A factory may own shared state (an engine pool); if it has `close()`, the manager calls it
    on `PluginManager.close()`. Mutates only the calling manager's registry, via `register`.
    """


@hookspec
def register_chat_templates(register: RegisterChatTemplate) -> None:
    """Register named Jinja chat templates: `register(name, template, description=...)`.

    `get_backend(..., chat_template=name)` replaces a registered name by its template before
    calling the factory, so any backend accepting `chat_template` can use it. Mutates only the
    calling manager's registry, through `register`.
    """


@hookspec
def register_model_families(register: RegisterModelFamily) -> None:
    """Register model families: `register(family)` with an `sgl_engine.families.ModelFamily`
    (its tool-call `ToolFormat`, optional `ReasoningFormat`, detection markers, tools prompt).

    Names are unique across plugins; detection tries higher `priority` first, so a plugin
    family can take precedence over a built-in one. The built-in families register through
    this hook too (plugin `families`). `PluginManager.model_families()` returns them as one
    `FamilyRegistry`, shared by the server, LangChain, DSPy and the DSL. Mutates only the
    calling manager's registry, through `register`.
    """
