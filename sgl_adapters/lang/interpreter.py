"""The interpreter: a program's state, executed by one worker thread per state.

User code runs ahead: `s += expr` only enqueues. The worker interprets expressions in order
against the backend; reading a variable (`s["x"]`) waits until the worker has produced it.
`fork(n)` first prefills the shared text once (one prefill-only call), then gives each branch
its own executor that starts from a copy of the parent's text, variables and messages.

An exception in the worker (backend failure, bad argument) or in user code is recorded once;
the worker then skips what is queued, every waiting reader wakes, and reads raise
`ProgramError` with the message. Nothing waits forever on a failed program.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from sgl_adapters.lang import ir, logprobs
from sgl_adapters.lang.chat_template import ChatTemplate

_END = object()


class ProgramError(RuntimeError):
    """A program failed; the message is the original error's, which is the `__cause__`."""


class StreamExecutor:
    """Interprets one program state. Mutated only by its worker thread (or, without a thread,
    by the caller of `submit`); readers synchronise through `_cv`."""

    def __init__(
        self,
        backend: Any,
        defaults: ir.GenParams,
        chat_template: ChatTemplate,
        stream: bool = False,
        use_thread: bool = True,
    ) -> None:
        self.sid = uuid.uuid4().hex
        self.backend = backend
        self.defaults = defaults
        self.chat_template = chat_template
        self.stream = stream
        self.variables: dict[str, Any] = {}
        self.done: set[str] = set()
        self.meta_info: dict[str, Any] = {}
        self.text_in_logprobs: set[str] = set()
        self.events: dict[str, threading.Event] = {}
        self.text_ = ""
        self.messages_: list[dict[str, str]] = []
        self.cur_role: str | None = None
        self.cur_role_begin_pos = 0
        self.fork_start_text_pos = 0
        self.error_: BaseException | None = None
        self.finished = threading.Event()
        self.ended = False
        self._cv = threading.Condition()
        self._queue: queue.Queue | None = None
        if use_thread:
            self._queue = queue.Queue()
            threading.Thread(
                target=self._work, name=f"sgl-program-{self.sid[:8]}", daemon=True
            ).start()

    # -- the caller's side ---------------------------------------------------------------------

    def submit(self, expr: Any) -> None:
        if self.ended:
            raise ProgramError("this program has ended; run it again to add to it")
        expr = ir.as_expr(expr)
        for name in ir.variable_names(expr):
            self.events[name] = threading.Event()
        if self._queue is None:
            self._execute(expr)
        else:
            self._queue.put(expr)

    def sync(self) -> None:
        if self._queue is not None:
            self._queue.join()

    def end(self) -> None:
        """No more expressions will come; the worker exits once the queue is drained."""
        self.ended = True
        if self._queue is None:
            self._finish()
        elif not self.finished.is_set():
            self._queue.put(_END)

    def set_error(self, error: BaseException) -> None:
        """Record the first error, wake every reader; queued expressions are then skipped."""
        with self._cv:
            if self.error_ is None:
                self.error_ = error
            for event in self.events.values():
                event.set()
            self._cv.notify_all()

    def raise_error(self) -> None:
        if self.error_ is not None:
            raise ProgramError(str(self.error_) or type(self.error_).__name__) from self.error_

    def get_var(self, name: str) -> Any:
        event = self.events.get(name)
        if event is not None:
            event.wait()
        if name in self.done or (event is None and name in self.variables):
            return self.variables[name]
        self.raise_error()
        raise KeyError(f"no variable {name!r} in this program")

    def get_meta_info(self, name: str) -> Any:
        self.get_var(name)
        return self.meta_info.get(name)

    def text(self) -> str:
        self.sync()
        return self.text_

    def messages(self) -> list[dict[str, str]]:
        self.sync()
        return list(self.messages_)

    def error(self) -> BaseException | None:
        self.sync()
        return self.error_

    def fork(self, size: int) -> list[StreamExecutor]:
        size = int(size)
        if size < 1:
            raise ValueError(f"fork needs a size >= 1, got {size}")
        if size > 1:
            self.submit(ir.CommitPrefix())
        self.sync()
        children = []
        for _ in range(size):
            child = type(self)(
                self.backend,
                self.defaults,
                self.chat_template,
                self.stream,
                use_thread=self._queue is not None,
            )
            child.variables = dict(self.variables)
            child.done = set(self.done)
            child.meta_info = dict(self.meta_info)
            child.text_ = self.text_
            child.messages_ = list(self.messages_)
            child.cur_role = self.cur_role
            child.cur_role_begin_pos = self.cur_role_begin_pos
            child.fork_start_text_pos = len(self.text_)
            if self.error_ is not None:
                child.set_error(self.error_)
            children.append(child)
        return children

    # -- the worker's side ---------------------------------------------------------------------

    def _work(self) -> None:
        assert self._queue is not None
        while True:
            expr = self._queue.get()
            try:
                if expr is _END:
                    return
                if self.error_ is None:
                    self._execute(expr)
            except Exception as exc:  # noqa: BLE001 -- recorded and raised on read
                self.set_error(exc)
            finally:
                if expr is _END:
                    self._finish()
                self._queue.task_done()

    def _finish(self) -> None:
        with self._cv:
            self.finished.set()
            for event in self.events.values():
                event.set()
            self._cv.notify_all()

    def _notify(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _execute(self, expr: ir.Expr) -> None:
        if isinstance(expr, ir.ExprList):
            for item in expr.items:
                self._execute(item)
        elif isinstance(expr, ir.Text):
            self._fill(expr.value)
        elif isinstance(expr, ir.Gen):
            self._gen(expr)
        elif isinstance(expr, ir.Select):
            self._select(expr)
        elif isinstance(expr, ir.RoleBegin):
            self._role_begin(expr.role)
        elif isinstance(expr, ir.RoleEnd):
            self._role_end(expr.role)
        elif isinstance(expr, ir.VarScopeBegin):
            self.variables[expr.name] = len(self.text_)
        elif isinstance(expr, ir.VarScopeEnd):
            self._set_var(expr.name, self.text_[self.variables[expr.name] :], None)
        elif isinstance(expr, ir.CommitPrefix):
            if self.text_:
                self.backend.cache_prefix(self.text_)
        elif isinstance(expr, ir.SeparateReasoning):
            self._separate_reasoning(expr)
        elif isinstance(expr, ir.ConcatAndAppend):
            for state in expr.states:
                child = state.stream_executor
                child.sync()
                self._fill(child.text_[child.fork_start_text_pos :])
        else:
            raise TypeError(f"unknown expression {expr!r}")

    def _fill(self, text: str) -> None:
        self.text_ += str(text)
        self._notify()

    def _set_var(self, name: str | None, value: Any, meta: Any) -> None:
        if name is None:
            return
        self.variables[name] = value
        self.meta_info[name] = meta
        self.done.add(name)
        self.events[name].set()
        self._notify()

    def _separate_reasoning(self, expr: ir.SeparateReasoning) -> None:
        """Split variable `expr.name` into answer and `<name>_reasoning_content`."""
        if expr.name is None or expr.name not in self.variables:
            return
        from sgl_engine.families import THINK, builtin_registry

        fmt = THINK
        if expr.model_type is not None:
            fmt = builtin_registry().get(expr.model_type).reasoning or THINK
        value = self.variables[expr.name]
        reasoning, answer = fmt.separate(value if isinstance(value, str) else str(value))
        self.variables[expr.name] = answer
        key = f"{expr.name}_reasoning_content"
        self.events.setdefault(key, threading.Event())
        self._set_var(key, reasoning or "", None)

    def _resolve(self, params: ir.GenParams) -> ir.GenParams:
        """`params` over the program defaults, plus the chat template's stop strings."""
        params = params.merged_over(self.defaults)
        extra = self.chat_template.stop_str
        if not extra:
            return params
        stop = params.stop
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        return dataclasses.replace(params, stop=tuple(dict.fromkeys(stops + tuple(extra))))

    def _gen(self, expr: ir.Gen) -> None:
        params = self._resolve(expr.params)
        if self.stream and (params.n or 1) == 1:
            self._gen_stream(expr.name, params)
            return
        comp, meta = self.backend.generate(self.text_, params)
        if params.return_text_in_logprobs:
            tok = getattr(self.backend, "tokenizer", None)
            fill = logprobs.fill_token_text
            meta = [fill(m, tok) for m in meta] if isinstance(meta, list) else fill(meta, tok)
        self.text_ += comp[0] if isinstance(comp, list) else comp
        self._set_var(expr.name, comp, meta)

    def _gen_stream(self, name: str | None, params: ir.GenParams) -> None:
        if name is not None:
            self.variables[name] = ""
            if params.return_text_in_logprobs:
                self.text_in_logprobs.add(name)
        meta: Any = None
        for delta, chunk_meta in self.backend.generate_stream(self.text_, params):
            with self._cv:
                self.text_ += delta
                if name is not None:
                    self.variables[name] += delta
                    self.meta_info[name] = meta = logprobs.accumulate(meta, chunk_meta)
                self._cv.notify_all()
        if name is not None:
            if params.return_text_in_logprobs:
                meta = logprobs.fill_token_text(meta, getattr(self.backend, "tokenizer", None))
            self._set_var(name, self.variables[name], meta)

    def _select(self, expr: ir.Select) -> None:
        decision = self.backend.select(self.text_, expr.choices, expr.temperature, expr.method)
        self.text_ += decision.decision
        self._set_var(expr.name, decision.decision, decision.meta_info)

    def _role_begin(self, role: str) -> None:
        if self.cur_role is not None:
            raise ValueError(f"role {role!r} begins inside role {self.cur_role!r}; roles nest not")
        default_system = self.chat_template.default_system_prompt
        if not self.messages_ and role != "system" and default_system:
            self._role_begin("system")
            self._fill(default_system)
            self._role_end("system")
        prefix, _ = self.chat_template.get_prefix_and_suffix(role)
        self.cur_role = role
        self._fill(prefix)
        self.cur_role_begin_pos = len(self.text_)

    def _role_end(self, role: str) -> None:
        if self.cur_role != role:
            raise ValueError(f"role {role!r} ends but the current role is {self.cur_role!r}")
        content = self.text_[self.cur_role_begin_pos :].lstrip()
        _, suffix = self.chat_template.get_prefix_and_suffix(role)
        self.cur_role = None
        self._fill(suffix)
        self.messages_.append({"role": role, "content": content})

    # -- streaming reads -----------------------------------------------------------------------

    def iter_text(self, name: str | None) -> Iterator[str]:
        """New text of variable `name` (or of the whole program) as it is produced."""
        for out, _ in self.iter_text_meta(name):
            if out:
                yield out

    def iter_text_meta(self, name: str | None) -> Iterator[tuple[str, Any]]:
        """(new text, meta_info) of variable `name` as it is produced; each meta_info's output
        logprob lists hold only the tokens new since the previous item (their running count
        is `completion_tokens`). A last ("", meta_info) carries logprobs of tokens that added
        no text (an end-of-sequence token). For the whole program (`name` None) meta is None."""
        sent, sent_lps = 0, {}

        def current() -> str:
            if name is None:
                return self.text_
            value = self.variables.get(name, "")
            return value if isinstance(value, str) else ""

        def done() -> bool:
            if self.error_ is not None or self.finished.is_set():
                return True
            if name is None:
                return False
            event = self.events.get(name)
            return event is not None and event.is_set()

        def ready(sent: int) -> bool:
            return len(current()) > sent or done()

        while True:
            with self._cv:
                self._cv.wait_for(lambda s=sent: ready(s), timeout=1.0)
                out, finished = current()[sent:], done()
                meta = None if name is None else self.meta_info.get(name)
            if out:
                sent += len(out)
                yield out, self._increment(name, meta, sent_lps)
            elif finished:
                if name is not None and logprobs.has_unsent(meta, sent_lps):
                    yield "", self._increment(name, meta, sent_lps)
                break
        if name is None or name not in self.done:
            self.raise_error()

    def _increment(self, name: str | None, meta: Any, sent: dict[str, int]) -> Any:
        if not isinstance(meta, dict):
            return meta
        part = logprobs.increment(meta, sent)
        if name not in self.text_in_logprobs:
            return part
        return logprobs.fill_token_text(part, getattr(self.backend, "tokenizer", None))


class ProgramState:
    """What a program function receives as `s`; see SGLang's ProgramState."""

    def __init__(self, stream_executor: StreamExecutor) -> None:
        self.stream_executor = stream_executor
        self.ret_value: Any = None

    def _role(self, name: str, expr: Any = None) -> Any:
        if expr is not None:
            self += ir.ExprList([ir.RoleBegin(name), ir.as_expr(expr), ir.RoleEnd(name)])
            return None
        return self._role_scope(name)

    @contextlib.contextmanager
    def _role_scope(self, name: str) -> Iterator[None]:
        self.stream_executor.submit(ir.RoleBegin(name))
        yield
        self.stream_executor.submit(ir.RoleEnd(name))

    def system(self, expr: Any = None) -> Any:
        return self._role("system", expr)

    def user(self, expr: Any = None) -> Any:
        return self._role("user", expr)

    def assistant(self, expr: Any = None) -> Any:
        return self._role("assistant", expr)

    @contextlib.contextmanager
    def var_scope(self, name: str) -> Iterator[None]:
        self.stream_executor.submit(ir.VarScopeBegin(name))
        yield
        self.stream_executor.submit(ir.VarScopeEnd(name))

    def fork(self, size: int = 1, position_ids_offset: Any = None) -> ProgramStateGroup:
        """`size` branches from the text so far. `position_ids_offset` is accepted and, as
        in SGLang's interpreter, not used."""
        children = self.stream_executor.fork(size)
        return ProgramStateGroup([ProgramState(c) for c in children], self)

    @contextlib.contextmanager
    def copy(self, position_ids_offset: Any = None) -> Iterator[ProgramState]:
        group = self.fork(1)
        try:
            yield group[0]
        finally:
            group.join()

    def text(self) -> str:
        return self.stream_executor.text()

    def messages(self) -> list[dict[str, str]]:
        return self.stream_executor.messages()

    def sync(self) -> None:
        self.stream_executor.sync()

    def error(self) -> BaseException | None:
        return self.stream_executor.error()

    def get_var(self, name: str) -> Any:
        return self.stream_executor.get_var(name)

    def set_var(self, name: str, value: Any) -> None:
        self.stream_executor.variables[name] = value
        self.stream_executor.done.add(name)

    def get_meta_info(self, name: str) -> Any:
        return self.stream_executor.get_meta_info(name)

    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """Text as it is generated (`run(stream=True)`); else the final value, once."""
        if self.stream_executor.stream:
            yield from self.stream_executor.iter_text(var_name)
        elif var_name is None:
            yield self.text()
        else:
            yield self.get_var(var_name)

    async def text_async_iter(
        self, var_name: str | None = None, return_meta_data: bool = False
    ) -> AsyncIterator[Any]:
        """`text_iter` for asyncio callers (the blocking waits run in a worker thread). With
        `return_meta_data` and a `var_name`, items are (text, meta_info) whose output logprobs
        are incremental (see `StreamExecutor.iter_text_meta`); without `stream=True` the one
        item is (value, meta_info)."""
        with_meta = return_meta_data and var_name is not None
        if not self.stream_executor.stream:
            it: Iterator[Any] = iter(self._final_items(var_name, with_meta))
        elif with_meta:
            it = self.stream_executor.iter_text_meta(var_name)
        else:
            it = self.text_iter(var_name)
        loop = asyncio.get_running_loop()
        while True:
            item = await loop.run_in_executor(None, next, it, _END)
            if item is _END:
                return
            yield item

    def _final_items(self, var_name: str | None, with_meta: bool) -> Iterator[Any]:
        if var_name is None:
            yield self.text()
        elif with_meta:
            yield self.get_var(var_name), self.get_meta_info(var_name)
        else:
            yield self.get_var(var_name)

    def __iadd__(self, other: Any) -> ProgramState:
        if other is None:
            raise ValueError("cannot add None to a program")
        self.stream_executor.submit(other)
        return self

    def __getitem__(self, name: str) -> Any:
        return self.get_var(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self.set_var(name, value)

    def __contains__(self, name: str) -> bool:
        return name in self.stream_executor.variables

    def __repr__(self) -> str:
        return f"ProgramState({self.text()!r})"


class ProgramStateGroup:
    """The branches of a fork; `+=` adds to every branch (a callable gets the branch index)."""

    def __init__(self, states: list[ProgramState], src_state: ProgramState) -> None:
        self.states = states
        self.src_state = src_state

    def join(self, mode: str = "gather_variable") -> None:
        """Wait for the branches. gather_variable: each variable a branch created becomes a
        list in the parent; concate_and_append: the branches' new text is appended."""
        for state in self.states:
            state.sync()
        parent = self.src_state.stream_executor
        if mode == "gather_variable":
            known = set(parent.variables)
            for state in self.states:
                child = state.stream_executor
                for name in child.variables.keys() - known:
                    parent.variables.setdefault(name, []).append(child.variables[name])
            for state in self.states:
                if state.stream_executor.error_ is not None and parent.error_ is None:
                    parent.set_error(state.stream_executor.error_)
        elif mode == "concate_and_append":
            self.src_state += ir.ConcatAndAppend(tuple(self.states))
            parent.sync()
        else:
            raise ValueError(f"invalid join mode {mode!r}")
        for state in self.states:
            state.stream_executor.end()

    def __getitem__(self, i: int) -> ProgramState:
        return self.states[i]

    def __setitem__(self, i: int, value: ProgramState) -> None:
        """What `forks[i] += expr` stores back: branch i itself (already extended)."""
        if value is not self.states[i]:
            raise TypeError(
                "a fork group holds its own branches: `forks[i] += expr` extends branch i; "
                "another state cannot be put in its place"
            )

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self.states)

    def __iadd__(self, other: Any) -> ProgramStateGroup:
        if callable(other) and not isinstance(other, ir.Expr):
            for i, state in enumerate(self.states):
                state += other(i)
        elif isinstance(other, (list, tuple)):
            for state, item in zip(self.states, other, strict=True):
                state += item
        else:
            for state in self.states:
                state += other
        return self


def run_program(
    func: Callable[..., Any],
    backend: Any,
    args: tuple,
    kwargs: dict[str, Any],
    defaults: ir.GenParams,
    stream: bool = False,
    sync: bool = False,
    use_thread: bool = True,
    executor_cls: type[StreamExecutor] = StreamExecutor,
) -> ProgramState:
    """Run `func(s, *args, **kwargs)`; an exception it raises is recorded in the state.
    With `stream` the body runs in its own thread (as SGLang does), so the caller gets the
    state at once even when the program reads its own variables."""
    executor = executor_cls(
        backend, defaults, backend.get_chat_template(), stream, use_thread=use_thread
    )
    state = ProgramState(executor)

    def body() -> None:
        try:
            state.ret_value = func(state, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 -- surfaced by reads and state.error()
            executor.set_error(exc)
        finally:
            executor.end()
        if sync:
            executor.sync()
        _print_if_verbose(state)

    if stream:
        threading.Thread(target=body, name=f"sgl-stream-{executor.sid[:8]}", daemon=True).start()
    else:
        body()
    return state


def _print_if_verbose(state: ProgramState) -> None:
    from sgl_adapters.lang.global_config import global_config

    if global_config.verbosity >= 2:
        print(state.text())
