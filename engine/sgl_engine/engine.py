"""`Engine`: the in-process, thread-safe front of the scheduler, shaped like `sglang.Engine`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from typing import Any

from sgl_engine.config import EngineConfig
from sgl_engine.errors import InvalidRequestError
from sgl_engine.inputs import GenerateRequest, RequestBuilder
from sgl_engine.model_runner import ModelRunner
from sgl_engine.processor import RequestProcessor
from sgl_engine.request import Req
from sgl_engine.scheduler import Scheduler
from sgl_engine.scoring import ContinuationLogprobs, ScorePlan, plan_scores

_DONE = object()
log = logging.getLogger(__name__)


class _Channel:
    """Carries a request's outputs from the scheduler thread to one waiting caller."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop
        self.q: queue.Queue | asyncio.Queue = asyncio.Queue() if loop else queue.Queue()

    def put(self, item: Any) -> None:
        if self.loop is None:
            self.q.put(item)
        elif not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.q.put_nowait, item)


class Engine:
    """Load a model and serve `generate` calls from any number of threads or event loops.

    One background thread runs the scheduler; callers only enqueue requests and wait on their
    own channel, so requests from many threads are batched together (continuous batching).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Engine:
        """`Engine(..., tp_size=N)` with N > 1 is a `ProcessEngine`: its scheduler and model
        run in a child process, so a rank that dies cannot poison the caller's process."""
        tp_size = kwargs.get("tp_size", 1)
        if cls is Engine and isinstance(tp_size, int) and tp_size > 1:
            from sgl_engine.engine_process import ProcessEngine

            cls = ProcessEngine
        return super().__new__(cls)

    def __init__(
        self, model_path: str | None = None, *, random_weights: bool = False, **kwargs: Any
    ) -> None:
        path = self._load_front(model_path, random_weights, kwargs)
        self.runner = ModelRunner(
            self.config, path, self.hf_config, self.context_length, random_weights
        )
        self.grammar = self._make_grammar()
        self.processor = RequestProcessor(
            self.tokenizer,
            self._eos_ids(),
            self.context_length,
            self.runner.device,
            self.grammar,
            self.runner.vocab_size,
        )
        self.scheduler = Scheduler(self.config, self.runner, self.processor)
        self.builder = RequestBuilder(
            self.tokenizer,
            self.runner.vocab_size,
            self.context_length,
            self.runner.num_slots,
            self.grammar,
            self.config.max_top_logprobs,
        )
        self._cv = threading.Condition()
        self._chan_lock = threading.Lock()
        self._inbox: list[Callable[[], None]] = []
        self._channels: dict[str, _Channel] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="sgl-engine-scheduler", daemon=True)
        self._thread.start()

    # ---- set-up helpers ---------------------------------------------------------------------
    def _load_front(self, model_path: str | None, random_weights: bool, kwargs: dict) -> str | None:
        """Set the config, tokenizer, HF config and context length; returns the resolved path."""
        from sgl_engine.model_source import load_hf_config, load_tokenizer, resolve_model_path

        self.config = EngineConfig.from_kwargs(model_path=model_path, **kwargs)
        path = None if random_weights and model_path is None else resolve_model_path(model_path)
        self.model_path = path
        trust = self.config.trust_remote_code
        self.tokenizer = load_tokenizer(self.config.tokenizer_path or path, trust_remote_code=trust)
        self.hf_config = load_hf_config(path, trust_remote_code=trust)
        self.context_length = self.config.context_length or getattr(
            self.hf_config, "max_position_embeddings", 4096
        )
        return path

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (self.tokenizer.eos_token_id, getattr(self.hf_config, "eos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, (list, tuple)):
                ids.update(int(x) for x in src)
        try:
            from transformers import GenerationConfig

            gen = GenerationConfig.from_pretrained(self.model_path) if self.model_path else None
            eos = getattr(gen, "eos_token_id", None)
            ids.update([eos] if isinstance(eos, int) else list(eos or []))
        except (OSError, ValueError):
            pass
        return ids

    def _make_grammar(self) -> Any:
        try:
            from sgl_engine.grammar import GrammarCompiler
        except ImportError:
            return None
        return GrammarCompiler(self.tokenizer, self.runner.vocab_size)

    # ---- the scheduler thread -----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._inbox and not self.scheduler.has_work() and not self._stopping:
                    self._cv.wait()
                if self._stopping and not self.scheduler.has_work() and not self._inbox:
                    return
                commands, self._inbox = self._inbox, []
            for command in commands:
                try:
                    command()
                except Exception:  # a failing command must not stop the scheduler thread
                    log.exception("engine command failed")
            if self.scheduler.has_work():
                self._deliver(self._step())
                if not self.scheduler.progressed and not self._inbox:
                    with self._cv:
                        self._cv.wait(timeout=0.002)

    def _step(self) -> list[Req]:
        try:
            return self.scheduler.step()
        except Exception as exc:  # a bug must not kill the thread: fail the requests, go on
            reqs = self.scheduler.fail_all(f"internal error: {exc!r}")
            log.exception("scheduler step failed; aborted requests %s", [r.rid for r in reqs])
            return reqs

    def _post(self, command: Callable[[], None]) -> None:
        with self._cv:
            if self._stopping:
                raise RuntimeError("the engine has been shut down")
            self._inbox.append(command)
            self._cv.notify()

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the scheduler thread and wait for its result."""
        fut: Future = Future()

        def command() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 -- handed to the caller
                fut.set_exception(exc)

        self._post(command)
        return fut.result()

    def _deliver(self, reqs: list[Req]) -> None:
        for req in reqs:
            ch = self._channels.get(req.rid)
            if ch is None:
                continue
            if req.finished:
                self._channels.pop(req.rid, None)
                final = self.processor.result(req)
                if req.stream:
                    final["delta"] = req.text[req.sent_len :]
                ch.put(final)
                ch.put(_DONE)
            elif req.stream:
                text = self.processor.stream_text(req)
                if len(text) > req.sent_len:
                    chunk = self.processor.result(req, text)
                    chunk["delta"] = text[req.sent_len :]
                    req.sent_len = len(text)
                    ch.put(chunk)

    def _submit(self, reqs: list[Req], loop: asyncio.AbstractEventLoop | None) -> list[_Channel]:
        channels = self._register(reqs, lambda req: _Channel(loop))
        self._enqueue(reqs)
        return channels

    def _register(self, reqs: list[Req], make: Callable[[Req], Any]) -> list[Any]:
        """Give each request a channel (`make(req)`); refuses a request id already in use."""
        channels = []
        with self._chan_lock:
            for req in reqs:
                if req.rid in self._channels:
                    raise InvalidRequestError(f"request id {req.rid!r} is already in use", "rid")
            for req in reqs:
                ch = make(req)
                self._channels[req.rid] = ch
                channels.append(ch)
        return channels

    def _enqueue(self, reqs: list[Req]) -> None:
        """Hand registered requests to the scheduler thread."""

        def add() -> None:
            for req in reqs:
                try:
                    self.processor.prepare(req)
                except Exception as exc:  # noqa: BLE001 -- fail this request only
                    req.finish = {"type": "abort", "message": f"internal error: {exc!r}"}
                    self._deliver([req])
                    continue
                self.scheduler.add(req)

        self._post(add)

    # ---- public API -------------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool | list[bool] = False,
        logprob_start_len: int | list[int] = -1,
        top_logprobs_num: int | list[int] = 0,
        stream: bool = False,
        rid: str | list[str] | None = None,
    ) -> dict | list[dict] | Iterator[dict]:
        """Generate for one request (a dict back) or a list (a list back); `stream=True` is
        `stream(...)`. Blocks until the results are in; thread-safe (it only enqueues)."""
        if stream:
            return self.stream(
                prompt,
                sampling_params,
                input_ids,
                return_logprob,
                logprob_start_len,
                top_logprobs_num,
                rid,
            )
        reqs, single = self.builder.build(
            GenerateRequest(
                prompt,
                sampling_params,
                input_ids,
                return_logprob,
                logprob_start_len,
                top_logprobs_num,
                False,
                rid,
            )
        )
        channels = self._submit(reqs, None)
        results = [self._wait(ch) for ch in channels]
        return results[0] if single else results

    def stream(
        self,
        prompt: str | None = None,
        sampling_params: dict | None = None,
        input_ids: list[int] | None = None,
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        top_logprobs_num: int = 0,
        rid: str | None = None,
    ) -> Iterator[dict]:
        """Stream one request (n=1): an iterator of chunks as the text grows. Each chunk has
        SGLang's result shape with a cumulative `text` and the new `delta`; the last one has
        `meta_info["finish_reason"]` set. Arguments are validated now, in the caller's thread
        (`InvalidRequestError`); the request is enqueued at the first `next()`. Closing the
        iterator early (`break` drops it, or `.close()`) aborts the request, which frees its
        KV slots on the scheduler thread; nothing else is locked or mutated by the caller."""
        reqs, _ = self.builder.build(
            GenerateRequest(
                prompt,
                sampling_params,
                input_ids,
                return_logprob,
                logprob_start_len,
                top_logprobs_num,
                True,
                rid,
            )
        )
        return self._stream_sync(reqs)

    @staticmethod
    def _items(ch: _Channel) -> Iterator[dict]:
        while (item := ch.q.get()) is not _DONE:
            yield item

    def _wait(self, ch: _Channel) -> dict:
        *_, final = self._items(ch)
        return final

    def _stream_sync(self, reqs: list[Req]) -> Iterator[dict]:
        (ch,) = self._submit(reqs, None)
        try:
            yield from self._items(ch)
        finally:
            self._abort_live(reqs, [ch])

    async def async_generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool | list[bool] = False,
        logprob_start_len: int | list[int] = -1,
        top_logprobs_num: int | list[int] = 0,
        stream: bool = False,
        rid: str | list[str] | None = None,
    ) -> dict | list[dict] | AsyncIterator[dict]:
        """The asyncio twin of `generate`; with `stream=True` returns an async iterator.

        Validation and tokenising run in a worker thread, off the event loop. Cancelling the
        awaiting task aborts the requests (their KV is freed) before the cancellation goes on.
        """
        request = GenerateRequest(
            prompt,
            sampling_params,
            input_ids,
            return_logprob,
            logprob_start_len,
            top_logprobs_num,
            stream,
            rid,
        )
        reqs, single = await asyncio.to_thread(self.builder.build, request)
        loop = asyncio.get_running_loop()
        if stream:
            return self._stream_async(reqs, loop)
        channels = self._submit(reqs, loop)
        try:
            results = [await self._await(ch) for ch in channels]
        except asyncio.CancelledError:
            self._abort_live(reqs, channels)
            raise
        return results[0] if single else results

    def _abort_live(self, reqs: list[Req], channels: list[_Channel]) -> None:
        """Abort the requests whose results have not been delivered to `channels` yet."""
        for req, ch in zip(reqs, channels, strict=True):
            if self._channels.get(req.rid) is ch:
                try:
                    self.abort(req.rid)
                except RuntimeError:  # the engine is shutting down: it finishes them anyway
                    pass

    @staticmethod
    async def _aitems(ch: _Channel) -> AsyncIterator[dict]:
        while (item := await ch.q.get()) is not _DONE:
            yield item

    async def _await(self, ch: _Channel) -> dict:
        return [item async for item in self._aitems(ch)][-1]

    async def _stream_async(self, reqs: list[Req], loop) -> AsyncIterator[dict]:
        (ch,) = self._submit(reqs, loop)
        try:
            async for item in self._aitems(ch):
                yield item
        finally:
            self._abort_live(reqs, [ch])

    async def astream(
        self,
        prompt: str | None = None,
        sampling_params: dict | None = None,
        input_ids: list[int] | None = None,
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        top_logprobs_num: int = 0,
        rid: str | None = None,
    ) -> AsyncIterator[dict]:
        """The asyncio twin of `stream`: `async for chunk in engine.astream(...)`. It is
        `await async_generate(..., stream=True)` iterated, so arguments are checked (off the
        event loop) at the first iteration. Cancelling the consuming task, or closing the
        iterator (`aclose()`, `contextlib.aclosing`), aborts the request and frees its KV.
        (A plain `break` leaves the closing to the event loop's async-generator finaliser.)"""
        chunks = await self.async_generate(
            prompt,
            sampling_params,
            input_ids,
            return_logprob,
            logprob_start_len,
            top_logprobs_num,
            True,
            rid,
        )
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield chunk

    def score(self, prefix: str, continuations: list[str]) -> list[ContinuationLogprobs]:
        """Score each continuation of `prefix` by its tokens' logprobs (no generation): per
        continuation the token ids, their logprobs, the sum and the count (see
        `sgl_engine.scoring` for how the tokenisation boundary is handled). All continuations
        go as one batch with `max_new_tokens=0`, so the shared prefix is prefilled once and
        stays in the radix cache. Validates and tokenises in the caller's thread (bad input
        raises `InvalidRequestError`), then blocks like `generate`; thread-safe."""
        plan = self._plan_scores(prefix, continuations)
        return plan.results(self.generate(**plan.request().forwarded()))

    async def async_score(
        self, prefix: str, continuations: list[str]
    ) -> list[ContinuationLogprobs]:
        """The asyncio twin of `score`: tokenises in a worker thread, then awaits
        `async_generate` (cancelling aborts the batch and frees its KV)."""
        plan = await asyncio.to_thread(self._plan_scores, prefix, continuations)
        return plan.results(await self.async_generate(**plan.request().forwarded()))

    def _plan_scores(self, prefix: str, continuations: list[str]) -> ScorePlan:
        b = self.builder
        return plan_scores(
            prefix, continuations, b.encode, b.check_prompt_text, b.max_prompt_tokens
        )

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list | None = None,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text; `template_kwargs` reach the template (e.g. `enable_thinking`)."""
        return self.tokenizer.apply_chat_template(
            messages,
            tools=tools,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **template_kwargs,
        )

    def abort(self, rid: str) -> None:
        """Abort a queued or running request; its caller gets finish_reason 'abort'."""

        def command() -> None:
            req = self.scheduler.abort(rid)
            if req is not None:
                self._deliver([req])

        self._post(command)

    def inspect(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(engine, *args)` run on the scheduler thread (between steps), its result returned:
        for tests and benchmarks that read the scheduler or the model runner. With a
        `ProcessEngine` it runs in the child process on its engine, so `fn` must be a
        module-level function and its arguments and result picklable."""
        return self._call(lambda: fn(self, *args))

    def flush_cache(self) -> bool:
        """Drop the radix cache; refused (False) while requests are in flight."""
        return self._call(self.scheduler.flush_cache)

    def metrics(self) -> dict:
        return self._call(self._metrics)

    def _metrics(self) -> dict:
        s = self.scheduler
        c = s.counters
        total = s.allocator.size
        return {
            "prefill_tokens": c.prefill_tokens,
            "cached_tokens": c.cached_tokens,
            "prompt_tokens": c.prompt_tokens,
            "hit_rate": c.cached_tokens / c.prompt_tokens if c.prompt_tokens else 0.0,
            "decode_tokens": c.decode_tokens,
            "forward_passes": c.forward_passes,
            "prefill_passes": c.prefill_passes,
            "sampled_tokens": c.sampled_tokens,
            "forced_tokens": c.forced_tokens,
            "forward_passes_saved": c.forward_passes_saved,
            "overlapped_passes": c.overlapped_passes,
            "mixed_passes": c.mixed_passes,
            "retractions": c.retractions,
            "internal_errors": c.internal_errors,
            "finished_requests": c.finished,
            "aborted_requests": c.aborted,
            "kv_total": total,
            "kv_used": total - s.allocator.available(),
            "kv_usage": (total - s.allocator.available()) / total,
            "cache_tokens": s.cache.total_size(),
            "running": len(s.running) + (1 if s.chunked else 0),
            "waiting": len(s.waiting),
        }

    def health(self) -> str | None:
        """None while the engine can serve requests, else the message saying why it cannot: a
        tensor-parallel rank died (the driver's failure), the scheduler thread is gone, or the
        engine was shut down. Only reads flags: never waits for the scheduler thread, so it
        answers while a step runs; thread-safe, mutates nothing. Once not None it stays so."""
        if self._stopping:
            return "the engine has been shut down"
        failure = getattr(getattr(self.runner, "driver", None), "failure", None)
        if failure is not None:
            return failure
        if not self._thread.is_alive():
            return "the engine's scheduler thread has stopped; shut the engine down"
        return None

    def check_invariants(self) -> None:
        """Wait until idle, then assert that no KV slot leaked and no lock is held."""
        import time

        for _ in range(2000):
            if self._call(lambda: not self.scheduler.has_work()):
                break
            time.sleep(0.005)
        self._call(self.scheduler.check_idle_invariants)

    def shutdown(self) -> None:
        """Finish in-flight requests, then stop the scheduler thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)
        self.runner.shutdown()
        if self.grammar is not None:
            self.grammar.shutdown()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
