"""docs/SGLANG_COMPAT.md: every row names tests, and every named test exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "SGLANG_COMPAT.md"
STATUSES = {"supported", "supported, with a note", "refused", "refused (AttributeError)"}


def _rows() -> list[list[str]]:
    rows = []
    for line in TABLE.read_text().splitlines():
        if not line.startswith("| ") or line.startswith("| SGLang name"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        rows.append(cells)
    return rows


def test_every_row_has_a_status_and_existing_tests():
    rows = _rows()
    assert len(rows) >= 40
    missing = []
    for name, status, _note, tests in rows:
        assert status in STATUSES, (name, status)
        refs = [t.strip() for t in tests.split(",") if t.strip()]
        assert refs, f"row {name!r} names no test"
        for ref in refs:
            path, _, test = ref.partition("::")
            source = ROOT / path
            if not source.exists() or not re.search(
                rf"def {re.escape(test)}\(", source.read_text()
            ):
                missing.append(ref)
    assert missing == []
