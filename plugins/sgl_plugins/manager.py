"""The plugin manager: loads plugins, keeps their registrations, hands out backends.

Loading is explicit and idempotent (`PluginManager.load()`); constructing a manager loads
nothing, so tests build their own and register in-test plugin objects with `register()`.
`get_plugin_manager()` is the per-process loaded manager the front doors use.

Environment (read by `load()`):
  SGL_ADAPTERS_PLUGINS=local,foo  only the named plugins load, built-ins included (set but
                                  empty: none load)
  SGL_ADAPTERS_LOAD_PLUGINS=0     only built-ins load; entry points are not scanned

A plugin that fails (import error, a hook raising, a bad or duplicate registration, an unknown
hook) is rejected as a whole: the failure names the plugin and its entry point, is appended to
`errors` and warned as `PluginLoadWarning`; the other plugins keep working.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pluggy

from sgl_plugins import hookspecs
from sgl_plugins.backend import Backend

ENTRY_POINT_GROUP = "sgl_adapters"
ENV_ALLOWLIST = "SGL_ADAPTERS_PLUGINS"
ENV_LOAD_PLUGINS = "SGL_ADAPTERS_LOAD_PLUGINS"
DEFAULT_BACKEND = "local"
BUILTIN_PLUGINS: tuple[tuple[str, str], ...] = (
    ("local", "sgl_plugins.builtin.local"),
    ("http", "sgl_plugins.builtin.http"),
    ("openai", "sgl_plugins.builtin.openai_compat"),
    ("ray", "sgl_plugins.builtin.ray"),
    ("families", "sgl_plugins.builtin.families"),
)
HOOKS = ("register_backends", "register_chat_templates", "register_model_families")
BACKEND_MEMBERS = (
    "name",
    "capabilities",
    "tokenizer",
    "apply_chat_template",
    "run_graph",
    "arun_graph",
    "generate",
    "stream",
    "astream",
    "score",
    "metrics",
    "close",
)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


class PluginLoadWarning(UserWarning):
    """A plugin failed to load; see `PluginManager.errors`."""


class UnknownBackendError(LookupError):
    """No loaded plugin registered the requested backend name."""


@dataclass(frozen=True)
class BackendSpec:
    name: str
    factory: Callable[..., Backend]
    capabilities: frozenset[str]
    plugin: str
    description: str = ""


@dataclass(frozen=True)
class ChatTemplateSpec:
    name: str
    template: str
    plugin: str
    description: str = ""


@dataclass(frozen=True)
class PluginInfo:
    """Where a loaded plugin came from and what it registered (for `sgl-adapters plugins`)."""

    name: str
    module: str
    version: str | None
    distribution: str | None
    entry_point: str | None
    builtin: bool
    backends: tuple[str, ...] = ()
    chat_templates: tuple[str, ...] = ()
    model_families: tuple[str, ...] = ()


@dataclass(frozen=True)
class PluginFailure:
    plugin: str
    entry_point: str | None
    message: str

    def __str__(self) -> str:
        where = f" (entry point {self.entry_point})" if self.entry_point else ""
        return f"sgl-adapters plugin {self.plugin!r}{where} failed to load: {self.message}"


@dataclass
class _Origin:
    entry_point: str | None = None
    distribution: str | None = None
    version: str | None = None
    builtin: bool = False


@dataclass
class _Registrations:
    backends: dict[str, BackendSpec] = field(default_factory=dict)
    templates: dict[str, ChatTemplateSpec] = field(default_factory=dict)
    families: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


class PluginManager:
    """Registry of plugins, backends and chat templates; all mutation happens under one lock
    (`register`, `load`, `close`), reads take a snapshot under it."""

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        entry_points: Callable[[], Iterable[Any]] | None = None,
        builtins: Sequence[tuple[str, str]] = BUILTIN_PLUGINS,
    ) -> None:
        self.hooks = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self.hooks.add_hookspecs(hookspecs)
        self.errors: list[PluginFailure] = []
        self._env = dict(os.environ if env is None else env)
        self._entry_points = entry_points or _installed_entry_points
        self._builtins = tuple(builtins)
        self._backends: dict[str, BackendSpec] = {}
        self._templates: dict[str, ChatTemplateSpec] = {}
        self._families: dict[str, Any] = {}
        self._family_plugins: dict[str, str] = {}
        self._info: dict[str, PluginInfo] = {}
        self._lock = threading.RLock()
        self._loaded = False

    # -- loading ----------------------------------------------------------------------------

    def load(self) -> PluginManager:
        """Load the built-ins and the entry-point group once (later calls do nothing)."""
        with self._lock:
            if self._loaded:
                return self
            self._loaded = True
            allow = self._allowlist()
            seen = set()
            for name, module in self._builtins:
                seen.add(name)
                if allow is None or name in allow:
                    self._load_builtin(name, module)
            if self._env.get(ENV_LOAD_PLUGINS, "1").strip().lower() in ("0", "false", "no"):
                return self
            for ep in self._unique_entry_points():
                seen.add(ep.name)
                if allow is None or ep.name in allow:
                    self._load_entry_point(ep)
            for name in sorted((allow or set()) - seen):
                self._fail(name, None, f"listed in {ENV_ALLOWLIST} but not installed")
            return self

    def register(
        self,
        plugin: object,
        name: str | None = None,
        *,
        entry_point: str | None = None,
        distribution: str | None = None,
        version: str | None = None,
        builtin: bool = False,
    ) -> bool:
        """Register a plugin object (a module or any object with `@hookimpl` methods) and
        record what its hooks register. All-or-nothing: on failure nothing of it stays, the
        failure is recorded and warned, and False is returned."""
        origin = _Origin(entry_point, distribution, version, builtin)
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        with self._lock:
            if self.hooks.is_registered(plugin):
                return self._merge_origin(plugin, origin)
            try:
                self.hooks.register(plugin, name=name)
            except Exception as exc:  # pluggy validation errors, name clashes
                self._fail(name, entry_point, f"cannot be registered: {exc}")
                return False
            try:
                regs = self._collect(plugin, name)
            except Exception as exc:
                self.hooks.unregister(plugin)
                self._fail(name, entry_point, f"{type(exc).__name__}: {exc}")
                return False
            self._backends.update(regs.backends)
            self._templates.update(regs.templates)
            self._families.update(regs.families)
            self._family_plugins.update(dict.fromkeys(regs.families, name))
            self._info[name] = PluginInfo(
                name=name,
                module=_module_name(plugin),
                version=origin.version,
                distribution=origin.distribution,
                entry_point=origin.entry_point,
                builtin=builtin,
                backends=tuple(regs.backends),
                chat_templates=tuple(regs.templates),
                model_families=tuple(regs.families),
            )
            return True

    # -- using ------------------------------------------------------------------------------

    def backends(self) -> dict[str, BackendSpec]:
        with self._lock:
            return dict(self._backends)

    def chat_templates(self) -> dict[str, ChatTemplateSpec]:
        with self._lock:
            return dict(self._templates)

    def model_families(self) -> Any:
        """A new `sgl_engine.families.FamilyRegistry` of the registered families (the
        built-in ones are always there, even when the allowlist leaves plugin `families` out)."""
        from sgl_engine.families import BUILTIN_FAMILIES, FamilyRegistry

        with self._lock:
            families = list(self._families.values())
        registry = FamilyRegistry(families)
        for family in BUILTIN_FAMILIES:
            if family.name not in registry.names():
                registry.register(family)
        return registry

    def list_plugins(self) -> list[PluginInfo]:
        """Loaded plugins, built-ins first, then by name."""
        with self._lock:
            return sorted(self._info.values(), key=lambda p: (not p.builtin, p.name))

    def get_backend(self, name: str | None = None, **kwargs: Any) -> Backend:
        """Build backend `name` (default "local") with `factory(**kwargs)`.

        A registered chat template name given as `chat_template=` is replaced by its text.
        Raises UnknownBackendError (naming the available backends and failed plugins) or
        TypeError when the factory's result is not a Backend.
        """
        name = name or DEFAULT_BACKEND
        with self._lock:
            spec = self._backends.get(name)
            template = self._templates.get(kwargs.get("chat_template") or "")
        if spec is None:
            raise UnknownBackendError(self._unknown_message(name))
        if template is not None:
            kwargs["chat_template"] = template.template
        try:
            backend = spec.factory(**kwargs)
        except Exception as exc:
            exc.add_note(f"while building backend {name!r} of sgl-adapters plugin {spec.plugin!r}")
            raise
        missing = [m for m in BACKEND_MEMBERS if not hasattr(backend, m)]
        if missing:
            raise TypeError(
                f"backend {name!r} of plugin {spec.plugin!r}: the factory returned a "
                f"{type(backend).__name__}, which lacks Backend members {', '.join(missing)}"
            )
        return backend

    def close(self) -> None:
        """Call `close()` on registered factories that have one (engine pools); idempotent."""
        with self._lock:
            specs = list(self._backends.values())
        for spec in specs:
            if inspect.isclass(spec.factory):
                continue  # a backend class: its `close` belongs to the instances it makes
            close = getattr(spec.factory, "close", None)
            if callable(close):
                close()

    # -- internals --------------------------------------------------------------------------

    def _allowlist(self) -> set[str] | None:
        raw = self._env.get(ENV_ALLOWLIST)
        if raw is None:
            return None
        return {part.strip() for part in raw.split(",") if part.strip()}

    def _unique_entry_points(self) -> list[Any]:
        unique: dict[tuple[str, str], Any] = {}
        for ep in self._entry_points():
            unique.setdefault((ep.name, ep.value), ep)
        return sorted(unique.values(), key=lambda ep: (ep.name, ep.value))

    def _load_builtin(self, name: str, module: str) -> None:
        dist, version = "sgl-adapters", _installed_version("sgl-adapters")
        try:
            plugin = importlib.import_module(module)
        except Exception as exc:
            self._fail(name, None, f"cannot import built-in {module}: {exc!r}")
            return
        self.register(plugin, name, distribution=dist, version=version, builtin=True)

    def _load_entry_point(self, ep: Any) -> None:
        dist = getattr(ep, "dist", None)
        dist_name = getattr(dist, "name", None)
        version = getattr(dist, "version", None)
        where = f"{ep.name} = {ep.value}" + (f" from {dist_name} {version}" if dist_name else "")
        try:
            plugin = ep.load()
        except Exception as exc:
            self._fail(ep.name, where, f"import failed: {exc!r}")
            return
        self.register(plugin, ep.name, entry_point=where, distribution=dist_name, version=version)

    def _merge_origin(self, plugin: object, origin: _Origin) -> bool:
        """A built-in also found as an entry point: keep one registration, note its origin."""
        name = self.hooks.get_name(plugin)
        info = self._info.get(name)
        if info is not None and origin.entry_point:
            self._info[name] = PluginInfo(
                **{
                    **info.__dict__,
                    "entry_point": origin.entry_point,
                    "distribution": origin.distribution or info.distribution,
                    "version": origin.version or info.version,
                }
            )
        return True

    def _collect(self, plugin: object, name: str) -> _Registrations:
        """Call `plugin`'s hooks alone with validating callbacks; raise on any problem."""
        unknown = [hc.name for hc in self.hooks.get_hookcallers(plugin) or [] if hc.spec is None]
        if unknown:
            raise ValueError(f"implements unknown hook(s) {', '.join(unknown)}; known: {HOOKS}")
        if not self.hooks.get_hookcallers(plugin):
            raise ValueError(f"implements no sgl_adapters hook (known: {', '.join(HOOKS)})")
        regs = _Registrations()
        others = [p for p in self.hooks.get_plugins() if p is not plugin]
        callbacks = {
            "register_backends": functools.partial(self._register_backend, regs, name),
            "register_chat_templates": functools.partial(self._register_template, regs, name),
            "register_model_families": functools.partial(self._register_family, regs, name),
        }
        for hook, callback in callbacks.items():
            self.hooks.subset_hook_caller(hook, others)(register=callback)
        if regs.problems:
            raise ValueError("; ".join(regs.problems))
        return regs

    def _register_backend(
        self,
        regs: _Registrations,
        plugin: str,
        name: str,
        factory: Callable[..., Backend],
        capabilities: Iterable[str] = ("generate",),
        *,
        description: str = "",
    ) -> None:
        problem = self._check_name("backend", name, self._backends, regs.backends)
        if problem is None and not callable(factory):
            problem = f"backend {name!r}: factory {factory!r} is not callable"
        if problem is None and (
            isinstance(capabilities, str) or not all(isinstance(c, str) for c in capabilities)
        ):
            problem = f"backend {name!r}: capabilities must be an iterable of names"
        if problem is not None:
            regs.problems.append(problem)
            raise ValueError(problem)
        regs.backends[name] = BackendSpec(
            name, factory, frozenset(capabilities), plugin, description
        )

    def _register_template(
        self,
        regs: _Registrations,
        plugin: str,
        name: str,
        template: str,
        *,
        description: str = "",
    ) -> None:
        problem = self._check_name("chat template", name, self._templates, regs.templates)
        if problem is None and (not isinstance(template, str) or not template):
            problem = f"chat template {name!r}: template must be a non-empty string"
        if problem is not None:
            regs.problems.append(problem)
            raise ValueError(problem)
        regs.templates[name] = ChatTemplateSpec(name, template, plugin, description)

    def _register_family(self, regs: _Registrations, plugin: str, family: Any) -> None:
        from sgl_engine.families import ModelFamily

        name = getattr(family, "name", None)
        problem = None
        if not isinstance(family, ModelFamily):
            problem = f"model family {family!r} is not an sgl_engine.families.ModelFamily"
        elif name in self._families:
            owner = self._family_plugins.get(name)
            problem = f"model family {name!r} is already registered by plugin {owner!r}"
        elif name in regs.families:
            problem = f"model family {name!r} is registered twice"
        if problem is not None:
            regs.problems.append(problem)
            raise ValueError(problem)
        regs.families[name] = family

    @staticmethod
    def _check_name(kind: str, name: Any, existing: Mapping, pending: Mapping) -> str | None:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            return f"{kind} name {name!r} is not a valid name"
        if name in existing:
            return f"{kind} {name!r} is already registered by plugin {existing[name].plugin!r}"
        if name in pending:
            return f"{kind} {name!r} is registered twice"
        return None

    def _fail(self, plugin: str, entry_point: str | None, message: str) -> None:
        failure = PluginFailure(plugin, entry_point, message)
        self.errors.append(failure)
        warnings.warn(str(failure), PluginLoadWarning, stacklevel=3)

    def _unknown_message(self, name: str) -> str:
        available = ", ".join(sorted(self.backends())) or "none"
        msg = f"no sgl-adapters backend named {name!r} (available: {available})"
        if self.errors:
            msg += "; plugins that failed to load: " + "; ".join(str(e) for e in self.errors)
        return msg


def _installed_entry_points() -> Iterable[Any]:
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


def _installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _module_name(plugin: object) -> str:
    if isinstance(getattr(plugin, "__name__", None), str) and hasattr(plugin, "__file__"):
        return plugin.__name__
    return f"{type(plugin).__module__}.{type(plugin).__qualname__}"


@functools.cache
def get_plugin_manager() -> PluginManager:
    """The process-wide manager, loaded on first use with the environment of that moment."""
    return PluginManager().load()


def get_backend(name: str | None = None, **kwargs: Any) -> Backend:
    """`get_plugin_manager().get_backend(name, **kwargs)`."""
    return get_plugin_manager().get_backend(name, **kwargs)
