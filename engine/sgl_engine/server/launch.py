"""Run the server: `serve(...)` (blocking, owns the engine), `ServerThread` (background, tests),
and the `serve` command-line arguments shared by `python -m sgl_engine.server` and the CLI."""

from __future__ import annotations

import argparse
import logging
import os
import threading
from typing import Any

from sgl_engine.config import DECODE_GEMV_KERNELS, TP_ALL_REDUCE_MODES
from sgl_engine.server.app import DEFAULT_MAX_BODY_BYTES, create_app, is_loopback

API_KEY_ENV = "SGL_ADAPTERS_API_KEY"
log = logging.getLogger(__name__)


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning `serve` logs at start when the API is reachable from other machines without
    a key (see docs/SECURITY.md), or None."""
    if api_key or is_loopback(host):
        return None
    return (
        f"serving on {host} without an API key: anyone who can reach this address can use "
        f"the model and flush its cache; set --api-key (or ${API_KEY_ENV}) or bind 127.0.0.1"
    )


class ServerThread:
    """uvicorn serving `app` in a background thread; `port=0` takes a free port.

    `stop()` is a graceful shutdown: the listener closes and in-flight responses (streams
    included) finish before it returns, up to `graceful_timeout` seconds.
    """

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        graceful_timeout: float = 30.0,
        log_level: str = "warning",
    ) -> None:
        import uvicorn

        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            timeout_graceful_shutdown=graceful_timeout,
            lifespan="off",
        )
        self.server = uvicorn.Server(config)
        self.host = host
        self.port = port
        self._thread = threading.Thread(target=self.server.run, name="sgl-http", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        for _ in range(int(timeout * 100)):
            if self.server.started:
                break
            if not self._thread.is_alive():
                raise RuntimeError(f"the server failed to start on {self.host}:{self.port}")
            threading.Event().wait(0.01)
        else:
            raise TimeoutError("the server did not start in time")
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 30000,
    *,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    served_model_name: str | None = None,
    allowed_hosts: tuple[str, ...] = (),
    graceful_timeout: float = 30.0,
    log_level: str = "info",
    families: Any = None,
    engine: Any = None,
    **engine_kwargs: Any,
) -> None:
    """Load `model` (None: the embedded SmolLM2) and serve it until SIGINT/SIGTERM; then stop
    accepting, let in-flight requests finish, and shut the engine down. `engine` (then owned
    and shut down here too) serves instead: any object with the engine's interface, such as
    the `ray` plugin's replicas behind `ReplicatedEngine`."""
    import uvicorn

    warning = exposure_warning(host, api_key)
    if warning:
        log.warning(warning)
    if engine is None:
        from sgl_engine import Engine

        engine = Engine(model, **engine_kwargs)
    try:
        app = create_app(
            engine, api_key, max_body_bytes, served_model_name, allowed_hosts, families
        )
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_level=log_level,
            timeout_graceful_shutdown=graceful_timeout,
        )
    finally:
        engine.shutdown()


