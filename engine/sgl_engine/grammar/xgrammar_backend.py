"""Grammar backend over xgrammar: an off-thread compiler with a cache, per-request matchers,
and the token bitmask helpers the sampler uses."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import xgrammar as xgr

from sgl_engine.grammar.constraint import Constraint, GrammarError
from sgl_engine.grammar.schema_compat import compat_schema_text
from sgl_engine.grammar.utf8_guard import BOUNDARY, Utf8Guard


@dataclass(frozen=True)
class GrammarConfig:
    """How constraints compile. `any_whitespace=False` makes JSON output compact
    (`{"a": 1, "b": [2, 3]}`), which leaves the most text for jump-forward to force."""

    any_whitespace: bool = False
    max_whitespace_cnt: int | None = None
    strict_mode: bool = True
    xgrammar_threads: int = 1


@dataclass(frozen=True, eq=False)
class CompiledGrammar:
    """A constraint compiled for one tokenizer; immutable, shared by all its matchers."""

    constraint: Constraint
    handle: xgr.CompiledGrammar = field(repr=False)
    compile_seconds: float = 0.0


class GrammarCompiler:
    """Compiles constraints for one tokenizer; thread-safe; compile cache keyed by Constraint;
    compilation runs on a small thread pool so the scheduler never blocks on it.

    The cache is an LRU of futures (concurrent submits of one constraint share one compile);
    failed compiles are not kept. Its lock guards only the cache dict and the counters.
    """

    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        max_workers: int = 1,
        cache_size: int = 256,
        *,
        stop_token_ids: Sequence[int] | None = None,
        config: GrammarConfig | None = None,
    ) -> None:
        if stop_token_ids is None:
            if tokenizer.eos_token_id is None:
                raise ValueError("tokenizer has no eos_token_id; pass stop_token_ids")
            stop_token_ids = [tokenizer.eos_token_id]
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.special_token_ids = sorted(
            i for i in set(tokenizer.all_special_ids) if 0 <= i < vocab_size
        )
        self.config = config or GrammarConfig()
        self._info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=self.stop_token_ids
        )
        self._xgr = xgr.GrammarCompiler(
            self._info, max_threads=self.config.xgrammar_threads, cache_enabled=False
        )
        self._guard = Utf8Guard([bytes(b) for b in self._info.decoded_vocab], vocab_size)
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="grammar-compile")
        self._cache_size = cache_size
        self._cache: OrderedDict[Constraint, Future[CompiledGrammar]] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    def submit(self, constraint: Constraint) -> Future[CompiledGrammar]:
        """Start compiling (or reuse the cached compile); never blocks on compilation.
        Errors surface as GrammarError from `future.result()`."""
        with self._lock:
            future = self._cache.get(constraint)
            if future is not None and not _failed(future):
                self._cache.move_to_end(constraint)
                self._hits += 1
                return future
            self._misses += 1
            future = self._pool.submit(self._compile, constraint)
            self._cache[constraint] = future
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        future.add_done_callback(lambda f: self._forget_failure(constraint, f))
        return future

    def compile(self, constraint: Constraint) -> CompiledGrammar:
        """Blocking convenience: `submit(constraint).result()`."""
        return self.submit(constraint).result()

    def matcher(self, compiled: CompiledGrammar, max_rollback_tokens: int = 16) -> GrammarMatcher:
        """A fresh matcher for one request."""
        return GrammarMatcher(
            compiled,
            self.stop_token_ids,
            max_rollback_tokens,
            self._guard,
            special_token_ids=self.special_token_ids,
        )

    def cache_info(self) -> dict[str, int]:
        """Cache hits, misses and current entries."""
        with self._lock:
            return {"hits": self._hits, "misses": self._misses, "size": len(self._cache)}

    def shutdown(self) -> None:
        """Stop the compile threads (pending compiles are cancelled) and drop the cache."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._cache.clear()

    def _forget_failure(self, constraint: Constraint, future: Future) -> None:
        if _failed(future):
            with self._lock:
                if self._cache.get(constraint) is future:
                    del self._cache[constraint]

    def _compile(self, constraint: Constraint) -> CompiledGrammar:
        start = time.perf_counter()
        try:
            handle = self._compile_handle(constraint)
        except GrammarError:
            raise
        except Exception as e:
            raise GrammarError(
                f"invalid {constraint.kind}: {_clean_message(e)}", field=constraint.kind
            ) from None
        compiled = CompiledGrammar(constraint, handle, time.perf_counter() - start)
        if _first_step_is_empty(compiled, self.stop_token_ids, self.vocab_size):
            raise GrammarError(
                f"{constraint.kind} is unsatisfiable: no output can match it",
                field=constraint.kind,
            )
        return compiled

    def _compile_handle(self, constraint: Constraint) -> xgr.CompiledGrammar:
        kind, value = constraint.kind, constraint.value
        if kind == "regex":
            return self._xgr.compile_regex(value)
        if kind == "json_schema":
            cfg = self.config
            return self._xgr.compile_json_schema(
                compat_schema_text(value),
                any_whitespace=cfg.any_whitespace,
                max_whitespace_cnt=cfg.max_whitespace_cnt,
                strict_mode=cfg.strict_mode,
            )
        if kind == "ebnf":
            return self._xgr.compile_grammar(value)
        return self._xgr.compile_grammar(choices_ebnf(constraint.choice_list()))


