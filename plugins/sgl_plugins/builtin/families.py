"""The built-in model families (`sgl_engine.families.BUILTIN_FAMILIES`), registered through
the same hook as third-party families."""

from __future__ import annotations

from sgl_engine.families import BUILTIN_FAMILIES

from sgl_plugins.hookspecs import RegisterModelFamily, hookimpl


@hookimpl
def register_model_families(register: RegisterModelFamily) -> None:
    for family in BUILTIN_FAMILIES:
        register(family)
