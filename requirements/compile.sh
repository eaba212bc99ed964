#!/usr/bin/env bash
# Regenerates the lock files that tox (and so .ci/run) installs from: requirements/<lock>.txt,
# each the complete resolution of pyproject.toml's dependencies and test extras with that
# lock's pins. Run it after changing a dependency in pyproject.toml, commit what it writes.
#
# pip-tools (pip-compile), not uv: the lock must resolve and install with plain pip, which is
# what tox and a new user run, and which honours the machine's pip configuration (local wheel
# folders, the CPU build of torch); a uv lock would need uv at install time too.
#
# Two locks: `py311`, the newest release of everything in range (torch excepted: pinned to the
# CPU build the test machines carry), and `oldest`, the oldest end of each tested range at once.
# Together they test every range at both ends; the matrix envs in tox.ini use one or the other.
# `--oldest-only` re-resolves only the oldest lock (after moving a lower bound).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=(--extra test)
PIPC=(pip-compile -q --strip-extras --no-header --no-annotate --no-emit-index-url
      --no-emit-find-links --no-emit-trusted-host --allow-unsafe "${EXTRAS[@]}")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

lock() {  # lock NAME PIN...: requirements/NAME.txt, the resolution under PIN...
  local name=$1; shift
  printf '%s\n' torch==2.13.0 "$@" > "$tmp/$name.in"
  rm -f "requirements/$name.txt"
  "${PIPC[@]}" -o "requirements/$name.txt" pyproject.toml "$tmp/$name.in"
  sed -i -E 's/^(torch==[0-9.]+)\+cpu$/\1/' "requirements/$name.txt"
  echo "requirements/$name.txt: $(grep -c '==' "requirements/$name.txt") pins"
}

[ "${1:-}" = --oldest-only ] || lock py311
lock oldest langchain-core==1.7.0 dspy==3.3.1 xgrammar==0.2.8 transformers==5.18.0