ENGINE_ARGS = (
    "device",
    "dtype",
    "max_total_tokens",
    "max_running_requests",
    "attention_backend",
    "cuda_graph_max_bs",
    "mem_fraction_static",
    "chunked_prefill_size",
    "enable_mixed_chunk",
    "disable_radix_cache",
    "overlap_schedule",
    "cascade_attention",
    "tp_size",
    "tp_all_reduce",
    "decode_gemv",
)
"""The `EngineConfig` fields `serve` takes from the command line (flags with dashes)."""


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default=None, help="HF folder or id (default: embedded SmolLM2)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=30000, help="TCP port (default 30000)")
    parser.add_argument(
        "--api-key", default=None, help=f"require this Bearer key (default: ${API_KEY_ENV})"
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="reject request bodies larger than this with 413 (default %(default)s)",
    )
    parser.add_argument(
        "--served-model-name", default=None, help="the model name in /v1/models and responses"
    )
    parser.add_argument(
        "--allowed-hosts",
        default="",
        help="without an API key, Host names served besides loopback (comma-separated; * = any)",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument(
        "--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on CUDA)"
    )
    parser.add_argument(
        "--max-total-tokens", type=int, default=None, help="KV cache size in tokens"
    )
    parser.add_argument(
        "--max-running-requests", type=int, default=None, help="most requests in one batch"
    )
    parser.add_argument(
        "--attention-backend",
        choices=("auto", "torch", "flashinfer"),
        help="attention kernels (default auto: flashinfer on CUDA when installed)",
    )
    parser.add_argument("--cuda-graph-max-bs", type=int, default=None, help="0 turns graphs off")
    parser.add_argument(
        "--mem-fraction-static",
        type=float,
        default=None,
        help="fraction of GPU memory for weights and KV cache",
    )
    parser.add_argument(
        "--chunked-prefill-size",
        type=int,
        default=None,
        help="longest prefill chunk per forward pass, in tokens",
    )
    parser.add_argument(
        "--enable-mixed-chunk",
        action="store_true",
        default=None,
        help="add running requests' next tokens to each prefill chunk (default off)",
    )
    parser.add_argument(
        "--disable-radix-cache",
        action="store_true",
        default=None,
        help="do not reuse KV across requests (for comparisons)",
    )
    parser.add_argument(
        "--overlap-schedule",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="launch each decode step before reading the last one back (default: on CUDA)",
    )
    parser.add_argument(
        "--cascade-attention",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode graphs read a batch's shared prefix once for all rows "
        "(default: on for MHA models)",
    )
    parser.add_argument(
        "--tp",
        "--tp-size",
        dest="tp_size",
        type=int,
        default=None,
        help="tensor parallel over this many GPUs (or CPU processes), one process per rank",
    )
    parser.add_argument(
        "--tp-all-reduce",
        choices=TP_ALL_REDUCE_MODES,
        default=None,
        help="path of small all-reduces on GPUs: one-shot over peer memory, NCCL, or fused "
        "(one-shot, plus each all-reduce with its residual add and RMSNorm in one flashinfer "
        "kernel, built on a machine's first use), or push (fused, plus batch-1 products that "
        "push their partial sums to the peer; two Hopper GPUs, not --decode-gemv cublas) "
        "(default auto: one-shot when every rank can)",
    )
    parser.add_argument(
        "--decode-gemv",
        choices=DECODE_GEMV_KERNELS,
        default=None,
        help="kernel of batch-1 decode's linear layers on GPUs: cuBLAS, or a Triton "
        "matrix-vector kernel (faster on an H200; needed by --tp-all-reduce push) "
        "(default cublas; auto: Triton on Hopper and later in bf16/fp16)",
    )
    parser.add_argument(
        "--graceful-timeout",
        type=float,
        default=30.0,
        help="seconds to let running requests finish on shutdown (default %(default)s)",
    )
    parser.add_argument(
        "--log-level", default="info", help="uvicorn log level (default %(default)s)"
    )
    return parser


def engine_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The engine config fields given on the command line."""
    return {key: getattr(args, key) for key in ENGINE_ARGS if getattr(args, key) is not None}


def serve_from_args(args: argparse.Namespace, families: Any = None, engine: Any = None) -> None:
    """`serve` with parsed flags; `families` as `create_app` takes them; `engine` (owned)
    replaces the one the flags would load."""
    engine_kwargs = {"engine": engine} if engine is not None else engine_kwargs_from_args(args)
    serve(
        args.model,
        args.host,
        args.port,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_body_bytes=args.max_body_bytes,
        served_model_name=args.served_model_name,
        allowed_hosts=tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip()),
        graceful_timeout=args.graceful_timeout,
        log_level=args.log_level,
        families=families,
        **engine_kwargs,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="sgl-adapters serve", description="OpenAI-compatible and SGLang-native HTTP server"
    )
    serve_from_args(add_serve_arguments(parser).parse_args(argv))
