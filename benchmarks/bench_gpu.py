"""The paper's workloads on one GPU with a Llama-2-7B-shaped model (random bf16 weights, fixed
output lengths, EOS ignored), each side by side in one run: ours, ours with the radix cache
off, and (for the MMLU-style workload) transformers `generate` and `generate_batch`.

    python benchmarks/bench_gpu.py [--small] [--skip-hf] [--json out.json]

`--small` uses a 2-layer model of the same width for a quick smoke run.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from functools import partial
from pathlib import Path

import torch

LLAMA2_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)

GPU_ENGINE = dict(
    device="cuda",
    dtype="bfloat16",
    random_weights=True,
    attention_backend="flashinfer",
    cuda_graph_max_bs=64,
    chunked_prefill_size=8192,
    mem_fraction_static=0.6,
)


def model_dir(root: Path, small: bool) -> Path:
    from sgl_engine.testing import make_tiny_tokenizer
    from transformers import LlamaConfig

    cfg = dict(LLAMA2_7B, num_hidden_layers=2) if small else LLAMA2_7B
    path = root / ("llama7b-shape-small" if small else "llama7b-shape")
    path.mkdir(parents=True, exist_ok=True)
    LlamaConfig(**cfg, torch_dtype="bfloat16", architectures=["LlamaForCausalLM"]).save_pretrained(
        path
    )
    make_tiny_tokenizer().save_pretrained(path)
    return path


def rand_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 31000) for _ in range(n)]


def mmlu_prompts(rng):
    prefix = rand_ids(rng, 1024)
    return [prefix + rand_ids(rng, 64) for _ in range(64)]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    _sync()
    t = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - t, out


def run_batch(eng, prompts, new):
    sp = {"max_new_tokens": new, "temperature": 0, "ignore_eos": True}
    eng.flush_cache()
    dt, outs = timed(partial(eng.generate, input_ids=prompts, sampling_params=sp))
    return dt, outs


def multi_turn(eng, rng, convs=16, turns=4):
    sp = {"max_new_tokens": 32, "temperature": 0, "ignore_eos": True}
    histories = [rand_ids(rng, 256) for _ in range(convs)]
    eng.flush_cache()

    def go():
        for _ in range(turns):
            for h in histories:
                h.extend(rand_ids(rng, 64))
            outs = eng.generate(input_ids=[list(h) for h in histories], sampling_params=sp)
            for h, o in zip(histories, outs, strict=True):
                h.extend(o["output_ids"])

    return timed(go)[0], convs * turns


def tree_of_thought(eng, rng, roots=8, branch=4, depth=2):
    sp = {"max_new_tokens": 32, "temperature": 0, "ignore_eos": True}
    eng.flush_cache()
    frontier = [rand_ids(rng, 512) for _ in range(roots)]
    calls = 0

    def go():
        nonlocal frontier, calls
        for _ in range(depth):
            prompts = [p + rand_ids(rng, 16) for p in frontier for _ in range(branch)]
            outs = eng.generate(input_ids=prompts, sampling_params=sp)
            calls += len(prompts)
            frontier = [p + o["output_ids"] for p, o in zip(prompts, outs, strict=True)][
                : roots * branch
            ]

    return timed(go)[0], None


def react(eng, rng, n=32):
    trace = rand_ids(rng, 2048)
    prompts = [trace + rand_ids(rng, 32) for _ in range(n)]
    return run_batch(eng, prompts, 32)[0], n


CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "country": {"type": "string", "maxLength": 12},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000000},
        "capital": {"type": "boolean"},
        "continent": {"enum": ["Africa", "Asia", "Europe", "Americas", "Oceania"]},
    },
    "required": ["name", "country", "population", "capital", "continent"],
    "additionalProperties": False,
}


def json_decode(path: Path, common: dict, n: int = 64) -> dict:
    """Records decoded under a JSON schema, jump-forward on vs off (paper's json_decode)."""
    from sgl_engine import Engine

    rng = random.Random(2)
    prompts = [rand_ids(rng, 256) for _ in range(n)]
    sp = {"max_new_tokens": 160, "temperature": 0, "json_schema": CITY_SCHEMA}
    out = {}
    for label, jump in (("jump-forward", True), ("no jump-forward", False)):
        with Engine(str(path), **common, enable_jump_forward=jump) as eng:
            eng.generate(input_ids=prompts[:2], sampling_params=sp)
            before = eng.metrics()
            dt, outs = timed(partial(eng.generate, input_ids=prompts, sampling_params=sp))
            after = eng.metrics()
            out[label] = {
                "req_s": n / dt,
                "forward_passes": after["forward_passes"] - before["forward_passes"],
                "output_tokens": sum(len(o["output_ids"]) for o in outs),
                "forced_tokens": after["forced_tokens"] - before["forced_tokens"],
                "valid": sum(_valid_city(o["text"]) for o in outs),
            }
            eng.check_invariants()
        del eng
        release_gpu_memory()
    return out


def release_gpu_memory() -> None:
    """Let the next engine of the run have the memory of the last one."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _valid_city(text: str) -> bool:
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    props = CITY_SCHEMA["properties"]
    return set(obj) == set(props) and obj["continent"] in props["continent"]["enum"]


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 20) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * reps * nbytes / (time.perf_counter() - t)


def decode_roofline(eng, model_bytes: int) -> dict:
    bw = copy_bandwidth()
    sp = {"max_new_tokens": 256, "temperature": 0, "ignore_eos": True}
    eng.generate(input_ids=[1, 2, 3, 4], sampling_params={**sp, "max_new_tokens": 8})
    dt, _ = timed(lambda: eng.generate(input_ids=[5, 6, 7, 8], sampling_params=sp))
    tok_s = 255 / dt
    roof = bw / model_bytes
    return {
        "copy_bw_TBps": bw / 1e12,
        "roofline_tok_s": roof,
        "ours_tok_s": tok_s,
        "fraction": tok_s / roof,
    }


def hf_baselines(path: Path, prompts, new: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = (
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda")
        if any(path.glob("*.safetensors"))
        else None
    )
    if model is None:
        from transformers import AutoConfig

        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(path), dtype=torch.bfloat16
            )
    return _hf_time(model.eval(), prompts, new)


def _hf_time(model, prompts, new: int) -> dict:
    from transformers import GenerationConfig

    ids = torch.tensor(prompts, device="cuda")
    gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:2], **gen)
        dt_gen, _ = timed(lambda: model.generate(ids, **gen))
    out = {"transformers generate": len(prompts) / dt_gen}
    try:
        cfg = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=0)
        model.generate_batch(inputs=prompts[:2], generation_config=cfg)
        dt_cb, _ = timed(lambda: model.generate_batch(inputs=prompts, generation_config=cfg))
        out["transformers generate_batch"] = len(prompts) / dt_cb
    except Exception as exc:  # noqa: BLE001 -- report, keep the other figures
        out["transformers generate_batch"] = f"failed: {exc!r}"[:200]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--root", default="/tmp/sgl-bench")
    ap.add_argument("--only-json", action="store_true", help="run only the JSON decode workload")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json-requests", type=int, default=64)
    args = ap.parse_args()
    from sgl_engine import Engine

    path = model_dir(Path(args.root), args.small)
    results: dict = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "small": args.small,
    }
    prompts = mmlu_prompts(random.Random(0))
    if args.only_json:
        common = dict(device=args.device, random_weights=True, max_total_tokens=65536)
        if args.device == "cuda":
            common.update(dtype="bfloat16", attention_backend="flashinfer", cuda_graph_max_bs=64)
        results["json decode"] = json_decode(path, common, args.json_requests)
        print(json.dumps(results, indent=1, default=str))
        return
    if not args.skip_hf:
        results.update(hf_baselines(path, prompts, 16))
        torch.cuda.empty_cache()
    common = GPU_ENGINE
    for label, extra in (("ours", {}), ("ours radix off", {"disable_radix_cache": True})):
        with Engine(str(path), **common, **extra) as eng:
            run_batch(eng, prompts[:4], 4)
            dt, outs = run_batch(eng, prompts, 16)
            results[f"{label}: mmlu req/s"] = len(prompts) / dt
            results[f"{label}: mmlu prefill tokens"] = eng.metrics()["prefill_tokens"]
            rng = random.Random(1)
            dt, n = multi_turn(eng, rng)
            results[f"{label}: multi-turn req/s"] = n / dt
            dt, _ = tree_of_thought(eng, rng)
            results[f"{label}: tree-of-thought s"] = dt
            dt, n = react(eng, rng)
            results[f"{label}: react req/s"] = n / dt
            if not extra:
                nbytes = sum(p.numel() * p.element_size() for p in eng.runner.model.parameters())
                results["decode bs1"] = decode_roofline(eng, nbytes)
            eng.check_invariants()
        del eng
        release_gpu_memory()
    results["radix on/off mmlu"] = (
        results["ours: mmlu req/s"] / results["ours radix off: mmlu req/s"]
    )
    text = json.dumps(results, indent=1, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
