"""Tiny randomly initialised models and a tokenizer built in code, for tests and examples.

Nothing here touches the network: the tokenizer is a byte-level BPE trained on a built-in text,
the models are transformers configs with random weights saved to a local folder.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """The quick brown fox jumps over the lazy dog. A radix tree shares prefixes between keys.
Question: What is the capital of France? Answer: Paris. Question: What is two plus two? Answer: 4.
{"name": "Alice", "age": 31, "email": "alice@example.com", "tags": ["a", "b"], "ok": true}
192.168.0.1 2024-01-31 3.14159 -42 yes no maybe true false null [] {} () <> = + - * / , ; :
Large language models generate text one token at a time; structured generation constrains them.
0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ éàü 你好 🙂
"""

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tiny_tokenizer(vocab_size: int = 400):
    """A byte-level BPE `PreTrainedTokenizerFast` with ChatML specials and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_config(arch: str = "llama", vocab_size: int = 512, **overrides):
    """A small transformers config of the given architecture (llama, qwen2, qwen3, mistral)."""
    from transformers import AutoConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=0,
    )
    if arch in ("qwen3",):
        common["head_dim"] = 16
    common.update(overrides)
    return AutoConfig.for_model(arch, **common)


def make_tiny_model_dir(
    path: str | Path,
    arch: str = "llama",
    seed: int = 0,
    chat_template: str | None = None,
    **overrides,
) -> Path:
    """Save a random `arch` model and the tiny tokenizer (with `chat_template` when given, else
    ChatML) to `path`; returns the folder."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_tokenizer()
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    config = tiny_config(arch, **overrides)
    config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id})
    )
    return path


def shared_prefix_workload(
    n: int,
    prefixes: int,
    prompt_len: tuple[int, int],
    new_tokens: tuple[int, int],
    vocab: tuple[int, int] = (3, 400),
    seed: int = 0,
) -> list[tuple[list[int], int]]:
    """`n` (prompt ids, max_new_tokens) pairs: each prompt starts with one of `prefixes` random
    prefixes (a random share of it, so prompts share prefixes of many lengths) and ends with its
    own tokens; lengths drawn uniformly from the given ranges. The stress workload of issue 18."""
    import random

    rng = random.Random(seed)
    lo, hi = prompt_len
    roots = [[rng.randrange(*vocab) for _ in range(hi)] for _ in range(prefixes)]
    out = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        shared = rng.randint(0, length - 1)
        own = [rng.randrange(*vocab) for _ in range(length - shared)]
        out.append((rng.choice(roots)[:shared] + own, rng.randint(*new_tokens)))
    return out


def submit_concurrently(engine, workload: list[tuple[list[int], int]], threads: int) -> list[dict]:
    """Each request of `workload` submitted on its own from `threads` threads (greedy, EOS
    ignored); the outputs in workload order."""
    from concurrent.futures import ThreadPoolExecutor

    def one(item: tuple[list[int], int]) -> dict:
        ids, new = item
        sp = {"max_new_tokens": new, "temperature": 0, "ignore_eos": True}
        return engine.generate(input_ids=ids, sampling_params=sp)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, workload))


def runner_facts(engine) -> dict:
    """Facts about an engine's model runner, for tests and benchmarks: pass it to
    `engine.inspect`, which runs it where the runner is (a `ProcessEngine`'s child included).
    `weight_bytes` are this rank's (rank 0's) parameters: what one GPU reads per decode step."""
    runner = engine.runner
    tp = runner.tp
    fast = None if tp is None else tp.fast
    fused = None if tp is None else tp.fused
    push = None if tp is None else tp.push
    path = "none" if tp is None else "one_shot" if fast is not None else "device_group"
    if fused is not None:
        path = "fused" if push is None else "push"
    return {
        "weight_bytes": sum(p.numel() * p.element_size() for p in runner.model.parameters()),
        "num_slots": runner.num_slots,
        "all_reduce": path,
        "one_shot_calls": 0 if fast is None else fast.calls,
        "fused_norm_calls": 0 if fused is None else fused.calls,
        "push_norm_calls": 0 if push is None else push.calls,
        "push_rounds": 0 if push is None else int(push.round.item()),
        "device": str(runner.device),
        "decode_gemv": "triton" if _uses_triton_gemv(runner.model) else "cublas",
    }


def fail_once(engine, where: str) -> None:
    """Make rank 0 raise RuntimeError once, for tests of error paths (pass it to
    `engine.inspect`): `where` is "forward" (entering a forward pass; under TP the followers
    were already told to run it) or "bitmask" (filling a step's grammar mask: rank 0's own
    work, after the step's collectives)."""
    targets = {
        "forward": (engine.runner, "_forward"),
        "bitmask": (engine.scheduler.processor, "fill_bitmask"),
    }
    obj, name = targets[where]

    def once(*args, **kwargs):
        delattr(obj, name)  # the class's method again
        raise RuntimeError(f"injected failure ({where})")

    setattr(obj, name, once)


def _uses_triton_gemv(model) -> bool:
    from sgl_engine.models.gemv import gemv

    return any(getattr(m, "gemv", None) is gemv for m in model.modules())


def process_gone(pid: int) -> bool:
    """Whether no process has `pid` any more (signal 0 finds none)."""
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_until(condition, timeout_s: float = 120.0, poll_s: float = 0.05) -> None:
    """Poll `condition()` until it is true; AssertionError after `timeout_s` (a bound for
    tests, so that nothing they wait for can hang them)."""
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g} s waiting"
        time.sleep(poll_s)
