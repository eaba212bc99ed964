"""A request as the scheduler sees it: token ids, slots and progress, all plain Python."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from sgl_engine.sampling_params import SamplingParams

_ids = itertools.count()


def new_rid() -> str:
    return f"req-{next(_ids)}-{time.monotonic_ns() % 1_000_000}"


@dataclass(eq=False)
class Req:
    """Mutated only by the scheduler thread once submitted.

    `slots` are the KV slots of `fill_ids[:len(slots)]`; `prefix_len` of them belong to the
    radix tree (locked through `last_node`), the rest are owned by this request.
    """

    rid: str
    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    stream: bool = False
    output_ids: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    prefix_len: int = 0
    last_node: Any = None
    cached_tokens: int = 0
    admitted: bool = False
    finish: dict | None = None
    text: str = ""
    sent_len: int = 0
    detok: Any = None
    detok_fed: int = 0
    stop_matcher: Any = None
    generator: Any = None
    grammar: Any = None
    grammar_future: Any = None
    input_logprobs: list = field(default_factory=list)
    input_top_logprobs: list = field(default_factory=list)
    output_logprobs: list = field(default_factory=list)
    output_top_logprobs: list = field(default_factory=list)
    created: float = field(default_factory=time.monotonic)
    forced_tokens: int = 0  # tokens appended by jump-forward (meta_info["forced_tokens"])

    @property
    def fill_ids(self) -> list[int]:
        return self.input_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        return len(self.input_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish is not None

    def wants_input_logprobs(self) -> bool:
        return self.return_logprob and 0 <= self.logprob_start_len < len(self.input_ids)
