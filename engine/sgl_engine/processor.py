"""Per-request work around the forward pass: sampling inputs, token handling, finish rules, results."""

from __future__ import annotations

import time
from typing import Any

import torch

from sgl_engine.detokenizer import IncrementalDetokenizer, StopMatcher
from sgl_engine.jump import JumpStep, apply_jump
from sgl_engine.model_runner import SampleSpec, SeqOutput
from sgl_engine.request import Req
from sgl_engine.sampler import make_generator


class RequestProcessor:
    """Turns tokens into text and decides when a request is done. Mutates only the `Req`s it
    is handed; called from the scheduler thread only."""

    def __init__(
        self,
        tokenizer: Any,
        eos_ids: set[int],
        context_length: int,
        device: torch.device,
        grammar: Any = None,
        vocab_size: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.context_length = context_length
        self.device = device
        self.grammar = grammar
        self.vocab_size = vocab_size

    def prepare(self, req: Req) -> None:
        req.detok = self._detokenizer(req)
        req.stop_matcher = StopMatcher(req.params.stop, req.params.stop_regex)
        req.generator = make_generator(req.params.seed, self.device)

    def _detokenizer(self, req: Req) -> IncrementalDetokenizer:
        p = req.params
        return IncrementalDetokenizer(
            self.tokenizer, req.input_ids, p.skip_special_tokens, p.spaces_between_special_tokens
        )

    # ---- grammar ---------------------------------------------------------------------------
    def grammar_ready(self, req: Req) -> bool:
        """True once the request's grammar (if any) is compiled and its matcher made; a failed
        compile finishes the request with an abort that says why."""
        fut = req.grammar_future
        if fut is None or req.grammar is not None:
            return True
        if not fut.done():
            return False
        try:
            req.grammar = self.grammar.matcher(fut.result())
        except Exception as exc:  # GrammarError or anything the compiler raised
            req.finish = {"type": "abort", "message": f"invalid constraint: {exc}"}
            return False
        return True

    def fill_bitmask(self, reqs: list[Req]) -> torch.Tensor | None:
        """A bitmask with one row per sampled request (all-allowed for unconstrained rows)."""
        if not any(r.grammar is not None for r in reqs):
            return None
        from sgl_engine.grammar import allocate_bitmask

        mask = allocate_bitmask(len(reqs), self.vocab_size)
        for row, req in enumerate(reqs):
            if req.grammar is not None:
                req.grammar.fill_bitmask(mask, row)
        return mask

    # ---- before the forward pass ----------------------------------------------------------
    def sampling_spec(self, req: Req) -> SampleSpec:
        p = req.params
        banned: list[int] = []
        if len(req.output_ids) < p.min_new_tokens:
            banned = sorted((self.eos_ids if not p.ignore_eos else set()) | set(p.stop_token_ids))
        return SampleSpec(
            params=p,
            output_ids=req.output_ids,
            prompt_ids=req.input_ids,
            generator=req.generator,
            banned_ids=banned,
            top_logprobs_num=req.top_logprobs_num if req.return_logprob else 0,
            return_logprob=req.return_logprob,
        )

    # ---- after the forward pass -----------------------------------------------------------
    def on_token(self, req: Req, token: int, out: SeqOutput) -> None:
        req.output_ids.append(token)
        if req.return_logprob:
            req.output_logprobs.append(out.logprob)
            req.output_top_logprobs.append(out.top)
        searched = len(req.text)
        if _reads_text(req):
            self._sync_text(req)
        if req.grammar is not None and not req.grammar.accept_token(token):
            req.finish = {"type": "abort", "message": _rejection(req.grammar, token)}
            return
        self._check_finish(req, token, searched)
        self._flush_if_finished(req)

    def jump_forward(self, req: Req) -> JumpStep | None:
        """Append the text the request's grammar forces now (see `sgl_engine.jump`), keep its
        text in step, and finish it if a stop string or a length limit is reached. Mutates only
        `req`; the caller frees `JumpStep.freed_slots`."""
        if req.grammar is None or req.finished:
            return None
        searched = len(req.text)
        step = apply_jump(req, self.tokenizer, self.context_length)
        if step is None:
            return None
        if req.detok_fed > len(req.output_ids) - step.forced:  # it saw tokens the jump dropped
            req.detok, req.detok_fed, req.text = self._detokenizer(req), 0, ""
        if _reads_text(req):
            self._sync_text(req)
        self._check_finish(req, None, searched)
        self._flush_if_finished(req)
        return step

    def _sync_text(self, req: Req) -> None:
        """Give the detokeniser the output ids it has not seen. Requests that nobody reads the
        text of before they finish (no stream or stop strings; a grammar works on token ids)
        are detokenised once, at the end, instead of token by token."""
        if req.detok_fed < len(req.output_ids):
            req.text += req.detok.add(req.output_ids[req.detok_fed :])
            req.detok_fed = len(req.output_ids)

    def _flush_if_finished(self, req: Req) -> None:
        if req.finished and not isinstance(req.finish.get("matched"), str):
            self._sync_text(req)
            req.text += req.detok.flush()

    def _check_finish(self, req: Req, token: int | None, searched: int) -> None:
        """Finish rules after a sampled token, or after forced tokens (`token` None)."""
        p = req.params
        n_out = len(req.output_ids)
        stops = token is not None and (
            (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids
        )
        if n_out >= p.min_new_tokens:
            if stops:
                req.finish = {"type": "stop", "matched": token}
                return
            if req.stop_matcher:
                found = req.stop_matcher.find(req.text, searched)
                if found is not None:
                    idx, stop = found
                    req.text = req.text[: idx + (len(stop) if p.no_stop_trim else 0)]
                    req.finish = {"type": "stop", "matched": stop}
                    return
        if req.grammar is not None and req.grammar.is_terminated():
            req.finish = {"type": "stop", "matched": token if stops else None}
            return
        if n_out >= p.max_new_tokens:
            req.finish = {"type": "length", "matched": None}
        elif req.seq_len >= self.context_length:
            req.finish = {"type": "length", "matched": None, "message": self._clamped(p)}

    def _clamped(self, p: Any) -> str:
        """Why a request stopped short of max_new_tokens: the documented clamp."""
        return (
            f"max_new_tokens ({p.max_new_tokens}) was clamped: prompt and output reached the "
            f"context length ({self.context_length} tokens)"
        )

    # ---- results --------------------------------------------------------------------------
    def stream_text(self, req: Req) -> str:
        """The text a stream may show now (held back where a stop string may be starting)."""
        if req.finished or not req.stop_matcher:
            return req.text
        return req.text[: req.stop_matcher.safe_len(req.text)]

    def result(self, req: Req, text: str | None = None) -> dict:
        if text is None:
            self._sync_text(req)
            text = req.text
        meta: dict[str, Any] = {
            "id": req.rid,
            "prompt_tokens": len(req.input_ids),
            "completion_tokens": len(req.output_ids),
            "cached_tokens": req.cached_tokens,
            "forced_tokens": req.forced_tokens,
            "finish_reason": req.finish,
            "e2e_latency": time.monotonic() - req.created,
        }
        if req.return_logprob:
            meta.update(self._logprobs(req))
        return {"text": text, "output_ids": list(req.output_ids), "meta_info": meta}

    def _logprobs(self, req: Req) -> dict:
        inp: list[tuple] = []
        inp_top: list = []
        if req.wants_input_logprobs():
            start = req.logprob_start_len
            ids = req.input_ids[start:]
            lps = list(req.input_logprobs)
            tops = list(req.input_top_logprobs)
            if start == 0:
                lps, tops = [None, *lps], [None, *tops]
            inp = [(lp, t, None) for lp, t in zip(lps, ids, strict=False)]
            inp_top = [_tops(t) for t in tops]
        return {
            "input_token_logprobs": inp,
            "input_top_logprobs": inp_top,
            "output_token_logprobs": [
                (lp, t, None) for lp, t in zip(req.output_logprobs, req.output_ids, strict=False)
            ],
            "output_top_logprobs": [_tops(t) for t in req.output_top_logprobs],
        }


def _reads_text(req: Req) -> bool:
    """Whether the request's text is read before it finishes (streamed or searched for stops)."""
    return bool(req.stream or req.stop_matcher)


def _rejection(grammar: Any, token: int) -> str:
    if getattr(grammar, "dead_end", False):
        return "grammar reached a dead end"
    return f"token {token} was rejected by the grammar"


def _tops(top: list[tuple[float, int]] | None) -> list[tuple[float, int, None]] | None:
    if top is None:
        return None
    return [(lp, t, None) for lp, t in top]
