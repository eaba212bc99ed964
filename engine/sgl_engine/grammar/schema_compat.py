"""JSON-schema rewrites that work around xgrammar bugs; the request's schema is not changed.

xgrammar <= 0.2.8 lowers a string with `minLength`/`maxLength` (and no `pattern`) to a bare
character class that admits raw U+0000..U+001F, so outputs can fail strict JSON parsing
(xgrammar issue #800). Its `pattern` path is JSON-string aware, so such strings are rewritten
to the equivalent `pattern: ^[\\s\\S]{min,max}$` (length counted in decoded characters).
"""

from __future__ import annotations

import json
from typing import Any

_VALUE_KEYS = frozenset({"const", "enum", "default", "examples"})


def compat_schema_text(schema_text: str) -> str:
    """The schema as xgrammar should see it (the same text if nothing needs rewriting)."""
    schema = json.loads(schema_text)
    patched = _patch(schema)
    return schema_text if patched == schema else json.dumps(patched, ensure_ascii=False)


def _patch(node: Any) -> Any:
    if isinstance(node, list):
        return [_patch(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: (v if k in _VALUE_KEYS else _patch(v)) for k, v in node.items()}
    if _is_length_bounded_string(out):
        low = out.pop("minLength", 0)
        high = out.pop("maxLength", "")
        out["pattern"] = f"^[\\s\\S]{{{low},{high}}}$"
    return out


def _is_length_bounded_string(node: dict) -> bool:
    kind = node.get("type")
    is_string = kind == "string" or (isinstance(kind, list) and "string" in kind)
    bounded = "minLength" in node or "maxLength" in node
    return is_string and bounded and "pattern" not in node and "format" not in node
