"""`sgl-adapters`: a small dispatcher of subcommands.

Each subcommand is one `add_<name>_command(subparsers)` function that adds its parser and sets
`func` (taking the parsed args, returning an exit code); `COMMANDS` lists them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict


def add_plugins_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plugins",
        help="list installed plugins and where they came from",
        description="List loaded sgl-adapters plugins (name, version, distribution, module, "
        "backends) and plugins that failed to load. Exit status 1 when any failed.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run_plugins)


def run_plugins(args: argparse.Namespace) -> int:
    from sgl_plugins.manager import PluginLoadWarning, get_plugin_manager

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginLoadWarning)  # printed below as errors
        manager = get_plugin_manager()
    plugins, errors = manager.list_plugins(), manager.errors
    if args.json:
        print(
            json.dumps(
                {
                    "plugins": [asdict(p) for p in plugins],
                    "errors": [asdict(e) for e in errors],
                },
                indent=2,
            )
        )
        return 1 if errors else 0
    rows = [("NAME", "VERSION", "DISTRIBUTION", "MODULE", "BACKENDS", "CHAT TEMPLATES", "FAMILIES")]
    for p in plugins:
        rows.append(
            (
                p.name + (" (built-in)" if p.builtin else ""),
                p.version or "-",
                p.distribution or "-",
                p.module,
                ",".join(p.backends) or "-",
                ",".join(p.chat_templates) or "-",
                ",".join(p.model_families) or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if errors else 0


def add_serve_command(subparsers: argparse._SubParsersAction) -> None:
    from sgl_engine.server.launch import add_serve_arguments

    parser = subparsers.add_parser(
        "serve",
        help="serve a model over HTTP (OpenAI-compatible API and SGLang's /generate)",
        description="Serve a model with the OpenAI-compatible API and SGLang's native API. "
        "Binds 127.0.0.1 unless --host says otherwise.",
    )
    add_serve_arguments(parser)
    parser.add_argument(
        "--dp",
        type=int,
        default=1,
        help="data parallel: this many engine replicas as Ray actors behind one cache- and "
        "graph-aware router (needs the 'ray' extra)",
    )
    parser.add_argument(
        "--router-policy",
        default="graph_aware",
        choices=("graph_aware", "cache_aware", "least_loaded", "round_robin"),
        help="how --dp routes requests (default graph_aware)",
    )
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        help="how often Ray restarts a --dp replica that died (0: never; default 3)",
    )
    parser.add_argument(
        "--call-timeout",
        type=float,
        default=None,
        help="seconds a --dp replica may take for one request before it counts as hung "
        "(killed, restarted, the request re-sent); default: no deadline",
    )
    parser.add_argument(
        "--health-interval",
        type=float,
        default=10.0,
        help="seconds between health checks of every --dp replica's engine (a dead one is "
        "taken out and restarted without waiting for traffic; 0: no checks; default 10)",
    )
    parser.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from sgl_engine.server.launch import engine_kwargs_from_args, serve_from_args
    from sgl_plugins.manager import get_plugin_manager

    if args.dp < 1:
        raise SystemExit("--dp must be >= 1")
    engine = None
    if args.dp > 1:
        from sgl_plugins.builtin.ray import RayBackend, ReplicatedEngine

        backend = RayBackend(
            args.model,
            replicas=args.dp,
            engine_kwargs=engine_kwargs_from_args(args),
            policy=args.router_policy,
            max_restarts=args.max_restarts,
            call_timeout_s=args.call_timeout,
            health_interval_s=args.health_interval,
        )
        engine = ReplicatedEngine(backend, owns_backend=True)
    serve_from_args(args, families=get_plugin_manager().model_families(), engine=engine)
    return 0


def add_demo_command(subparsers: argparse._SubParsersAction) -> None:
    from sgl_adapters.demo import add_demo_command as add

    add(subparsers)


COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    add_demo_command,
    add_plugins_command,
    add_serve_command,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sgl-adapters",
        description="SGLang-style engine and structured generation behind LangChain, DSPy "
        "and SGLang programs.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sgl-adapters")
    except PackageNotFoundError:
        return "(not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        # The reader went away (`sgl-adapters plugins --json | head`): stop quietly. Point
        # stdout at devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
