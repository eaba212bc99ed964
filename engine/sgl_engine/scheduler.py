"""The scheduler: continuous batching over the radix cache, in plain Python.

One step is either a prefill round (new requests and prompt chunks, ordered by longest cached
prefix, with in-round dedup of shared prefixes) or a run round (every running request computes
its pending tokens: one after a sampled token, several after a jump-forward). When the KV pool
runs out, unlocked cache leaves are evicted first; then running requests are retracted back
to the queue with their progress kept. Only the model runner touches tensors.

Chunked prefill: while a long prompt is prefilled chunk by chunk and requests wait, its next
chunk is a quarter of the budget and the rest goes to waiting requests that fit whole (the
chunk takes the whole budget when none can join); each chunk is followed by one run round of
the running requests. So a short request waits for at most the chunk in flight plus a small
one, and then decodes between the chunks instead of behind all of them.

Overlap: while every running request is a plain decode (no grammar, penalties or pending
min_new_tokens) and nothing waits for admission, a decode step is launched before the previous
one's tokens are read back; it takes those tokens on the device, so the host work of one step
(reading tokens, detokenising, finish checks, building the next batch) runs while the device
computes the next. A request that finishes in step N had one more token computed by step N+1;
that token and its slot are dropped when N+1 lands.

Mixed chunks (`enable_mixed_chunk`, opt-in): a prefill round also carries every running
request's pending tokens (one after a sampled token, several after a jump-forward) in the same
extend, within `chunked_prefill_size`, so running requests advance in every pass instead of in a
run round after each chunk. Only when nothing is in flight (a prefill round never overlaps), the
running rows fit in the budget with room to spare, and the pool holds every row without
retracting anyone; otherwise the round runs as without the flag.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from sgl_engine.allocator import SlotAllocator
from sgl_engine.config import EngineConfig
from sgl_engine.errors import CLIENT_ABORT, EngineUnavailableError
from sgl_engine.forward_batch import ForwardMode
from sgl_engine.model_runner import Launched, ModelRunner, SeqInput, SeqOutput
from sgl_engine.processor import RequestProcessor
from sgl_engine.radix_cache import RadixCache
from sgl_engine.request import Req

DECODE_RESERVE = 16
log = logging.getLogger(__name__)


@dataclass
class Counters:
    prefill_tokens: int = 0
    cached_tokens: int = 0
    prompt_tokens: int = 0
    decode_tokens: int = 0
    forward_passes: int = 0
    prefill_passes: int = 0
    retractions: int = 0
    finished: int = 0
    aborted: int = 0
    forced_tokens: int = 0
    sampled_tokens: int = 0
    forward_passes_saved: int = 0
    overlapped_passes: int = 0
    mixed_passes: int = 0
    internal_errors: int = 0


@dataclass
class InFlight:
    """A launched forward pass whose results have not been applied to its requests yet."""

    batch: list[tuple[Req, int]]
    seqs: list[SeqInput]
    launched: Launched
    prefill: bool


class Scheduler:
    """Owns the queue, the running set, the allocator and the radix cache.

    Not thread-safe: the engine calls it from its scheduler thread only. The processor turns
    sampled tokens into text and finish decisions; the scheduler owns every KV slot and lock.
    """

    def __init__(
        self, config: EngineConfig, runner: ModelRunner, processor: RequestProcessor
    ) -> None:
        self.config = config
        self.runner = runner
        self.processor = processor
        self.allocator = SlotAllocator(runner.num_slots)
        self.cache = RadixCache(
            self.allocator.free, page_size=config.page_size, disable=config.disable_radix_cache
        )
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.chunked: Req | None = None
        self.counters = Counters()
        self.touched: list[Req] = []
        self.inflight: InFlight | None = None
        self.progressed = False
        self.run_turn = False  # a chunk was prefilled: the running requests step next
        size = config.chunked_prefill_size
        self.chunk_budget = (
            (4096 if runner.device.type == "cuda" else 1024) if size is None else size
        )
        overlap = config.overlap_schedule
        self.overlap = runner.device.type == "cuda" if overlap is None else overlap

    # ---- queue -------------------------------------------------------------------------
    def add(self, req: Req) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked or self.inflight)

    def abort(self, rid: str, message: str = CLIENT_ABORT) -> Req | None:
        for req in list(self.waiting):
            if req.rid == rid:
                self.waiting.remove(req)
                return self._finish_abort(req, message)
        for req in self.running + ([self.chunked] if self.chunked else []):
            if req.rid == rid:
                return self._finish_abort(req, message)
        return None

    def _finish_abort(self, req: Req, message: str) -> Req:
        req.finish = {"type": "abort", "message": message}
        self.finish(req)
        return req

    # ---- one step ----------------------------------------------------------------------
    def step(self) -> list[Req]:
        """Run (or launch) one forward pass if there is work; returns the requests that changed.
        `progressed` tells whether a pass was launched or landed."""
        self.touched, self.progressed = [], False
        if self.inflight is not None:
            if self._can_look_ahead():
                self._look_ahead()
            else:
                self._land(self.inflight)
        else:
            mix = self._mixable()
            reserved = sum(n for _, n in mix)
            batch = [] if self.run_turn and self.running else self._schedule_prefill(reserved)
            self.run_turn = False
            if batch and mix and self._room_for(batch, reserved):
                self.counters.mixed_passes += 1
                self._run(ForwardMode.EXTEND, batch + mix, prefill=True)
            elif batch:
                # with mixing on, requests that start running in this pass join the next chunk
                mixes_next = self.config.enable_mixed_chunk and not self.running
                self._run(ForwardMode.EXTEND, batch, prefill=True)
                self.run_turn = self.chunked is not None and not mixes_next
            elif self.running:
                self._run_running()
        touched, self.touched = self.touched, []
        return touched

    def _prefix_limit(self, req: Req) -> int:
        limit = req.seq_len - 1
        if req.wants_input_logprobs():
            limit = min(limit, max(req.logprob_start_len - 1, 0))
        return limit

    def _cached_len(self, req: Req) -> int:
        return len(self.cache.match_prefix(req.fill_ids[: self._prefix_limit(req)]).indices)

    def _order_waiting(self) -> tuple[list[Req], dict[int, int]]:
        """The queue in admission order, and each request's cached prefix length (by id), which
        the in-round dedup reuses rather than matching again."""
        reqs = list(self.waiting)
        if self.cache.disable:
            return reqs, {}
        cached = {id(r): self._cached_len(r) for r in reqs} if len(reqs) > 1 else {}
        if self.config.schedule_policy == "lpm" and cached:
            reqs.sort(key=lambda r: -cached[id(r)])
        return reqs, cached

    # ---- mixed chunks: running requests' pending tokens ride along a prefill pass -----------
    def _mixable(self) -> list[tuple[Req, int]]:
        """The running requests' pending rows if this round may mix them into its prefill pass
        (`enable_mixed_chunk`, and they take at most half of the budget); else []."""
        if not self.config.enable_mixed_chunk or not self.running or self.run_turn:
            return []
        mix = [(r, r.seq_len - len(r.slots)) for r in self.running]
        if self.chunk_budget > 0 and 2 * sum(n for _, n in mix) > self.chunk_budget:
            return []
        return mix

    def _room_for(self, batch: list[tuple[Req, int]], reserved: int) -> bool:
        """Whether the pool holds the prefill rows plus `reserved` running rows as they stand;
        if not, the running requests step in a run round of their own (which may retract)."""
        planned = sum(n for _, n in batch) + reserved
        return self.allocator.available() + self.cache.evictable_size() >= planned

    def _schedule_prefill(self, reserved: int = 0) -> list[tuple[Req, int]]:
        """The prefill rows of this round; `reserved` tokens of the budget are already taken
        (the running rows of a mixed pass)."""
        budget = self.chunk_budget - reserved if self.chunk_budget > 0 else 1 << 62
        batch: list[tuple[Req, int]] = []
        carried = self.chunked is not None
        if carried:
            req, self.chunked = self.chunked, None
            n = min(req.seq_len - len(req.slots), max(budget // 4, 1) if self.waiting else budget)
            if self._reserve(n, batch):
                batch.append((req, n))
                budget -= n
            else:
                self.chunked = req
                return []
        in_round = RadixCache(lambda _: None)
        for req, _ in batch:
            in_round.insert(req.fill_ids, req.fill_ids)
        ordered, cached = self._order_waiting()
        for req in ordered:
            if budget <= 0 or len(self.running) + len(batch) >= self.config.max_running_requests:
                break
            if not self.processor.grammar_ready(req):
                if req.finished:
                    self.waiting.remove(req)
                    self.finish(req)
                continue
            if not req.admitted and not req.output_ids:
                self._jump_forward(req)
                cached.pop(id(req), None)
                if req.finished:
                    self.waiting.remove(req)
                    self.finish(req)
                    continue
            if (
                batch
                and not self.cache.disable
                and self._shares_pending_prefix(req, in_round, cached)
            ):
                continue
            if carried and req.seq_len - self._known_cached(req, cached) > budget:
                continue  # one request is chunked at a time: beside it, only whole prompts
            n = self._admit(req, budget, batch)
            if n is None:
                break
            self.waiting.remove(req)
            batch.append((req, n))
            in_round.insert(req.fill_ids, req.fill_ids)
            budget -= n
        if carried and len(batch) == 1 and budget > 0:
            self._extend_chunk(batch, budget)
        return batch

    def _known_cached(self, req: Req, cached: dict[int, int]) -> int:
        known = cached.get(id(req))
        return self._cached_len(req) if known is None else known

    def _extend_chunk(self, batch: list[tuple[Req, int]], budget: int) -> None:
        """No waiting request could join: the chunked request takes the whole budget."""
        req, n = batch[0]
        extra = min(req.seq_len - len(req.slots) - n, budget)
        if extra > 0 and self._reserve(extra, batch):
            batch[0] = (req, n + extra)

    def _shares_pending_prefix(
        self, req: Req, in_round: RadixCache, cached: dict[int, int]
    ) -> bool:
        cached_len = self._known_cached(req, cached)
        shared = len(in_round.match_prefix(req.fill_ids[: self._prefix_limit(req)]).indices)
        return shared - cached_len >= self.config.in_batch_prefix_min

    def _admit(self, req: Req, budget: int, batch: list[tuple[Req, int]]) -> int | None:
        m = self.cache.match_prefix(req.fill_ids[: self._prefix_limit(req)])
        self.cache.inc_lock_ref(m.last_node)
        n = min(req.seq_len - len(m.indices), budget)
        if not self._reserve(n, batch, req):
            self.cache.dec_lock_ref(m.last_node)
            return None
        req.slots, req.prefix_len, req.last_node = list(m.indices), len(m.indices), m.last_node
        if not req.admitted:
            req.admitted = True
            req.cached_tokens = len(m.indices)
            self.counters.cached_tokens += len(m.indices)
            self.counters.prompt_tokens += len(req.input_ids)
        return n

    def _reserve(self, n: int, batch: list[tuple[Req, int]], req: Req | None = None) -> bool:
        """Admission control: room for `n` new tokens plus some decode headroom for everyone."""
        running = self.running + [r for r, _ in batch] + ([req] if req else [])
        headroom = sum(
            min(r.params.max_new_tokens - len(r.output_ids), DECODE_RESERVE) for r in running
        )
        free = self.allocator.available() + self.cache.evictable_size()
        planned = n + sum(m for _, m in batch)
        if not batch and not self.running:
            return free >= planned
        return free >= planned + max(headroom, 0)

    def _alloc(self, n: int) -> list[int] | None:
        if self.allocator.available() < n:
            self.cache.evict(n - self.allocator.available())
        return self.allocator.alloc(n)

    # ---- running requests ----------------------------------------------------------------
    def _run_running(self) -> None:
        while True:
            need = sum(r.seq_len - len(r.slots) for r in self.running)
            if self.allocator.available() + self.cache.evictable_size() >= need:
                break
            if len(self.running) == 1:
                self._finish_abort(
                    self.running[0], "KV cache exhausted: the request does not fit in the KV pool"
                )
                return
            self._retract_one()
        batch = [(r, r.seq_len - len(r.slots)) for r in self.running]
        mode = ForwardMode.DECODE if all(n == 1 for _, n in batch) else ForwardMode.EXTEND
        self._run(mode, batch, prefill=False)

    def _retract_one(self) -> None:
        self.retract(min(self.running, key=lambda r: (len(r.output_ids), -len(r.input_ids))))

    def retract(self, req: Req) -> None:
        """Send a request back to the front of the queue; its computed KV stays in the cache."""
        if req in self.running:
            self.running.remove(req)
        if self.chunked is req:
            self.chunked = None
        self._release(req)
        if req not in self.waiting:
            self.waiting.appendleft(req)
        self.counters.retractions += 1

    def fail_all(self, message: str) -> list[Req]:
        """Abort every request (after an unexpected error in a step); the engine goes on."""
        reqs = list(self.waiting) + self.running + ([self.chunked] if self.chunked else [])
        self.counters.internal_errors += 1
        self.waiting.clear()
        if self.inflight is not None:
            for s in self.inflight.seqs:
                self.allocator.free(s.new_slots)
            self.inflight = None
        for req in reqs:
            if not req.finished:
                self._finish_abort(req, message)
        return reqs

    def _alloc_each(self, counts: list[int]) -> list[list[int]] | None:
        """`counts[i]` slots for each i, or None (nothing kept) if the pool cannot hold them."""
        allocated: list[list[int]] = []
        for n in counts:
            slots = self._alloc(n)
            if slots is None:
                for got in allocated:
                    self.allocator.free(got)
                return None
            allocated.append(slots)
        return allocated

    def _alloc_batch(self, batch: list[tuple[Req, int]]) -> list[list[int]] | None:
        """Slots for every request of the batch, or None after sending them all back to the
        queue (progress kept) if the pool cannot hold them. Admission control should prevent
        that; if it ever fails, nothing is lost."""
        allocated = self._alloc_each([n for _, n in batch])
        if allocated is None:
            for req, _ in reversed(batch):
                self.retract(req)
        return allocated

    # ---- forward -------------------------------------------------------------------------
    def _run(self, mode: ForwardMode, batch: list[tuple[Req, int]], prefill: bool) -> None:
        allocated = self._alloc_batch(batch)
        if allocated is None:
            return
        seqs = [
            self._seq_input(req, n, slots) for (req, n), slots in zip(batch, allocated, strict=True)
        ]
        running = {id(r) for r in self.running}
        for (req, _), s in zip(batch, seqs, strict=True):
            s.running = not prefill or id(req) in running
        sampled = [req for (req, _), s in zip(batch, seqs, strict=True) if s.sample is not None]
        bitmask = (lambda: self.processor.fill_bitmask(sampled)) if sampled else None
        flight = self._launch(mode, batch, seqs, prefill, bitmask)
        if flight is None:
            return
        if prefill or mode is not ForwardMode.DECODE or not self._overlappable(batch):
            self._land(flight)
        else:
            self.inflight = flight

    def _launch(
        self,
        mode: ForwardMode,
        batch: list[tuple[Req, int]],
        seqs: list[SeqInput],
        prefill: bool,
        bitmask=None,
        input_ids=None,
    ) -> InFlight | None:
        self.progressed = True
        try:
            launched = self.runner.launch(mode, seqs, bitmask, input_ids)
        except Exception as exc:  # the batch fails, the engine keeps serving
            self._fail_batch(batch, seqs, exc)
            return None
        return InFlight(batch, seqs, launched, prefill)

    def _fail_batch(
        self, batch: list[tuple[Req, int]], seqs: list[SeqInput], exc: Exception
    ) -> None:
        rids = [req.rid for req, _ in batch]
        self.counters.internal_errors += 1
        message = f"internal error in the forward pass ({type(exc).__name__}); see the server log"
        if isinstance(exc, EngineUnavailableError):  # already logged once, where it happened
            message = str(exc)
            log.warning("engine unavailable; aborting requests %s", rids)
        else:
            log.error("forward pass failed; aborting requests %s", rids, exc_info=exc)
        for (req, _), s in zip(batch, seqs, strict=True):
            self.allocator.free(s.new_slots)
            if not req.finished:
                self._finish_abort(req, message)
            self.running = [r for r in self.running if r is not req]
            if req not in self.touched:
                self.touched.append(req)

    def _land(self, flight: InFlight) -> None:
        """Apply a launched pass's results; requests finished meanwhile drop theirs."""
        if self.inflight is flight:
            self.inflight = None
        self.progressed = True
        try:
            outs = self.runner.collect(flight.launched)
        except Exception as exc:  # noqa: BLE001 -- as for a failing launch
            self._fail_batch(flight.batch, flight.seqs, exc)
            return
        self.counters.forward_passes += 1
        self.counters.prefill_passes += flight.prefill
        for (req, n), s, out in zip(flight.batch, flight.seqs, outs, strict=True):
            if req.finished:
                self.allocator.free(s.new_slots)
                continue
            req.slots += s.new_slots
            prefill = flight.prefill and not s.running
            if prefill:
                self.counters.prefill_tokens += n
            else:
                self.counters.decode_tokens += n
            self._after_forward(req, s, out, prefill)

    # ---- overlap: launch step N+1 from step N's sampled ids, then land step N ----------------
    def _overlappable(self, batch: list[tuple[Req, int]]) -> bool:
        if not self.overlap or self.waiting or self.chunked:
            return False
        limit = self.runner.context_length - 1
        return all(
            n == 1
            and req.grammar is None
            and not req.params.has_penalties
            and len(req.output_ids) >= req.params.min_new_tokens
            and req.seq_len < limit
            for req, n in batch
        )

    def _can_look_ahead(self) -> bool:
        flight = self.inflight
        if flight is None or flight.prefill:
            return False
        live = [(r, n) for r, n in flight.batch if not r.finished]
        if not live or {id(r) for r, _ in live} != {id(r) for r in self.running}:
            return False
        return self._overlappable(live)

    def _look_ahead(self) -> None:
        prev = self.inflight
        rows = [i for i, (r, _) in enumerate(prev.batch) if not r.finished]
        reqs = [prev.batch[i][0] for i in rows]
        allocated = self._alloc_each([1] * len(reqs))
        if allocated is None:
            self._land(prev)
            return
        seqs = []
        for i, req, slots in zip(rows, reqs, allocated, strict=True):
            kv = req.slots + prev.seqs[i].new_slots + slots
            seq = SeqInput([-1], len(req.slots) + 1, slots, kv)
            seq.sample = self.processor.sampling_spec(req)
            seqs.append(seq)
        batch = [(req, 1) for req in reqs]
        ids = self.runner.next_ids(prev.launched, rows)
        self.inflight = self._launch(ForwardMode.DECODE, batch, seqs, False, None, ids)
        self.counters.overlapped_passes += self.inflight is not None
        self._land(prev)

    def _seq_input(self, req: Req, n: int, new_slots: list[int]) -> SeqInput:
        start = len(req.slots)
        fill = req.fill_ids
        seq = SeqInput(fill[start : start + n], start, new_slots, req.slots + new_slots)
        if req.wants_input_logprobs():
            first = max(req.logprob_start_len, 1)
            for r in range(n):
                t = start + r + 1
                if first <= t < len(req.input_ids):
                    seq.lp_rows.append(r)
                    seq.lp_targets.append(fill[t])
            seq.lp_top = req.top_logprobs_num
        completes = start + n == req.seq_len
        if completes and len(req.output_ids) < req.params.max_new_tokens:
            seq.sample = self.processor.sampling_spec(req)
        return seq

    def _after_forward(self, req: Req, seq: SeqInput, out: SeqOutput, prefill: bool) -> None:
        for lp, top in zip(out.prompt_logprobs, out.prompt_top, strict=True):
            req.input_logprobs.append(lp)
            req.input_top_logprobs.append(top)
        complete = len(req.slots) == req.seq_len
        if req.finished:
            return
        if not complete:
            self._cache_unfinished(req)
            self.chunked = req
            return
        self.touched.append(req)
        if out.next_id is None:
            req.finish = {"type": "length", "matched": None}
        else:
            self.counters.sampled_tokens += 1
            self.processor.on_token(req, out.next_id, out)
            self._jump_forward(req)
        if req.finished:
            self.finish(req)
            return
        if prefill:
            self._cache_unfinished(req)
            self.running.append(req)

    # ---- jump-forward (forced tokens are prefilled by the next run step in one extend) ------
    def _jump_forward(self, req: Req) -> None:
        """Append the text the request's grammar forces and free the KV of dropped tokens; the
        request may finish (a stop string or a length limit): the caller then finishes it."""
        if not self.config.enable_jump_forward or req.grammar is None or req.finished:
            return
        step = self.processor.jump_forward(req)
        if step is None:
            return
        self.allocator.free(list(step.freed_slots))
        self.counters.forced_tokens += step.forced
        self.counters.forward_passes_saved += step.passes_saved

    # ---- radix cache bookkeeping (SGLang's cache_unfinished_req / cache_finished_req) ----
    def _insert(self, req: Req) -> int:
        ids = req.fill_ids[: len(req.slots)]
        aligned = self.cache.aligned_len(len(ids))
        dup = self.cache.insert(ids[:aligned], req.slots[:aligned])
        if dup > req.prefix_len:
            self.allocator.free(req.slots[req.prefix_len : dup])
        return aligned

    def _cache_unfinished(self, req: Req) -> None:
        if self.cache.disable:
            return
        aligned = self._insert(req)
        m = self.cache.match_prefix(req.fill_ids[:aligned])
        self.cache.inc_lock_ref(m.last_node)
        self.cache.dec_lock_ref(req.last_node)
        req.slots = list(m.indices) + req.slots[aligned:]
        req.prefix_len, req.last_node = len(m.indices), m.last_node

    def _release(self, req: Req) -> None:
        """Give the request's KV back: computed tokens into the tree, the rest to the pool."""
        if req.last_node is None and not req.slots:
            return
        if self.cache.disable:
            self.allocator.free(req.slots)
        else:
            aligned = self._insert(req)
            if aligned < len(req.slots):
                self.allocator.free(req.slots[aligned:])
        if req.last_node is not None:
            self.cache.dec_lock_ref(req.last_node)
        req.slots, req.prefix_len, req.last_node = [], 0, None

    def finish(self, req: Req) -> None:
        """Release a finished (or aborted) request's KV and drop it from every queue."""
        self._release(req)
        if req in self.running:
            self.running.remove(req)
        if self.chunked is req:
            self.chunked = None
        if req.finish and req.finish.get("type") == "abort":
            self.counters.aborted += 1
        else:
            self.counters.finished += 1
        if req not in self.touched:
            self.touched.append(req)

    # ---- maintenance ---------------------------------------------------------------------
    def flush_cache(self) -> bool:
        if self.has_work():
            return False
        self.cache.reset()
        self.allocator.reset()
        return True

    def check_idle_invariants(self) -> None:
        """When idle: every lock released and every slot either free or held by the tree."""
        assert not self.has_work(), "scheduler is not idle"
        self.cache.check_integrity()
        assert self.cache.protected_size() == 0, (
            f"{self.cache.protected_size()} tokens still locked"
        )
        held = self.allocator.available() + self.cache.total_size()
        assert held == self.allocator.size, f"KV slots leaked: {self.allocator.size - held}"
