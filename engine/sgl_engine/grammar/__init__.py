"""Constrained decoding: constraints, an off-thread grammar compiler with a cache, per-request
matchers that fill token bitmasks, and jump-forward of forced text (xgrammar backend)."""

from __future__ import annotations

from sgl_engine.grammar.constraint import Constraint, GrammarError
from sgl_engine.grammar.jump_forward import JumpForward, jump_forward, jump_forward_tokens
from sgl_engine.grammar.xgrammar_backend import (
    CompiledGrammar,
    GrammarCompiler,
    GrammarConfig,
    GrammarMatcher,
    allocate_bitmask,
    apply_bitmask,
    bitmask_to_bool,
)

__all__ = [
    "CompiledGrammar",
    "Constraint",
    "GrammarCompiler",
    "GrammarConfig",
    "GrammarError",
    "GrammarMatcher",
    "JumpForward",
    "allocate_bitmask",
    "apply_bitmask",
    "bitmask_to_bool",
    "jump_forward",
    "jump_forward_tokens",
]
