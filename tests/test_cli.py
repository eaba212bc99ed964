"""The `sgl-adapters` command line: version, help on every flag, quiet on a closed pipe."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from sgl_adapters.cli import build_parser, main


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("sgl-adapters ")


def test_every_flag_of_every_command_has_help():
    parser = build_parser()
    missing = [
        f"{name} {'/'.join(action.option_strings)}"
        for name, sub in {"": parser, **_subparsers(parser)}.items()
        for action in sub._actions
        if action.option_strings and not action.help
    ]
    assert missing == []


def test_output_into_a_closed_pipe_exits_quietly():
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "sgl_adapters.cli", "plugins", "--json"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            env={**os.environ, "SGL_ADAPTERS_LOAD_PLUGINS": "0"},
        )
    finally:
        os.close(write)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode == 141
