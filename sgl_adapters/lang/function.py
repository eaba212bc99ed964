"""`SglFunction`: what `@sgl.function` makes of a program; bind, run, run_batch, trace."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sgl_adapters.lang import ir
from sgl_adapters.lang.interpreter import ProgramState, run_program


def default_params(
    max_new_tokens: int = 128,
    n: int = 1,
    stop: str | Sequence[str] | None = (),
    stop_token_ids: Sequence[int] | None = (),
    stop_regex: str | Sequence[str] | None = (),
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = -1,
    min_p: float = 0.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    ignore_eos: bool = False,
    return_logprob: bool | None = None,
    logprob_start_len: int | None = None,
    top_logprobs_num: int | None = None,
    return_text_in_logprobs: bool | None = None,
) -> ir.GenParams:
    """The program-wide defaults of `run`/`run_batch` (SGLang's defaults), with the output
    options of `sgl.global_config`."""
    from sgl_adapters.lang.global_config import global_config

    output = global_config.detokenize_options()
    return ir.GenParams(
        max_new_tokens=max_new_tokens,
        n=n,
        stop=ir.as_str_tuple(stop),
        stop_token_ids=tuple(stop_token_ids or ()) or None,
        stop_regex=ir.as_str_tuple(stop_regex),
        skip_special_tokens=output.get("skip_special_tokens"),
        spaces_between_special_tokens=output.get("spaces_between_special_tokens"),
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        ignore_eos=ignore_eos,
        return_logprob=return_logprob,
        logprob_start_len=logprob_start_len,
        top_logprobs_num=top_logprobs_num,
        return_text_in_logprobs=return_text_in_logprobs,
    )


_SAMPLING_KW = set(inspect.signature(default_params).parameters)


class SglFunction:
    """A program `func(s, ...)`. Immutable: `bind` returns a new function."""

    def __init__(
        self, func: Callable[..., Any], bind_arguments: Mapping[str, Any] | None = None
    ) -> None:
        params = list(inspect.signature(func).parameters.values())
        if not params or params[0].name != "s":
            raise TypeError('the first argument of an sgl.function must be "s"')
        self.func = func
        self.arg_names = [p.name for p in params[1:]]
        self.bind_arguments = dict(bind_arguments or {})
        self.__name__ = getattr(func, "__name__", "sgl_function")
        self.__doc__ = func.__doc__

    def bind(self, **kwargs: Any) -> SglFunction:
        unknown = sorted(set(kwargs) - set(self.arg_names))
        if unknown:
            raise TypeError(f"{self.__name__} has no argument(s) {', '.join(unknown)}")
        return SglFunction(self.func, {**self.bind_arguments, **kwargs})

    def _backend(self, backend: Any) -> Any:
        from sgl_adapters.lang.api import get_default_backend

        backend = backend or get_default_backend()
        if backend is None:
            raise ValueError("no backend: pass backend=... or call sgl.set_default_backend()")
        return backend

    def _split(self, kwargs: dict[str, Any]) -> tuple[ir.GenParams, dict[str, Any]]:
        sampling = {k: kwargs.pop(k) for k in list(kwargs) if k in _SAMPLING_KW}
        return default_params(**sampling), {**self.bind_arguments, **kwargs}

    def run(
        self,
        *args: Any,
        stream: bool = False,
        backend: Any = None,
        use_thread: bool = True,
        **kwargs: Any,
    ) -> ProgramState:
        """Start the program and return its state at once (reads wait for the model).
        Keyword arguments named like `default_params`' set the program's sampling defaults.
        `use_thread=False` interprets each expression in the calling thread as it is added
        (SGLang's option); `stream=True` also runs the program body in its own thread, so the
        state can be streamed while the program still reads its variables."""
        defaults, kwargs = self._split(kwargs)
        return run_program(
            self.func, self._backend(backend), args, kwargs, defaults, stream, use_thread=use_thread
        )

    def run_batch(
        self,
        batch_kwargs: Sequence[Mapping[str, Any] | Sequence[Any]],
        *,
        backend: Any = None,
        num_threads: int | str = "auto",
        progress_bar: bool = False,
        generator_style: bool = False,
        prewarm: bool | None = None,
        **sampling: Any,
    ) -> list[ProgramState] | Iterator[ProgramState]:
        """Run one program per entry concurrently (at most `num_threads` at once); the
        finished states in order, or with `generator_style` an iterator yielding each in order
        as soon as it and those before it are done. First the prefixes the programs share are
        prefilled once, found by tracing them (`prewarm`; default
        `global_config.enable_precache_with_tracing`)."""
        from sgl_adapters.lang.global_config import global_config
        from sgl_adapters.lang.tracer import warm_shared_prefixes

        if set(sampling) - _SAMPLING_KW:
            raise TypeError(f"unknown option(s): {', '.join(sorted(set(sampling) - _SAMPLING_KW))}")
        if not batch_kwargs:
            return iter(()) if generator_style else []
        backend = self._backend(backend)
        defaults, _ = self._split(dict(sampling))
        batch = [{**self.bind_arguments, **self._as_kwargs(a)} for a in batch_kwargs]
        if prewarm is None:
            prewarm = global_config.enable_precache_with_tracing
        if prewarm and len(batch) > 1:
            warm_shared_prefixes(self.func, batch, backend, defaults)
        if num_threads == "auto":
            num_threads = min(len(batch), max(16, (os.cpu_count() or 1) * 16), 256)
        states = self._run_all(batch, backend, defaults, max(1, int(num_threads)), progress_bar)
        return states if generator_style else list(states)

    def _run_all(
        self,
        batch: list[dict[str, Any]],
        backend: Any,
        defaults: ir.GenParams,
        num_threads: int,
        progress_bar: bool,
    ) -> Iterator[ProgramState]:
        """Submit in chunks (so a generator's consumer sees results before all are queued)."""
        chunk = max(num_threads, 200)
        with ThreadPoolExecutor(max_workers=num_threads) as pool:
            for lo in range(0, len(batch), chunk):
                futures = [
                    pool.submit(run_program, self.func, backend, (), kw, defaults, False, True)
                    for kw in batch[lo : lo + chunk]
                ]
                for f in _progress(futures, progress_bar):
                    yield f.result()

    def cache(self, backend: Any = None) -> str | None:
        """Prefill the program's constant prefix (its text before the first argument it was
        not bound to, or the first generation) so later runs reuse it, as SGLang does for
        prefixes over 64 characters. Returns the prefix cached, or None."""
        from sgl_adapters.lang.tracer import extract_prefix

        backend = self._backend(backend)
        prefix = extract_prefix(self.func, self.arg_names, self.bind_arguments, backend)
        if len(prefix) <= 64:
            return None
        backend.cache_prefix(prefix)
        return prefix

    def compile(self, *, backend: Any = None) -> Any:
        """SGLang's experimental graph compiler: refused (see the message)."""
        from sgl_adapters.lang.unsupported import UnsupportedFeatureError

        raise UnsupportedFeatureError(
            "SglFunction.compile: SGLang's experimental graph compiler is not included; "
            "run_batch already traces programs to prefill their shared prefixes once, and "
            "trace() returns the program's calls as a CallGraph"
        )

    def _as_kwargs(self, args: Mapping[str, Any] | Sequence[Any]) -> dict[str, Any]:
        if isinstance(args, Mapping):
            return dict(args)
        if len(args) > len(self.arg_names):
            raise TypeError(f"{self.__name__} takes {len(self.arg_names)} arguments")
        return dict(zip(self.arg_names, args, strict=False))

    def trace(self, *, backend: Any = None, **kwargs: Any) -> Any:
        """The program's calls as a `sgl_adapters.graph.CallGraph` (no model runs)."""
        from sgl_adapters.lang.tracer import trace_program

        backend = backend or _default_or_none()
        defaults, kwargs = self._split(kwargs)
        return trace_program(self.func, [kwargs], backend, defaults)

    def trace_batch(self, batch_kwargs: Sequence[Mapping[str, Any]], *, backend: Any = None) -> Any:
        """One CallGraph for many programs (leaf metadata `program` is the index)."""
        from sgl_adapters.lang.tracer import trace_program

        backend = backend or _default_or_none()
        batch = [{**self.bind_arguments, **self._as_kwargs(a)} for a in batch_kwargs]
        return trace_program(self.func, batch, backend, default_params())

    def __call__(self, *args: Any, **kwargs: Any) -> ProgramState:
        return self.run(*args, **kwargs)


def _default_or_none() -> Any:
    from sgl_adapters.lang.api import get_default_backend

    return get_default_backend()


def _progress(futures: list[Any], enabled: bool) -> list[Any]:
    if not enabled:
        return futures
    try:
        from tqdm import tqdm
    except ImportError:
        return futures
    bar = tqdm(total=len(futures))
    for f in futures:
        f.add_done_callback(lambda _: bar.update(1))
    return futures
