"""`ProcessEngine`: an `Engine` whose scheduler and model run in a child process.

Tensor-parallel engines run this way, as SGLang's do. The caller's process keeps the front: the
tokenizer, request validation and the callers' channels. It never joins a process group and never
touches a GPU. A spawned child (`engine_core.core_main`) runs a plain in-process `Engine`: the
scheduler, the radix cache and rank 0, which starts the follower ranks.

A rank that dies can leave a kernel spinning on rank 0's GPU, or an NCCL communicator whose abort
never returns (docs/TENSOR_PARALLEL.md, "Failure"). That now poisons only the child, which is
stopped and exits; the caller's process can start another engine and exits normally.

Wire protocol (one duplex pipe, pickled tuples):
  front -> child: ("submit", [Req]), ("abort", rid), ("call", cid, fn, args), ("stop",)
  child -> front: ("ready", info) | ("failed", exc), ("out", rid, chunk), ("done", rid),
                  ("reply", cid, ok, value), ("stopped",)
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from sgl_engine.engine import _DONE, Engine, _Channel
from sgl_engine.errors import EngineUnavailableError
from sgl_engine.inputs import RequestBuilder
from sgl_engine.request import Req

log = logging.getLogger(__name__)

START_S = 600.0  # loading a large model on every rank takes minutes
HEALTH_S = 20.0  # the child answers a health call at once unless its process is stuck
STOP_S = 150.0  # the child's own shutdown is bounded (scheduler join, TP teardown, followers)
KILL_S = 10.0


@dataclass(frozen=True)
class CoreSpec:
    """What the child needs to build its in-process engine."""

    model_path: str | None
    random_weights: bool
    kwargs: dict
    log_level: int = logging.WARNING


@dataclass(frozen=True)
class PendingGrammar:
    """A request's constraint, to be compiled by the child's grammar compiler (a compiled
    grammar's future cannot cross the pipe)."""

    constraint: Any


class DeferredGrammar:
    """The front's stand-in for `GrammarCompiler`: the builder's `submit` hands the constraint
    over instead of compiling it here."""

    def submit(self, constraint: Any) -> PendingGrammar:
        return PendingGrammar(constraint)

    def shutdown(self) -> None:
        pass


@dataclass
class _Live:
    """A submitted request as the front knows it: its channel and the last chunk it got."""

    req: Req
    channel: _Channel
    last: dict | None = field(default=None)


class ProcessEngine(Engine):
    """`Engine`'s API over a child process (see the module docstring). `Engine(...,
    tp_size=N)` with N > 1 builds one. Thread-safe like `Engine`: sends are serialised by a
    lock, and one reader thread delivers the child's outputs to the callers' channels.

    If the child dies, every request in flight finishes with an abort naming it, later ones
    finish so at once, and `metrics`, `flush_cache`, `check_invariants` and `inspect` raise
    `EngineUnavailableError`, and `health()` returns the message; the engine then only needs
    `shutdown()`.
    """

    def __init__(
        self, model_path: str | None = None, *, random_weights: bool = False, **kwargs: Any
    ) -> None:
        from sgl_engine.models.model_config import ModelConfig

        path = self._load_front(model_path, random_weights, kwargs)
        ModelConfig.from_hf(self.hf_config).shard(self.config.tp_size)  # fail before spawning
        self.runner = self.scheduler = self.processor = None
        self._send_lock = threading.Lock()
        self._chan_lock = threading.Lock()
        self._channels: dict[str, _Live] = {}
        self._calls: dict[int, Future] = {}
        self._ids = itertools.count()
        self._stopping = False
        self.failure: str | None = None
        self._reader = threading.Thread(target=self._read, name="sgl-engine-reader", daemon=True)
        spec = CoreSpec(path, random_weights, kwargs, logging.getLogger().getEffectiveLevel())
        self.info = self._start(spec)
        self.grammar = DeferredGrammar() if self.info["grammar"] else None
        self.builder = RequestBuilder(
            self.tokenizer,
            self.info["vocab_size"],
            self.context_length,
            self.info["num_slots"],
            self.grammar,
            self.config.max_top_logprobs,
        )
        self._reader.start()

    # ---- the child process -----------------------------------------------------------------
    def _start(self, spec: CoreSpec) -> dict:
        """Spawn the child and wait until its engine is built; re-raise its error if it fails."""
        from sgl_engine.engine_core import core_main

        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        # not a daemon: the child starts the follower ranks as its own children
        self.proc = ctx.Process(
            target=core_main, args=(child_conn, spec), name="sgl-engine-core", daemon=False
        )
        self.proc.start()
        child_conn.close()
        # Without `shutdown()`, multiprocessing would wait at exit for the non-daemon child
        # forever; registered after its own exit hook, this one runs first.
        atexit.register(self.shutdown)
        try:
            return self._ready()
        except BaseException:
            self._kill()
            atexit.unregister(self.shutdown)
            raise

    def _ready(self) -> dict:
        """Wait for the child's engine to be built: its info, or its start-up error raised."""
        if not self._conn.poll(START_S):
            raise EngineUnavailableError(f"the engine process did not start in {START_S} s")
        try:
            msg = self._conn.recv()
        except (EOFError, OSError) as exc:
            self.proc.join(KILL_S)
            raise EngineUnavailableError(
                f"the engine process (pid {self.proc.pid}) {_describe(self.proc)} while starting"
            ) from exc
        if msg[0] == "failed":
            self.proc.join(STOP_S)
            raise msg[1]
        return msg[1]

    @property
    def pids(self) -> list[int]:
        """The child's pid, then the follower ranks' pids."""
        return list(self.info["pids"])

    def _send(self, msg: tuple) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def _read(self) -> None:
        """The reader thread: deliver the child's outputs until it stops or dies."""
        kind = None
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = msg[0]
            if kind == "out":
                self._out(msg[1], msg[2])
            elif kind == "done":
                self._done(msg[1])
            elif kind == "reply":
                self._reply(*msg[1:])
            elif kind == "stopped":
                break
        if not self._stopping:  # it died, or stopped without being asked
            self.proc.join(1.0)
            how = _describe(self.proc) if kind != "stopped" else "stopped unasked"
            self._fail(
                f"the engine process (pid {self.proc.pid}) {how}; this engine cannot serve any "
                "more requests, shut it down"
            )

    def _out(self, rid: str, chunk: dict) -> None:
        live = self._channels.get(rid)
        if live is not None:
            live.last = chunk
            live.channel.put(chunk)

    def _done(self, rid: str) -> None:
        with self._chan_lock:
            live = self._channels.pop(rid, None)
        if live is not None:
            live.channel.put(_DONE)

    def _reply(self, cid: int, ok: bool, value: Any) -> None:
        fut = self._calls.pop(cid, None)
        if fut is not None:
            (fut.set_result if ok else fut.set_exception)(value)

    def _fail(self, message: str) -> None:
        """Finish every request in flight with an abort carrying `message`; fail every call."""
        log.error("%s", message)
        with self._chan_lock:
            self.failure = message
            lives, self._channels = list(self._channels.values()), {}
        for live in lives:
            _finish(live, message)
        for cid in list(self._calls):
            fut = self._calls.pop(cid, None)
            if fut is not None:
                fut.set_exception(EngineUnavailableError(message))

    # ---- Engine's API --------------------------------------------------------------------------
    def _submit(self, reqs: list[Req], loop: Any) -> list[_Channel]:
        lives = self._register(reqs, lambda req: _Live(req, _Channel(loop)))
        with self._chan_lock:
            failure = self.failure
        if failure is None:
            try:
                self._send(("submit", reqs))
            except (OSError, ValueError):
                failure = self.failure or "the engine process is gone"
        if failure is not None:
            for req in reqs:
                self._done_with(req.rid, failure)
        return [live.channel for live in lives]

    def _done_with(self, rid: str, message: str) -> None:
        with self._chan_lock:
            live = self._channels.pop(rid, None)
        if live is not None:
            _finish(live, message)

    def _abort_live(self, reqs: list[Req], channels: list[_Channel]) -> None:
        for req, ch in zip(reqs, channels, strict=True):
            live = self._channels.get(req.rid)
            if live is not None and live.channel is ch:
                self.abort(req.rid)

    def abort(self, rid: str) -> None:
        """Abort a queued or running request; its caller gets finish_reason 'abort'."""
        if self._stopping:
            raise RuntimeError("the engine has been shut down")
        if self.failure is None:
            with contextlib.suppress(OSError, ValueError):  # the reader fails it if the child died
                self._send(("abort", rid))

    def _remote(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
        """`fn(child's engine, *args)` in a thread of its own in the child; its result. Raises
        `EngineUnavailableError` if the child is gone, `TimeoutError` after `timeout` s."""
        if self._stopping:
            raise RuntimeError("the engine has been shut down")
        cid = next(self._ids)
        fut: Future = Future()
        self._calls[cid] = fut
        if self.failure is not None:
            self._calls.pop(cid, None)
            raise EngineUnavailableError(self.failure)
        try:
            self._send(("call", cid, fn, args))
        except (OSError, ValueError) as exc:
            self._calls.pop(cid, None)
            raise EngineUnavailableError(self.failure or "the engine process is gone") from exc
        try:
            return fut.result(timeout)
        except TimeoutError:
            self._calls.pop(cid, None)
            raise

    def health(self) -> str | None:
        """None while the engine can serve, else why not: this engine was shut down, its child
        process died (`failure`), or the child's engine says so (a dead tensor-parallel rank;
        asked in a thread of the child's own, never waiting for its scheduler). A child that
        does not answer in `HEALTH_S` is reported unhealthy. Thread-safe; mutates nothing."""
        from sgl_engine.engine_core import run_method

        if self._stopping:
            return "the engine has been shut down"
        if self.failure is not None:
            return self.failure
        try:
            return self._remote(run_method, "health", timeout=HEALTH_S)
        except EngineUnavailableError as exc:
            return str(exc)
        except TimeoutError:
            return f"the engine process (pid {self.proc.pid}) did not answer in {HEALTH_S:g} s"
        except RuntimeError:  # shut down meanwhile
            return "the engine has been shut down"

    def inspect(self, fn: Callable[..., Any], *args: Any) -> Any:
        from sgl_engine.engine_core import run_inspect

        return self._remote(run_inspect, fn, args)

    def flush_cache(self) -> bool:
        from sgl_engine.engine_core import run_method

        return self._remote(run_method, "flush_cache")

    def metrics(self) -> dict:
        from sgl_engine.engine_core import run_method

        return self._remote(run_method, "metrics")

    def check_invariants(self) -> None:
        from sgl_engine.engine_core import run_method

        self._remote(run_method, "check_invariants")

    def shutdown(self) -> None:
        """Finish in-flight requests, stop the child (killing it if it does not stop in
        `STOP_S`), and fail whatever is still waiting."""
        if self._stopping:
            return
        self._stopping = True
        with contextlib.suppress(OSError, ValueError):
            self._send(("stop",))
        self.proc.join(STOP_S)
        if self.proc.is_alive():
            log.error("the engine process did not stop in %.0f s; killing it", STOP_S)
        self._kill()
        if self._reader.is_alive():
            self._reader.join(KILL_S)
        self._conn.close()
        atexit.unregister(self.shutdown)
        with self._chan_lock:
            left = list(self._channels)
        for rid in left:
            self._done_with(rid, "the engine has been shut down")

    def _kill(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(KILL_S)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def _finish(live: _Live, message: str) -> None:
    """End a request the child can no longer finish: an abort carrying `message`, then done."""
    live.channel.put(_aborted(live, message))
    live.channel.put(_DONE)


def _aborted(live: _Live, message: str) -> dict:
    """The final result of a request the child can no longer finish."""
    last = live.last or {}
    meta = dict(last.get("meta_info") or {"id": live.req.rid})
    meta["finish_reason"] = {"type": "abort", "message": message}
    result = {
        "text": last.get("text", ""),
        "output_ids": list(last.get("output_ids", [])),
        "meta_info": meta,
    }
    if live.req.stream:
        result["delta"] = ""
    return result


def _describe(proc: multiprocessing.process.BaseProcess) -> str:
    from sgl_engine.distributed.driver import describe_exit

    return describe_exit(proc.exitcode)
