"""Turn `generate(...)` arguments into validated `Req`s; every error names its field."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from sgl_engine.errors import InvalidRequestError
from sgl_engine.request import Req, new_rid
from sgl_engine.sampling_params import SamplingParams

MAX_TOP_LOGPROBS = 20
"""The default cap on `top_logprobs_num` (as OpenAI's `top_logprobs`); `EngineConfig` can raise it."""


def check_text(name: str, text: str) -> None:
    """Refuse a string that is not valid Unicode text (a lone UTF-16 surrogate such as
    "\\ud800", which JSON can carry but no tokenizer can encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"{name} is not valid Unicode text: {exc.reason} at position {exc.start}", name
        ) from None


def max_token_chars(tokenizer: Any) -> int:
    """The longest vocabulary entry in characters: no token decodes to more, so a text of
    `c` characters needs at least `c / max_token_chars` tokens (a cheap length check)."""
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError):
        return 1 << 16
    return max((len(t) for t in vocab), default=1) or 1


def _check_int_arg(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer, got {type(value).__name__}", name)
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise InvalidRequestError(f"{name} must be {bound}, got {value}", name)
    return value


def _check_unique_rids(rids: list[str]) -> None:
    """No rid twice in one call (the `{rid}-{k}` of n > 1 included): a second channel under
    the same id would leave the first caller waiting forever."""
    seen: set[str] = set()
    for rid in rids:
        check_text("rid", rid)
        if rid in seen:
            raise InvalidRequestError(f"request id {rid!r} appears twice in one call", "rid")
        seen.add(rid)


def _per_request(name: str, value: Any, n: int, scalar_types: tuple[type, ...]) -> list[Any]:
    if isinstance(value, list) and not isinstance(value, scalar_types):
        if len(value) != n:
            raise InvalidRequestError(f"{name} has {len(value)} entries for {n} requests", name)
        return value
    return [value] * n


@dataclass(frozen=True)
class GenerateRequest:
    """The arguments of one `Engine.generate` call, as given (unvalidated: `RequestBuilder`
    checks them). Anything shaped like an engine takes these same arguments, so a front that
    forwards calls (the Ray replicas' `ReplicatedEngine`) takes `GenerateRequest(*args,
    **kwargs)` instead of repeating the signature."""

    prompt: str | list[str] | None = None
    sampling_params: dict | list[dict] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    return_logprob: bool | list[bool] = False
    logprob_start_len: int | list[int] = -1
    top_logprobs_num: int | list[int] = 0
    stream: bool = False
    rid: str | list[str] | None = None

    def prompts(self) -> tuple[Any, bool]:
        """The call's prompts as given, one per request (texts, or token-id lists; nothing
        when neither was given), and whether the call was for one prompt (a result, not a
        list, comes back)."""
        if self.prompt is not None:
            single = isinstance(self.prompt, str)
            return ([self.prompt] if single else self.prompt), single
        if self.input_ids is None:
            return [], False
        ids = self.input_ids
        single = bool(ids) and all(isinstance(t, int) for t in ids)
        return ([ids] if single else ids), single

    def forwarded(self) -> dict[str, Any]:
        """Keyword arguments for `Engine.generate`, `stream` left out (the forwarding front
        picks the streaming call itself)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "stream"}


class RequestBuilder:
    """Validates and tokenises in the caller's thread; holds no request state."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        context_length: int,
        pool_size: int,
        grammar: Any = None,
        max_top_logprobs: int = MAX_TOP_LOGPROBS,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.pool_size = pool_size
        self.grammar = grammar
        self.max_top_logprobs = max_top_logprobs
        self.max_prompt_chars = min(context_length, pool_size) * max_token_chars(tokenizer) * 2
        self._tok_lock = threading.Lock()

    def build(self, request: GenerateRequest) -> tuple[list[Req], bool]:
        """Returns the requests (n > 1 expands in place) and whether the call was for one."""
        ids_list, single = self._inputs(request)
        n = len(ids_list)
        sps = _per_request("sampling_params", request.sampling_params, n, (dict,))
        lps = _per_request("return_logprob", request.return_logprob, n, (bool,))
        starts = _per_request("logprob_start_len", request.logprob_start_len, n, (int,))
        tops = _per_request("top_logprobs_num", request.top_logprobs_num, n, (int,))
        rid, stream = request.rid, request.stream
        rids = _per_request("rid", rid, n, (str,)) if rid is not None else [None] * n
        for r in rids:
            if r is not None and (not isinstance(r, str) or not r):
                raise InvalidRequestError("rid must be a non-empty string", "rid")
        reqs: list[Req] = []
        for i in range(n):
            params = SamplingParams.from_dict(sps[i])
            params.validate_vocab(self.vocab_size)
            self._check_lengths(ids_list[i], params)
            _check_int_arg("logprob_start_len", starts[i], -1, len(ids_list[i]))
            _check_int_arg("top_logprobs_num", tops[i], 0, self.max_top_logprobs)
            for k in range(params.n):
                p = (
                    params
                    if params.n == 1
                    else replace(params, n=1, seed=None if params.seed is None else params.seed + k)
                )
                r = rids[i] if params.n == 1 else (f"{rids[i]}-{k}" if rids[i] else None)
                reqs.append(
                    self._req(ids_list[i], p, bool(lps[i]), int(starts[i]), int(tops[i]), stream, r)
                )
        if stream and len(reqs) != 1:
            raise InvalidRequestError("stream=True takes a single request with n=1", "stream")
        if rid is not None:
            _check_unique_rids([r.rid for r in reqs])
        return reqs, single and len(reqs) == 1

    def _inputs(self, request: GenerateRequest) -> tuple[list[list[int]], bool]:
        if (request.prompt is None) == (request.input_ids is None):
            raise InvalidRequestError("give exactly one of prompt or input_ids", "prompt")
        items, single = request.prompts()
        if request.prompt is not None:
            texts = items
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise InvalidRequestError("prompt must be a string or a list of strings", "prompt")
            if not texts or any(not t for t in texts):
                raise InvalidRequestError("prompt must not be empty", "prompt")
            for t in texts:
                self.check_prompt_text(t)
            return self.encode(texts), single
        lists = items
        if not isinstance(lists, list) or not lists:
            raise InvalidRequestError(
                "input_ids must be a non-empty list of token ids", "input_ids"
            )
        for ids in lists:
            self._check_ids(ids)
        return [list(ids) for ids in lists], single

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Tokenise `texts` (unchecked) under the tokenizer lock."""
        with self._tok_lock:
            return [self.tokenizer.encode(t) for t in texts]

    @property
    def max_prompt_tokens(self) -> int:
        """A prompt must have fewer tokens than this (the context, and the KV pool)."""
        return min(self.context_length, self.pool_size)

    def check_prompt_text(self, text: str, name: str = "prompt") -> None:
        """Cheap checks before tokenising: valid Unicode, and not so long that it cannot fit
        in the context whatever the tokenizer makes of it."""
        check_text(name, text)
        if len(text) > self.max_prompt_chars:
            raise InvalidRequestError(
                f"{name} has {len(text)} characters, more than a context of "
                f"{self.context_length} tokens can hold",
                name,
            )

    def _check_ids(self, ids: Sequence[Any]) -> None:
        if not isinstance(ids, list) or not ids:
            raise InvalidRequestError(
                "input_ids must be a non-empty list of token ids", "input_ids"
            )
        if all(type(t) is int for t in ids) and min(ids) >= 0 and max(ids) < self.vocab_size:
            return
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size:
                raise InvalidRequestError(
                    f"input_ids contains {t!r}, outside the vocabulary [0, {self.vocab_size})",
                    "input_ids",
                )

    def _check_lengths(self, ids: list[int], params: SamplingParams) -> None:
        if len(ids) >= self.context_length:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens; the context length is {self.context_length}",
                "prompt",
            )
        if len(ids) + 1 > self.pool_size:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens; the KV pool holds {self.pool_size}", "prompt"
            )

    def _req(self, ids, params, return_logprob, start, top, stream, rid) -> Req:
        req = Req(
            rid=rid or new_rid(),
            input_ids=list(ids),
            params=params,
            return_logprob=return_logprob,
            logprob_start_len=start,
            top_logprobs_num=top,
            stream=stream,
        )
        constraint = self._constraint(params)
        if constraint is not None:
            if self.grammar is None:
                raise InvalidRequestError("constrained decoding needs xgrammar", "sampling_params")
            req.grammar_future = self.grammar.submit(constraint)
        return req

    def _constraint(self, params: SamplingParams) -> Any:
        """The request's constraint, or None. A field counts as given when it is not None, so
        `regex=""` constrains the output to the empty string instead of being ignored.
        (`response_format` is an API-level field: the server and adapters translate it into
        `json_schema` before it reaches the engine.)"""
        fields = (params.regex, params.json_schema, params.ebnf, params.choices)
        if all(f is None for f in fields):
            return None
        from sgl_engine.grammar import Constraint

        return Constraint.from_request(
            regex=params.regex,
            json_schema=params.json_schema,
            ebnf=params.ebnf,
            choices=None if params.choices is None else list(params.choices),
        )
