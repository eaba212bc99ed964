"""JSON-schema helpers shared by the front doors."""

from __future__ import annotations

from typing import Any


def cap_strings(schema: Any, limit: int | None) -> Any:
    """A copy of a JSON schema with `maxLength: limit` on every string schema that has no
    length, enum, const, pattern or format of its own (None: unchanged)."""
    if limit is None:
        return schema
    if isinstance(schema, list):
        return [cap_strings(s, limit) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: cap_strings(v, limit) for k, v in schema.items()}
    own = {"maxLength", "enum", "const", "pattern", "format"}
    if schema.get("type") == "string" and not own & set(schema):
        out["maxLength"] = limit
    return out
