"""Unrolled extends (see model_runner's docstring): the run round after rows jumped forward runs
as decode rows of one token each and gives what the extend gives; so does a prompt with one new
token (a repeated prompt); prompts of more new tokens are never unrolled."""

from __future__ import annotations

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000000},
        "capital": {"type": "boolean"},
        "continent": {"enum": ["Africa", "Asia", "Europe", "Americas", "Oceania"]},
    },
    "required": ["name", "population", "capital", "continent"],
    "additionalProperties": False,
}


def _engines(make_engine, path):
    plain, unrolled = make_engine(path), make_engine(path)
    unrolled.runner.unroll_max_tokens = 256  # CPU has no graphs: unroll as on CUDA
    assert plain.runner.unroll_max_tokens == 0
    return plain, unrolled


def test_jump_forward_run_rounds_unrolled_give_the_same_records(make_engine, tiny_llama):
    plain, unrolled = _engines(make_engine, tiny_llama)
    prompts = [f"City record {i}:" for i in range(6)]
    sp = {"max_new_tokens": 96, "temperature": 0, "json_schema": SCHEMA}
    want = plain.generate(prompts, sp)
    got = unrolled.generate(prompts, sp)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert [o["text"] for o in got] == [o["text"] for o in want]
    assert sum(o["meta_info"]["forced_tokens"] for o in got) > 0
    assert unrolled.metrics()["forward_passes"] == plain.metrics()["forward_passes"]
    assert plain.runner.unrolled_passes == 0
    # the prefill round and at least one run round of rows that jumped
    assert unrolled.runner.unrolled_passes > unrolled.metrics()["prefill_passes"]


def test_prompts_of_several_new_tokens_are_never_unrolled(make_engine, tiny_llama):
    plain, unrolled = _engines(make_engine, tiny_llama)
    prompts = ["The quick brown fox", "Question: What is two plus two? Answer:"]
    sp = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}
    kw = {"return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 3}
    got, want = unrolled.generate(prompts, sp, **kw), plain.generate(prompts, sp, **kw)
    keys = ("input_token_logprobs", "input_top_logprobs", "output_token_logprobs")
    for g, w in zip(got, want, strict=True):
        assert g["output_ids"] == w["output_ids"]
        assert [g["meta_info"][k] for k in keys] == [w["meta_info"][k] for k in keys]
    assert unrolled.runner.unrolled_passes == 0


def test_a_repeated_prompt_runs_its_one_new_token_as_a_decode_row(make_engine, tiny_llama):
    """The radix cache holds all of a repeated prompt but its last token, which then runs as a
    one-row decode batch (a graph replay on CUDA, not an eager extend) with the same results,
    logprobs included; a fresh prompt still prefills."""
    plain, unrolled = _engines(make_engine, tiny_llama)
    sp = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
    kw = {"return_logprob": True, "top_logprobs_num": 3}
    outs = {}
    for name, eng in (("plain", plain), ("unrolled", unrolled)):
        outs[name] = [eng.generate("The quick brown fox", sp, **kw) for _ in range(3)]
        eng.check_invariants()
    assert unrolled.runner.unrolled_passes == 2  # the two repeats; the first prompt prefilled
    assert plain.runner.unrolled_passes == 0
    for g, w in zip(outs["unrolled"], outs["plain"], strict=True):
        assert g["output_ids"] == w["output_ids"]
        for key in ("output_token_logprobs", "output_top_logprobs"):
            assert g["meta_info"][key] == w["meta_info"][key] or _close(
                g["meta_info"][key], w["meta_info"][key]
            )
    assert outs["unrolled"][1]["meta_info"]["cached_tokens"] > 0


def _close(a, b, tol: float = 1e-4) -> bool:
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return abs(a - b) <= tol
    return a == b


def test_unrolled_batch_reads_each_tokens_kv_prefix():
    """Row (r, i) of the unrolled batch is sequence r's i-th new token, at its position, written
    to its slot, reading the sequence's KV up to and including that token."""
    import random

    import torch
    from sgl_engine.forward_batch import ForwardBatch, ForwardMode
    from sgl_engine.model_runner import ModelRunner, SeqInput

    rng = random.Random(0)
    seqs = []
    for r in range(9):
        start, n = rng.randrange(1, 40), 1 if r % 3 else rng.randrange(2, 7)
        slots = [rng.randrange(10**6) for _ in range(start + n)]
        new = [rng.randrange(400) for _ in range(n)]
        seqs.append(SeqInput(new, start, slots[start:], slots, running=True))
    runner = ModelRunner.__new__(ModelRunner)
    runner.device, runner.unroll_max_tokens, runner.unrolled_passes = torch.device("cpu"), 64, 0
    runner.shared_prefix_min = 0
    extend = runner._build(ForwardMode.EXTEND, seqs, None)
    got = runner._unrolled(extend, seqs)
    ids, pos, loc, kv = [], [], [], []
    for s in seqs:
        for i, token in enumerate(s.new_ids):
            ids.append(token)
            pos.append(s.start + i)
            loc.append(s.new_slots[i])
            kv.append(s.kv_slots[: s.start + i + 1])
    want = ForwardBatch.build(
        ForwardMode.DECODE, ids, pos, loc, [1] * len(ids), pos, kv, runner.device
    )
    assert got.mode is ForwardMode.DECODE and got.seq_lens == want.seq_lens
    for name in ("input_ids", "positions", "out_cache_loc", "qo_indptr", "kv_indptr", "kv_indices"):
        assert torch.equal(getattr(got, name).long(), getattr(want, name).long()), name
    runner.unroll_max_tokens = extend.num_tokens - 1
    assert runner._unrolled(extend, seqs) is extend
    runner.unroll_max_tokens = extend.num_tokens
    seqs[0].running = False  # a prompt of several new tokens in the batch
    assert runner._unrolled(extend, seqs) is extend
    seqs[0].running, seqs[1].running = True, False  # a prompt of one new token: unrolled too
    assert len(seqs[1].new_ids) == 1 and runner._unrolled(extend, seqs) is not extend
    assert runner.unrolled_passes == 2
