"""Print the versions a tox env actually has and fail unless they are the ones it claims.

    python requirements/verify.py LOCKFILE [NAME==VERSION ...]

Every `name==version` pin of LOCKFILE must be installed at exactly that version (a local label
such as `+cpu` is ignored), and so must each claim given on the command line: the matrix env
says what it tests (`langchain-core==1.7.0`), and this makes a resolver that upgraded or
downgraded something underneath it a red env instead of a green one testing something else.
Without LOCKFILE (`-`), only the claims are checked (the `latest` env floats).
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

SHOWN = ("torch", "transformers", "xgrammar", "langchain-core", "dspy", "pydantic", "openai")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def public(version: str) -> str:
    return version.split("+", 1)[0]


def read_pins(path: str) -> dict[str, str]:
    pins: dict[str, str] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            match = _PIN.match(line.strip())
            if match:
                pins[normalise(match.group(1))] = public(match.group(2))
    return pins


def installed(name: str) -> str | None:
    try:
        return public(metadata.version(name))
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    lock, claims = argv[0], argv[1:]
    want = {} if lock == "-" else read_pins(lock)
    for claim in claims:
        name, _, version = claim.partition("==")
        want[normalise(name)] = public(version)
    shown = dict.fromkeys([*map(normalise, SHOWN), *(normalise(c.split("==")[0]) for c in claims)])
    print("versions under test: " + ", ".join(f"{n} {installed(n)}" for n in shown))
    wrong = [
        f"{name}: want {version}, have {installed(name)}"
        for name, version in sorted(want.items())
        if installed(name) != version
    ]
    for line in wrong:
        print(f"version mismatch: {line}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
