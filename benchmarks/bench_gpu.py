"""The paper's workloads on one GPU with a Llama-2-7B-shaped model (random bf16 weights, fixed
output lengths, EOS ignored), each side by side in one run: ours, ours with the radix cache
off, and (for the MMLU-style workload) transformers `generate` and `generate_batch`.

    python benchmarks/bench_gpu.py [--small] [--skip-hf] [--json out.json] [--no-cascade]
        [--full-kv-lists]

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
    # decode graphs to 256 rows: a JSON run round after jump-forward (~130 tokens over 64 rows,
    # some over 160) then replays a graph, unrolled, instead of running eagerly (model_runner)
    cuda_graph_max_bs=256,
    chunked_prefill_size=8192,
    mem_fraction_static=0.6,
    decode_gemv="triton",
)


def model_dir(root: Path, small: bool) -> Path:
    cfg = dict(LLAMA2_7B, num_hidden_layers=2) if small else LLAMA2_7B
    return llama_dir(root, "llama7b-shape-small" if small else "llama7b-shape", cfg)


def llama_dir(root: Path, name: str, cfg: dict) -> Path:
    """A folder holding a Llama config of shape `cfg` and the tiny test tokenizer (for random
    weights: nothing else is read)."""
    from sgl_engine.testing import make_tiny_tokenizer
    from transformers import LlamaConfig

    path = root / name
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


class Ours:
    """`gen(prompts, new)` on our engine: greedy, EOS ignored; the cache is flushed per workload."""

    def __init__(self, eng) -> None:
        self.eng = eng

    def reset(self) -> None:
        self.eng.flush_cache()

    def prefill_tokens(self) -> int:
        return self.eng.metrics()["prefill_tokens"]

    def __call__(self, prompts, new, **extra):
        sp = {"max_new_tokens": new, "temperature": 0, "ignore_eos": True, **extra}
        return [o["output_ids"] for o in self.eng.generate(input_ids=prompts, sampling_params=sp)]


def run_batch(eng, prompts, new):
    """Flush the cache, then time one greedy batch on our engine: (seconds, output ids)."""
    gen = Ours(eng)
    gen.reset()
    return timed(lambda: gen(prompts, new))


class HFGenerate:
    """transformers `generate` on one (left-padded) batch per call."""

    def __init__(self, model) -> None:
        self.model = model

    def reset(self) -> None:
        pass

    def prefill_tokens(self) -> None:
        return None

    def __call__(self, prompts, new, logits_processor=None, eos=None):
        width = max(len(p) for p in prompts)
        dev = self.model.device
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
        gen = dict(max_new_tokens=new, do_sample=False, pad_token_id=0)
        if logits_processor is None:
            gen.update(min_new_tokens=new, eos_token_id=None)
        else:
            gen.update(logits_processor=logits_processor, eos_token_id=eos)
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=mask, **gen)
        return [row[width:].tolist() for row in out]


class HFBatch(HFGenerate):
    """transformers `generate_batch` (continuous batching, paged KV shared between prefixes)."""

    def __call__(self, prompts, new):
        from transformers import GenerationConfig

        cfg = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=0)
        outs = self.model.generate_batch(inputs=prompts, generation_config=cfg)
        # content does not change transformers' timing; keep each history the right length
        tokens = [list(getattr(o, "generated_tokens", []) or []) for o in outs.values()]
        return [(t + [0] * new)[:new] for t in tokens] + [[0] * new] * (len(prompts) - len(tokens))


def mmlu(gen, rng):
    prompts = mmlu_prompts(rng)
    gen.reset()
    return timed(lambda: gen(prompts, 16))[0], len(prompts)


def multi_turn(gen, rng, convs=16, turns=4):
    histories = [rand_ids(rng, 256) for _ in range(convs)]
    gen.reset()

    def go():
        for _ in range(turns):
            for h in histories:
                h.extend(rand_ids(rng, 64))
            outs = gen([list(h) for h in histories], 32)
            for h, o in zip(histories, outs, strict=True):
                h.extend(o)

    return timed(go)[0], convs * turns


def tree_of_thought(gen, rng, roots=8, branch=4, depth=2):
    gen.reset()
    frontier = [rand_ids(rng, 512) for _ in range(roots)]
    calls = 0

    def go():
        nonlocal frontier, calls
        for _ in range(depth):
            prompts = [p + rand_ids(rng, 16) for p in frontier for _ in range(branch)]
            outs = gen(prompts, 32)
            calls += len(prompts)
            frontier = [p + o for p, o in zip(prompts, outs, strict=True)][: roots * branch]

    return timed(go)[0], calls


def react(gen, rng, n=32):
    trace = rand_ids(rng, 2048)
    prompts = [trace + rand_ids(rng, 32) for _ in range(n)]
    gen.reset()
    return timed(lambda: gen(prompts, 32))[0], n


WORKLOADS = {
    "mmlu": mmlu,
    "multi-turn": multi_turn,
    "tree-of-thought": tree_of_thought,
    "react": react,
}


def run_workloads(label: str, gen, results: dict) -> None:
    """Each workload on fresh prompts of the same seeds; results[label][workload] = req/s."""
    table = results.setdefault(label, {})
    for i, (name, workload) in enumerate(WORKLOADS.items()):
        before = gen.prefill_tokens()
        dt, n = workload(gen, random.Random(10 + i))
        table[name] = {"req_s": n / dt, "seconds": dt}
        if before is not None:
            table[name]["prefill_tokens"] = gen.prefill_tokens() - before
        print(json.dumps({label: {name: table[name]}}), flush=True)


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


def json_prompts(n: int = 64) -> list[list[int]]:
    rng = random.Random(2)
    return [rand_ids(rng, 256) for _ in range(n)]


JSON_PARAMS = {"max_new_tokens": 160, "temperature": 0, "json_schema": CITY_SCHEMA}


def json_ours(eng, prompts) -> dict:
    """Records decoded under CITY_SCHEMA (the paper's json_decode workload) on our engine."""
    eng.generate(input_ids=prompts[:2], sampling_params=JSON_PARAMS)
    eng.flush_cache()
    before = eng.metrics()
    dt, outs = timed(partial(eng.generate, input_ids=prompts, sampling_params=JSON_PARAMS))
    after = eng.metrics()
    eng.check_invariants()
    return {
        "req_s": len(prompts) / dt,
        "forward_passes": after["forward_passes"] - before["forward_passes"],
        "output_tokens": sum(len(o["output_ids"]) for o in outs),
        "forced_tokens": after["forced_tokens"] - before["forced_tokens"],
        "valid": sum(_valid_city(o["text"]) for o in outs),
    }


def json_hf(model, tokenizer, prompts) -> dict:
    """The same records with transformers `generate` under xgrammar's logits processor, with
    the grammar our engine compiles for the schema (same whitespace rules and rewrites)."""
    import xgrammar as xgr
    from sgl_engine.grammar import Constraint, GrammarCompiler

    compiler = GrammarCompiler(tokenizer, model.config.vocab_size)
    compiled = compiler.compile(Constraint("json_schema", json.dumps(CITY_SCHEMA))).handle
    compiler.shutdown()
    stops = compiler.stop_token_ids
    gen = HFGenerate(model)
    gen(prompts[:2], 8, [xgr.contrib.hf.LogitsProcessor(compiled)], stops)
    processor = [xgr.contrib.hf.LogitsProcessor(compiled)]
    dt, outs = timed(lambda: gen(prompts, 160, processor, stops))
    outs = [_until(o, stops) for o in outs]
    texts = tokenizer.batch_decode(outs, skip_special_tokens=True)
    return {
        "req_s": len(prompts) / dt,
        "output_tokens": sum(len(o) for o in outs),
        "valid": sum(_valid_city(t) for t in texts),
    }


def _until(ids: list[int], stops: list[int]) -> list[int]:
    ends = [i for i, t in enumerate(ids) if t in stops]
    return ids[: ends[0]] if ends else ids


def json_decode(path: Path, common: dict, n: int = 64) -> dict:
    """Jump-forward on vs off, each on its own engine."""
    from sgl_engine import Engine

    out = {}
    for label, jump in (("jump-forward", True), ("no jump-forward", False)):
        with Engine(str(path), **common, enable_jump_forward=jump) as eng:
            out[label] = json_ours(eng, json_prompts(n))
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


def decode_roofline(eng, model_bytes: int, repeats: int = 3) -> dict:
    """Batch-1 greedy decode of 255 tokens against the bytes of the weights over the measured
    copy bandwidth; the median of `repeats` runs, with all of them."""
    bw = copy_bandwidth()
    sp = {"max_new_tokens": 256, "temperature": 0, "ignore_eos": True}
    eng.generate(input_ids=[1, 2, 3, 4], sampling_params={**sp, "max_new_tokens": 8})
    runs = [
        255 / timed(lambda: eng.generate(input_ids=[5, 6, 7, 8], sampling_params=sp))[0]
        for _ in range(repeats)
    ]
    tok_s = sorted(runs)[len(runs) // 2]
    roof = bw / model_bytes
    return {
        "copy_bw_TBps": bw / 1e12,
        "roofline_tok_s": roof,
        "ours_tok_s": tok_s,
        "runs_tok_s": runs,
        "fraction": tok_s / roof,
    }


def repeated(fn, repeats: int = 3) -> dict:
    """`fn()` returns a dict with req_s: the first run's dict plus every run's req_s."""
    outs = [fn() for _ in range(repeats)]
    return {**outs[0], "req_s_runs": [o["req_s"] for o in outs]}


def load_hf(path: Path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    with torch.device(GPU_ENGINE["device"]):
        model = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(path), dtype=torch.bfloat16
        )
    return model.eval(), AutoTokenizer.from_pretrained(path)


def ours(
    path: Path, label: str, extra: dict, results: dict, workloads: bool = True, runner=None
) -> None:
    """`runner` (attribute: value) is set on the engine's model runner before any request."""
    from sgl_engine import Engine
    from sgl_engine.testing import runner_facts

    with Engine(str(path), **GPU_ENGINE, **extra) as eng:
        for name, value in (runner or {}).items():
            eng._call(partial(setattr, eng.runner, name, value))
        run_batch(eng, mmlu_prompts(random.Random(0))[:4], 4)
        if workloads:
            run_workloads(label, Ours(eng), results)
            runs = [mmlu(Ours(eng), random.Random(10)) for _ in range(3)]
            results[label]["mmlu"]["req_s_runs"] = [n / dt for dt, n in runs]
        results.setdefault(label, {})["json"] = repeated(partial(json_ours, eng, json_prompts()))
        print(json.dumps({label: {"json": results[label]["json"]}}), flush=True)
        if label == "ours":
            nbytes = eng.inspect(runner_facts)["weight_bytes"]
            results["decode bs1"] = decode_roofline(eng, nbytes)
            print(json.dumps({"decode bs1": results["decode bs1"]}), flush=True)
        eng.check_invariants()
    del eng
    release_gpu_memory()


def transformers_baselines(path: Path, results: dict) -> None:
    model, tokenizer = load_hf(path)
    warm = mmlu_prompts(random.Random(0))[:2]
    for label, gen in (
        ("transformers generate", HFGenerate(model)),
        ("transformers generate_batch", HFBatch(model)),
    ):
        try:
            gen(warm, 4)
            run_workloads(label, gen, results)
        except Exception as exc:  # noqa: BLE001 -- report, keep the other figures
            results.setdefault(label, {})["failed"] = f"{exc!r}"[:300]
    results["transformers generate"]["json"] = json_hf(model, tokenizer, json_prompts())
    results["transformers generate_batch"]["json"] = "n/a: generate_batch takes no logits processor"
    print(json.dumps({"transformers generate": {"json": results["transformers generate"]["json"]}}))
    del model
    release_gpu_memory()


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--root", default="/tmp/sgl-bench")
    ap.add_argument("--only-json", action="store_true", help="run only the JSON decode workload")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json-requests", type=int, default=64)
    ap.add_argument(
        "--no-cascade",
        action="store_true",
        help="also run ours with cascade_attention off (the 7B shape is MHA: on by default)",
    )
    ap.add_argument(
        "--full-kv-lists",
        action="store_true",
        help="also run ours with the old KV-index layout (every decode batch lists its full "
        "slots beside the cascade split: runner.full_kv_lists; host_step.py measures the host)",
    )
    args = ap.parse_args()
    path = model_dir(Path(args.root), args.small)
    results: dict = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "small": args.small,
    }
    if args.only_json:
        common = dict(device=args.device, random_weights=True, max_total_tokens=65536)
        if args.device == "cuda":
            common.update(
                dtype="bfloat16",
                attention_backend="flashinfer",
                cuda_graph_max_bs=GPU_ENGINE["cuda_graph_max_bs"],
            )
        results["json decode"] = json_decode(path, common, args.json_requests)
        print(json.dumps(results, indent=1, default=str))
        return
    ours(path, "ours", {}, results)
    ours(path, "ours radix off", {"disable_radix_cache": True}, results)
    ours(path, "ours no jump-forward", {"enable_jump_forward": False}, results, workloads=False)
    if args.no_cascade:
        ours(path, "ours no cascade", {"cascade_attention": False}, results)
        results["cascade on/off mmlu"] = (
            results["ours"]["mmlu"]["req_s"] / results["ours no cascade"]["mmlu"]["req_s"]
        )
    if args.full_kv_lists:
        ours(path, "ours full kv lists", {}, results, runner={"full_kv_lists": True})
        results["cascade-bound builds on/off mmlu"] = (
            results["ours"]["mmlu"]["req_s"] / results["ours full kv lists"]["mmlu"]["req_s"]
        )
    if not args.skip_hf:
        transformers_baselines(path, results)
    jf, nojf = results["ours"]["json"], results["ours no jump-forward"]["json"]
    results["jump-forward speedup"] = {
        "median": _median(jf["req_s_runs"]) / _median(nojf["req_s_runs"]),
        "worst": min(jf["req_s_runs"]) / max(nojf["req_s_runs"]),
    }
    results["radix on/off mmlu"] = (
        results["ours"]["mmlu"]["req_s"] / results["ours radix off"]["mmlu"]["req_s"]
    )
    text = json.dumps(results, indent=1, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