class GrammarMatcher:
    """Per request. Mutates only itself; not thread-safe (the scheduler thread owns it).

    Rollback is limited to `max_rollback_tokens` steps; `accept_string` counts as one step.
    """

    def __init__(
        self,
        compiled: CompiledGrammar,
        stop_token_ids: Sequence[int],
        max_rollback_tokens: int = 16,
        guard: Utf8Guard | None = None,
        *,
        special_token_ids: Sequence[int] = (),
    ) -> None:
        self.compiled = compiled
        self.stop_token_ids = list(stop_token_ids)
        self.special_token_ids = list(special_token_ids)
        self.max_rollback_tokens = max_rollback_tokens
        self.dead_end = False
        self._matcher = xgr.GrammarMatcher(compiled.handle)
        self._guard = guard
        self._steps = 0
        self._utf8_states: deque[int] = deque(maxlen=max_rollback_tokens + 1)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` (a CPU tensor from
        `allocate_bitmask`). If nothing is allowed (a dead end, or already terminated) only the
        stop tokens are set, so the row never masks everything; a dead end sets `dead_end`
        (the stop token is then rejected by `accept_token`). Special tokens are never allowed
        as grammar text (some xgrammar releases match a literal that spells one); stop tokens
        only once the grammar is complete."""
        if not self._matcher.is_terminated():
            self._matcher.fill_next_token_bitmask(bitmask, row)
            self._mask_special_tokens(bitmask[row])
            if self._guard is not None:
                self._guard.restrict(bitmask[row], self._utf8_state())
            if bool(bitmask[row].any()):
                return
            self.dead_end = True
        bitmask[row].zero_()
        for token_id in self.stop_token_ids:
            bitmask[row, token_id // 32] |= _bit(token_id % 32)

    def _mask_special_tokens(self, row: torch.Tensor) -> None:
        keep = set(self.stop_token_ids) if self._matcher.is_completed() else set()
        for token_id in self.special_token_ids:
            if token_id not in keep:
                row[token_id // 32] &= ~_bit(token_id % 32)

    def accept_token(self, token_id: int) -> bool:
        """Advance by one token; False (state unchanged) if the grammar does not allow it."""
        token_id = int(token_id)
        state = self._utf8_state()
        if self._guard is not None:
            state = self._guard.next_state(state, token_id)
        if state is None or not self._matcher.accept_token(token_id):
            return False
        self._record_step(state)
        return True

    def accept_string(self, text: str) -> bool:
        """Advance by a whole string (one rollback step); False (state unchanged) if not allowed."""
        if not self._matcher.accept_string(text):
            return False
        self._record_step(self._utf8_state() if not text else BOUNDARY)
        return True

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` steps; at most `rollback_limit()`."""
        if num_tokens < 0 or num_tokens > self.rollback_limit():
            raise ValueError(f"cannot roll back {num_tokens} steps (limit {self.rollback_limit()})")
        if num_tokens:
            self._matcher.rollback(num_tokens)
            self._steps -= num_tokens
            for _ in range(num_tokens):
                self._utf8_states.pop()
            self.dead_end = False

    def rollback_limit(self) -> int:
        """How many steps `rollback` can undo now."""
        return min(self._steps, self.max_rollback_tokens)

    def is_terminated(self) -> bool:
        """Grammar complete and the stop token accepted."""
        return self._matcher.is_terminated()

    def can_finish(self) -> bool:
        """EOS/stop would be allowed now."""
        return not self._matcher.is_terminated() and self._matcher.is_completed()

    def jump_forward_string(self) -> str:
        """Text the grammar forces next ('' if none); never ends inside a UTF-8 character."""
        if self._matcher.is_terminated():
            return ""
        try:
            return self._matcher.find_jump_forward_string()
        except UnicodeDecodeError as e:
            return e.object[: e.start].decode("utf-8")

    def _utf8_state(self) -> int:
        return self._utf8_states[-1] if self._utf8_states else BOUNDARY

    def _record_step(self, utf8_state: int) -> None:
        self._steps += 1
        self._utf8_states.append(utf8_state)


def _failed(future: Future) -> bool:
    return future.done() and (future.cancelled() or future.exception() is not None)


def choices_ebnf(choices: Sequence[str]) -> str:
    """An EBNF grammar matching exactly one of `choices` (JSON string escapes are valid EBNF)."""
    return "root ::= " + " | ".join(_ebnf_literal(c) for c in choices)


def allocate_bitmask(batch: int, vocab_size: int) -> torch.Tensor:
    """A CPU int32 [batch, ceil(vocab_size / 32)] bitmask with every token allowed."""
    return xgr.allocate_token_bitmask(batch, vocab_size)


def apply_bitmask(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int] | None = None
) -> None:
    """Set disallowed logits to -inf in place (all rows, or only `rows`). The bitmask is copied
    to the logits' device if needed; it must cover every logit column."""
    if bitmask.shape[-1] * 32 < logits.shape[-1]:
        raise ValueError(
            f"bitmask covers {bitmask.shape[-1] * 32} tokens, logits have {logits.shape[-1]}"
        )
    if bitmask.device != logits.device:
        bitmask = bitmask.to(logits.device, non_blocking=True)
    indices = list(rows) if rows is not None else None
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[-1], indices=indices)


def bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, vocab_size] bool allowed-mask from a packed bitmask (same device)."""
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def _bit(index: int) -> int:
    return (1 << index) - (1 << 32) if index == 31 else 1 << index


def _ebnf_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _first_step_is_empty(compiled: CompiledGrammar, stop_ids: Sequence[int], vocab: int) -> bool:
    matcher = GrammarMatcher(compiled, stop_ids, 0)
    bitmask = allocate_bitmask(1, vocab)
    matcher.fill_bitmask(bitmask, 0)
    return matcher.dead_end


_LOG_PREFIX = re.compile(r"^\s*\[[\d:]+\]\s+\S+:\d+:\s*")
_CHECK_PREFIX = re.compile(r"^Check failed: \(.*?\) is false:\s*")


def _clean_message(error: Exception) -> str:
    """xgrammar's C++ error text without its log-location and check-failed prefixes."""
    text = str(error).strip()
    text = _CHECK_PREFIX.sub("", _LOG_PREFIX.sub("", text))
    return text.splitlines()[0] if text else type(error).__name__
