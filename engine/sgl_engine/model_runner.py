"""The model runner: plain-Python batch plans in, sampled token ids and logprobs out.

This is the only place where the scheduler's lists become tensors (`ForwardBatch`) and back.

Unrolled extends. A small extend of running requests (a run round where some rows jumped forward
and carry several forced tokens), or of prompts that have one new token each (the radix cache
held the rest: a repeated prompt), runs as a decode batch of one row per token: the row for a
sequence's i-th new token reads the sequence's KV up to and including that token. Each layer
stores every row's k/v before attending, so a row sees the tokens before it in the same step:
the same causal attention as the extend, as decode-shaped rows. On CUDA that batch replays a
decode graph (up to the largest captured size) instead of running the model eagerly; the hidden
rows come out in the extend's token order, so logits and sampling read them unchanged. On by
default wherever decode graphs exist (`unroll_extends=False` turns it off): on an H200 it gives
the eager extend's records and turns jump-forward's run rounds from eager passes into graph
replays (benchmarks/RESULTS.md, issue 18). A prompt of more new tokens keeps the extend kernel.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sgl_engine.attention import create_backend, flashinfer_available
from sgl_engine.config import EngineConfig
from sgl_engine.distributed.group import TPGroup
from sgl_engine.forward_batch import ForwardBatch, ForwardMode, to_device
from sgl_engine.kv_cache import KVPool
from sgl_engine.models.loader import build_model
from sgl_engine.models.model_config import ModelConfig
from sgl_engine.sampler import DeviceSample, Sampler, top_logprobs
from sgl_engine.sampling_params import SamplingParams

DEFAULT_GRAPH_MAX_BS = 64

log = logging.getLogger(__name__)

POLL_S = 50e-6


@dataclass
class SampleSpec:
    params: SamplingParams
    output_ids: list[int]
    prompt_ids: list[int]
    generator: torch.Generator | None = None
    banned_ids: list[int] = field(default_factory=list)
    top_logprobs_num: int = 0
    return_logprob: bool = False


@dataclass
class SeqInput:
    """One sequence of a step: `new_ids` at positions `start...`, written to `new_slots`."""

    new_ids: list[int]
    start: int
    new_slots: list[int]
    kv_slots: list[int]
    lp_rows: list[int] = field(default_factory=list)
    lp_targets: list[int] = field(default_factory=list)
    lp_top: int = 0
    sample: SampleSpec | None = None
    running: bool = False  # a running request's pending tokens (a run round), not its prompt


@dataclass
class Launched:
    """A forward pass queued on the device; its sampled ids are copied back asynchronously."""

    seqs: list[SeqInput]
    outs: list[SeqOutput]
    rows: list[int] = field(default_factory=list)
    sampled: DeviceSample | None = None
    host: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None


@dataclass
class SeqOutput:
    next_id: int | None = None
    logprob: float | None = None
    top: list[tuple[float, int]] | None = None
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top: list[list[tuple[float, int]]] = field(default_factory=list)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"dtype must be one of {sorted(table)} or 'auto'")
    return table[name]


class ModelRunner:
    """Owns the model, the KV pool and the attention backend. Called from one thread only.

    With `config.tp_size > 1` this is rank 0: it starts the other ranks (`TensorParallel`) and
    publishes every step to them before running its own shard; a follower rank's runner gets
    its `tp` group and runs `follow` instead of `launch`.
    """

    def __init__(
        self,
        config: EngineConfig,
        model_path: str | None,
        hf_config: Any,
        context_length: int,
        random_weights: bool = False,
        tp: TPGroup | None = None,
    ) -> None:
        self.driver = None
        if config.tp_size > 1 and tp is None:
            from sgl_engine.distributed.driver import TensorParallel

            ModelConfig.from_hf(hf_config).shard(config.tp_size)
            self.driver = TensorParallel(
                config, model_path, hf_config, context_length, random_weights
            )
            tp = self.driver.group
        try:
            self._load(config, model_path, hf_config, context_length, random_weights, tp)
        except BaseException:
            self.shutdown()
            raise
        if self.driver is not None:
            self.driver.ready()

    def _load(self, config, model_path, hf_config, context_length, random_weights, tp) -> None:
        self.tp = tp
        self.device = pick_device(config.device)
        self.dtype = pick_dtype(config.dtype, self.device)
        self.context_length = context_length
        self.model_config = ModelConfig.from_hf(hf_config)
        self.vocab_size = self.model_config.vocab_size
        rank = f"rank {tp.rank}: " if tp is not None else ""
        t0 = time.perf_counter()
        self.model = build_model(
            model_path,
            hf_config,
            self.device,
            self.dtype,
            context_length,
            random_weights,
            config.fused_ops,
            tp,
            config.decode_gemv,
        )
        log.info("%smodel built on %s in %.1f s", rank, self.device, time.perf_counter() - t0)
        hidden = self.model_config.hidden_size
        if tp is not None and tp.enable_fast_paths(
            config.tp_all_reduce, self.dtype, self.device, hidden
        ):
            log.info("%ssmall all-reduces take the one-shot path", rank)
        mc = self.model_config.shard(tp.size if tp is not None else 1)
        self.num_slots = config.max_total_tokens or self._auto_pool_size(config, mc)
        if tp is not None:
            self.num_slots = tp.min_int(self.num_slots)
        self.pool = KVPool(
            self.num_slots, mc.num_layers, mc.num_kv_heads, mc.head_dim, self.dtype, self.device
        )
        name = config.attention_backend
        if name == "auto":
            name = (
                "flashinfer" if self.device.type == "cuda" and flashinfer_available() else "torch"
            )
        self.attention_backend = name
        self.attn = create_backend(
            name, model_config=mc, device=self.device, dtype=self.dtype, page_size=1
        )
        self.sampler = Sampler()
        self.graphs = None
        self.unroll_max_tokens = 0
        self.unrolled_passes = 0
        self.shared_prefix_min = 0
        self.full_kv_lists = False
        max_bs = config.cuda_graph_max_bs
        if max_bs is None:
            max_bs = DEFAULT_GRAPH_MAX_BS if name == "flashinfer" else 0
        log.info("%sKV pool of %d slots, %s attention", rank, self.num_slots, name)
        if max_bs > 0 and name == "flashinfer":
            from sgl_engine.cuda_graph import (
                CASCADE_MIN_PREFIX,
                CudaGraphRunner,
                default_batch_sizes,
            )

            t0 = time.perf_counter()
            cascade = use_cascade(config.cascade_attention, mc)
            self.graphs = CudaGraphRunner(
                self.model,
                self.pool,
                self.attn,
                default_batch_sizes(min(max_bs, config.max_running_requests)),
                self.device,
                context_length,
                cascade=cascade,
            )
            if cascade:
                self.shared_prefix_min = CASCADE_MIN_PREFIX
            if config.unroll_extends is not False:
                self.unroll_max_tokens = self.graphs.sizes[-1]
            log.info(
                "%sCUDA graphs for batch sizes %s captured in %.1f s",
                rank,
                self.graphs.sizes,
                time.perf_counter() - t0,
            )

    def _auto_pool_size(self, config: EngineConfig, mc: ModelConfig) -> int:
        if self.device.type != "cuda":
            return 16384
        free, _ = torch.cuda.mem_get_info(self.device)
        per_token = KVPool.bytes_per_token(mc.num_layers, mc.num_kv_heads, mc.head_dim, self.dtype)
        return max(1024, int(free * config.mem_fraction_static) // per_token)

    def run(
        self, mode: ForwardMode, seqs: list[SeqInput], bitmask: torch.Tensor | None = None
    ) -> list[SeqOutput]:
        """One forward pass plus sampling. Writes KV for every new token into the pool."""
        return self.collect(self.launch(mode, seqs, bitmask))

    @torch.inference_mode()
    def launch(
        self,
        mode: ForwardMode,
        seqs: list[SeqInput],
        bitmask: torch.Tensor | Callable[[], torch.Tensor | None] | None = None,
        input_ids: torch.Tensor | None = None,
    ) -> Launched:
        """Queue one forward pass and its sampling on the device; `collect` reads the result.

        `input_ids` (on the device, one per sequence) replaces the seqs' `new_ids`: a decode step
        can start from the previous step's sampled ids before they have reached the host. Until
        `collect`, only the KV slots of this step are written. `bitmask` (the sampled rows'
        grammar mask) may be a function that makes it: it is called once the forward pass is
        queued, so on CUDA the host fills the mask while the device computes.

        Under tensor parallelism the step's collectives (the forward pass and every logits
        product) run first, in the guard: an error there leaves the ranks out of step, and the
        engine stops serving. What only rank 0 does (the mask, logprobs, sampling) comes after
        them, so an error there fails this step's requests and the ranks stay in step.
        """
        with self._guard():
            if self.driver is not None:
                self.driver.publish(self.driver.plan(mode, seqs, input_ids), input_ids)
            batch = self._build(mode, seqs, input_ids)
            hidden, graph = self._forward(batch, seqs)
            prompt_logits = self._prompt_logits(hidden, seqs)
            rows = [i for i, s in enumerate(seqs) if s.sample is not None]
            logits = self._logits(hidden, batch, rows, graph)
        if callable(bitmask):
            bitmask = bitmask()
        launched = Launched(seqs, [SeqOutput() for _ in seqs])
        self._prompt_logprobs(prompt_logits, seqs, launched.outs)
        one_row_each = batch.num_tokens == len(seqs)
        if graph is not None and one_row_each and bitmask is None and _plain_greedy(seqs):
            sample = DeviceSample(graph.next_ids, graph.logprobs, graph.chosen, graph.packed[2])
            self._ship(sample, launched, list(range(len(seqs))), graph.packed)
        elif rows:
            self._sample(logits, seqs, rows, bitmask, launched)
        return launched

    @torch.inference_mode()
    def follow(
        self,
        mode: ForwardMode,
        seqs: list[SeqInput],
        sampled: list[int],
        input_ids: torch.Tensor | None = None,
    ) -> None:
        """A follower rank's half of rank 0's `launch`: the same forward pass and the same
        logits (their collectives), in the same order, without sampling."""
        batch = self._build(mode, seqs, input_ids)
        hidden, graph = self._forward(batch, seqs)
        self._prompt_logits(hidden, seqs)
        self._logits(hidden, batch, sampled, graph)

    def _forward(self, batch: ForwardBatch, seqs: list[SeqInput]) -> tuple[torch.Tensor, Any]:
        """Hidden states (one row per token of `batch`, in its order), and the graph's outputs
        (logits, greedy pick) when a graph ran. A small extend runs unrolled (module docstring);
        counts those passes in `unrolled_passes`."""
        run = self._unrolled(batch, seqs)
        if self.graphs is not None and self.graphs.can_run(run):
            graph = self.graphs.run(run)
            return graph.hidden, graph
        if run.kv_indptr is None:
            raise ValueError("a split-only decode batch cannot run eagerly")
        self.attn.plan(run)
        return self.model(run, self.pool, self.attn), None

    def _unrolled(self, batch: ForwardBatch, seqs: list[SeqInput]) -> ForwardBatch:
        """`batch` as a decode batch of one row per token, if it is an extend of at most
        `unroll_max_tokens` tokens whose sequences are running or have one new token each;
        else `batch` itself. The rows reuse the extend's token tensors; row (r, i) reads the
        first `start + i + 1` of sequence r's KV indices, gathered on the device from the
        extend's."""
        if batch.mode is not ForwardMode.EXTEND or batch.num_tokens > self.unroll_max_tokens:
            return batch
        if not all(s.running or len(s.new_ids) == 1 for s in seqs):
            return batch
        lens: list[int] = []
        indptr, shifts, offset = [0], [], 0
        for s in seqs:
            for i in range(len(s.new_ids)):
                lens.append(s.start + i + 1)
                shifts.append(offset - indptr[-1])
                indptr.append(indptr[-1] + lens[-1])
            offset += len(s.kv_slots)
        rows, total = len(lens), indptr[-1]
        host = list(range(rows + 1)) + indptr + shifts + lens
        dev = to_device(host, torch.int32, batch.kv_indices.device)
        shift = dev[2 * rows + 2 : 3 * rows + 2].long()
        count = dev[3 * rows + 2 :].long()
        gather = torch.arange(total, device=dev.device) + torch.repeat_interleave(
            shift, count, output_size=total
        )
        self.unrolled_passes += 1
        return ForwardBatch(
            mode=ForwardMode.DECODE,
            input_ids=batch.input_ids,
            positions=batch.positions,
            out_cache_loc=batch.out_cache_loc,
            qo_indptr=dev[: rows + 1],
            kv_indptr=dev[rows + 1 : 2 * rows + 2],
            kv_indices=batch.kv_indices[gather],
            extend_lens=[1] * rows,
            prefix_lens=[n - 1 for n in lens],
            seq_lens=lens,
        )

    def _guard(self):
        return self.driver.guard() if self.driver is not None else contextlib.nullcontext()

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks, if this runner started them (after `release`)."""
        if self.driver is not None:
            self.release()
            self.driver.shutdown()

    def _wait(self, event: Any) -> None:
        """Wait for a launched step's event. A TP engine on the one-shot path polls instead of
        blocking: if a peer dies mid-step, the one-shot kernel spins at its barrier for good
        (it has no timeout and no abort, unlike NCCL), so a blocking wait would never return;
        polling sees the watchdog's failure and raises it, failing the step's requests."""
        if self.driver is None or self.tp is None or self.tp.fast is None:
            event.synchronize()
            return
        from sgl_engine.distributed.driver import TensorParallelError

        while not event.query():
            if self.driver.failure is not None:
                raise TensorParallelError(self.driver.failure)
            time.sleep(POLL_S)

    def release(self) -> None:
        """Drop the CUDA graphs and the one-shot buffer before the process group goes: captured
        collectives and mapped peer memory belong to the communicators being torn down. After a
        rank died they are kept: a graph may still be running a kernel that waits for the dead
        rank, and destroying it could wait too."""
        if self.driver is not None and self.driver.failure is not None:
            return
        self.graphs = None
        if self.tp is not None:
            self.tp.drop_fast_paths()
        gc.collect()

    @torch.inference_mode()
    def collect(self, launched: Launched) -> list[SeqOutput]:
        """Wait for a launched step's sampled tokens and fill in its outputs."""
        if launched.sampled is None:
            return launched.outs
        if launched.ready is not None:
            with self._guard():
                self._wait(launched.ready)
        out = DeviceSample.unpack(launched.host.tolist(), launched.sampled.logprobs)
        specs = [launched.seqs[i].sample for i in launched.rows]
        k = max(s.top_logprobs_num for s in specs)
        tops = top_logprobs(out.logprobs, k) if k > 0 else None
        for j, i in enumerate(launched.rows):
            outs = launched.outs[i]
            outs.next_id = out.next_token_ids[j]
            outs.logprob = out.chosen_logprobs[j]
            if tops is not None:
                outs.top = tops[j][: specs[j].top_logprobs_num]
        return launched.outs

    @torch.inference_mode()
    def next_ids(self, launched: Launched, rows: list[int]) -> torch.Tensor:
        """The sampled ids (still on the device) of the given rows of a launched step."""
        if launched.sampled is None:
            raise ValueError("that step sampled nothing")
        ids = launched.sampled.next_ids
        if rows == list(range(len(launched.rows))):
            return ids
        return ids[to_device(rows, torch.long, ids.device)]

    def _build(
        self, mode: ForwardMode, seqs: list[SeqInput], input_ids: torch.Tensor | None
    ) -> ForwardBatch:
        ids, pos, loc = [], [], []
        for s in seqs:
            if input_ids is None:
                ids.extend(s.new_ids)
            pos.extend(range(s.start, s.start + len(s.new_ids)))
            loc.extend(s.new_slots)
        return ForwardBatch.build(
            mode,
            ids if input_ids is None else input_ids,
            pos,
            loc,
            [len(s.new_ids) for s in seqs],
            [s.start for s in seqs],
            [s.kv_slots for s in seqs],
            self.device,
            *self._split(mode, seqs),
        )

    def _split(self, mode: ForwardMode, seqs: list[SeqInput]) -> tuple[int, bool]:
        """How a batch's KV indices are built: the shared-prefix minimum to split it at, and
        whether the split alone is built (`ForwardBatch`). Only a decode batch that would replay
        a cascade graph (`CudaGraphRunner.cascade_bound`) is split, and then it lists nothing
        else: the graph reads nothing else. Without graphs, a `shared_prefix_min` set by hand
        splits decode batches beside the full lists. `full_kv_lists` (for benchmarks) restores
        the layout before: every decode batch split beside its full lists."""
        if mode is not ForwardMode.DECODE or self.shared_prefix_min <= 0:
            return 0, False
        if self.graphs is None or self.full_kv_lists:
            return self.shared_prefix_min, False
        if self.graphs.cascade_bound([len(s.kv_slots) for s in seqs]):
            return self.shared_prefix_min, True
        return 0, False

    def _prompt_logits(self, hidden, seqs: list[SeqInput]) -> torch.Tensor | None:
        """The logits of the rows whose prompt logprobs are asked for (a collective under TP)."""
        if not any(s.lp_rows for s in seqs):
            return None
        return self.model.logits(hidden[_logprob_rows(seqs)[0]])

    def _logits(self, hidden, batch: ForwardBatch, rows: list[int], graph) -> torch.Tensor | None:
        """The sampled rows' logits: the graph's own, or one logits product (a collective under
        TP, which the followers run too: `follow`)."""
        if not rows:
            return None
        if _logits_in_graph(graph, batch, rows):
            return graph.logits
        return self.model.logits(_last_rows(hidden, batch, rows))

    def _prompt_logprobs(self, logits: torch.Tensor | None, seqs, outs) -> None:
        if logits is None:
            return
        _, targets, owners = _logprob_rows(seqs)
        logprobs = torch.log_softmax(logits, dim=-1)
        tgt = torch.tensor(targets, device=logprobs.device)
        chosen = logprobs.gather(1, tgt[:, None])[:, 0].tolist()
        k = max(s.lp_top for s in seqs)
        tops = top_logprobs(logprobs, k) if k > 0 else [[] for _ in owners]
        for j, i in enumerate(owners):
            outs[i].prompt_logprobs.append(chosen[j])
            outs[i].prompt_top.append(tops[j][: seqs[i].lp_top])

    def _sample(self, logits, seqs, idx: list[int], bitmask, launched: Launched) -> None:
        specs = [seqs[i].sample for i in idx]
        allowed = None
        if bitmask is not None:
            from sgl_engine.grammar import bitmask_to_bool

            packed = to_device(bitmask[: len(idx)], torch.int32, logits.device)
            allowed = bitmask_to_bool(packed, self.vocab_size)
        sampled = self.sampler.on_device(
            logits,
            [s.params for s in specs],
            [s.output_ids for s in specs],
            [s.prompt_ids for s in specs],
            [s.generator for s in specs],
            allowed_mask=allowed,
            banned_ids=[s.banned_ids for s in specs],
        )
        self._ship(sampled, launched, idx, sampled.packed())

    @staticmethod
    def _ship(sampled: DeviceSample, launched: Launched, rows: list[int], packed) -> None:
        """Record the step's sampled rows and queue the copy of `packed` to the host."""
        launched.rows, launched.sampled = rows, sampled
        if packed.device.type == "cuda":
            launched.host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            launched.host.copy_(packed, non_blocking=True)
            launched.ready = torch.cuda.Event()
            launched.ready.record()
        else:
            launched.host = packed


