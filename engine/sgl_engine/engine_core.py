"""The child process of a `ProcessEngine`: an in-process `Engine` served over a pipe.

The protocol is in `engine_process`'s docstring. The main thread reads the front's messages; the
engine's scheduler thread sends outputs; each `call` runs in a thread of its own (a call may
wait for the scheduler, and must not hold up the next request).
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import pickle
import signal
import sys
import threading
from concurrent.futures import Future
from typing import Any

from sgl_engine.engine import _DONE, Engine
from sgl_engine.engine_process import CoreSpec, PendingGrammar
from sgl_engine.request import Req

log = logging.getLogger(__name__)


class LocalEngine(Engine):
    """An `Engine` in this process whatever its `tp_size` (the child's own engine)."""


def core_main(conn: Any, spec: CoreSpec) -> None:
    """The child's entry point. It ends with `os._exit`: the engine is shut down by then, and
    after a rank died the interpreter's own exit would run torch's NCCL teardown, which aborts
    the process ("terminate called without an active exception")."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group; the front decides
    logging.basicConfig(level=spec.log_level, format="%(asctime)s engine %(name)s %(message)s")
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        engine = LocalEngine(spec.model_path, random_weights=spec.random_weights, **spec.kwargs)
    except BaseException as exc:  # noqa: BLE001 -- handed to the front, which raises it
        log.debug("engine start-up failed", exc_info=True)
        with contextlib.suppress(OSError, ValueError):
            conn.send(("failed", portable(exc)))
        _exit()
    server = _Server(conn, engine)
    try:
        server.send(("ready", _info(engine)))
        server.serve()
    finally:
        engine.shutdown()
        server.send(("stopped",))
        _exit()


def _info(engine: Engine) -> dict:
    runner = engine.runner
    driver = runner.driver
    return {
        "vocab_size": runner.vocab_size,
        "num_slots": runner.num_slots,
        "device": str(runner.device),
        "grammar": engine.grammar is not None,
        "pids": [os.getpid(), *(driver.pids if driver is not None else [])],
    }


def _exit() -> None:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


class _PipeChannel:
    """A request's channel in the child: what the engine delivers goes to the front."""

    def __init__(self, rid: str, server: _Server) -> None:
        self.rid = rid
        self.server = server

    def put(self, item: Any) -> None:
        self.server.send(("done", self.rid) if item is _DONE else ("out", self.rid, item))


class _Server:
    def __init__(self, conn: Any, engine: Engine) -> None:
        self.conn = conn
        self.engine = engine
        self._lock = threading.Lock()

    def send(self, msg: tuple) -> None:
        """Send to the front (any thread); a front that is gone is not an error here."""
        with self._lock, contextlib.suppress(OSError, ValueError):
            self.conn.send(msg)

    def serve(self) -> None:
        """Handle the front's messages until it says stop or goes away. A message that fails
        is logged; a failed submit finishes its requests with an abort saying why."""
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                log.warning("the engine's front went away; stopping")
                return
            except Exception:  # noqa: BLE001 -- an undecodable message: drop it, go on
                log.exception("could not read a message from the engine's front")
                continue
            if msg[0] == "stop":
                return
            try:
                self._handle(msg)
            except Exception as exc:  # noqa: BLE001 -- this message fails, the engine serves on
                log.exception("engine process: handling %r failed", msg[0])
                if msg[0] == "submit":
                    self._refuse(msg[1], f"internal error: {exc!r}")

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "submit":
            self._submit(msg[1])
        elif kind == "abort":
            with contextlib.suppress(RuntimeError):
                self.engine.abort(msg[1])
        elif kind == "call":
            threading.Thread(target=self._call, args=msg[1:], daemon=True).start()

    def _submit(self, reqs: list[Req]) -> None:
        grammar = self.engine.grammar
        for req in reqs:
            if isinstance(req.grammar_future, PendingGrammar):
                req.grammar_future = _compile(grammar, req.grammar_future.constraint)
        self.engine._register(reqs, lambda req: _PipeChannel(req.rid, self))
        self.engine._enqueue(reqs)

    def _refuse(self, reqs: list[Req], message: str) -> None:
        """Finish requests that could not be handed to the scheduler with an abort."""
        with self.engine._chan_lock:
            for req in reqs:
                self.engine._channels.pop(req.rid, None)
        for req in reqs:
            req.finish = {"type": "abort", "message": message}
            self.send(("out", req.rid, self.engine.processor.result(req, "")))
            self.send(("done", req.rid))

    def _call(self, cid: int, fn: Any, args: tuple) -> None:
        try:
            msg = ("reply", cid, True, fn(self.engine, *args))
        except BaseException as exc:  # noqa: BLE001 -- handed to the caller
            msg = ("reply", cid, False, portable(exc))
        try:
            with self._lock:
                self.conn.send(msg)
        except (OSError, ValueError):
            pass
        except Exception as exc:  # noqa: BLE001 -- an unpicklable result
            self.send(("reply", cid, False, RuntimeError(f"the result cannot be sent: {exc!r}")))


def _compile(grammar: Any, constraint: Any) -> Future:
    if grammar is None:
        fut: Future = Future()
        fut.set_exception(RuntimeError("constrained decoding needs xgrammar"))
        return fut
    return grammar.submit(constraint)


def portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling, else a RuntimeError saying what it was."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 -- any pickling failure
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


def run_method(engine: Engine, name: str) -> Any:
    """A `call`: one of the engine's own methods (`metrics`, `flush_cache`, ...)."""
    return getattr(engine, name)()


def run_inspect(engine: Engine, fn: Any, args: tuple) -> Any:
    """A `call`: `engine.inspect(fn, *args)`."""
    return engine.inspect(fn, *args)