def _plain_greedy(seqs: list[SeqInput]) -> bool:
    """Every row samples greedily from the raw logits and asks for no top logprobs: the graph's
    own argmax is the sampler's answer (its logprobs buffer is overwritten by the next replay,
    so rows wanting top logprobs take the sampler's copy)."""
    for s in seqs:
        spec = s.sample
        if spec is None or spec.top_logprobs_num > 0 or spec.banned_ids:
            return False
        if not spec.params.is_greedy or spec.params.has_penalties:
            return False
    return True


def _logprob_rows(seqs: list[SeqInput]) -> tuple[list[int], list[int], list[int]]:
    """The batch rows whose prompt logprobs are asked for, their target ids, their sequences."""
    qo = [0]
    for s in seqs:
        qo.append(qo[-1] + len(s.new_ids))
    rows, targets, owners = [], [], []
    for i, s in enumerate(seqs):
        rows.extend(qo[i] + r for r in s.lp_rows)
        targets.extend(s.lp_targets)
        owners.extend([i] * len(s.lp_rows))
    return rows, targets, owners


def _last_rows(hidden: torch.Tensor, batch: ForwardBatch, idx: list[int]) -> torch.Tensor:
    """The hidden state of the last new token of each sequence in `idx`."""
    if batch.num_tokens == len(idx):
        return hidden
    last = batch.qo_indptr[1:].long() - 1
    return hidden[last[to_device(idx, torch.long, hidden.device)]]


def _logits_in_graph(graph: Any, batch: ForwardBatch, idx: list[int]) -> bool:
    """Whether the sampled rows' logits are the graph's own (every row samples): then no rank
    computes them again (under tensor parallelism each logits call is a collective)."""
    return graph is not None and batch.num_tokens == len(idx)


def use_cascade(setting: bool | None, mc: ModelConfig) -> bool:
    """`cascade_attention`: None is on for MHA (the split kernels measured faster on an H200 for
    a 7B MHA shape, slower for a GQA one)."""
    return setting if setting is not None else mc.num_heads == mc.num_kv_heads
