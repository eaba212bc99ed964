"""GPU path: flashinfer against the torch backend, CUDA graphs against eager, transformers."""

from __future__ import annotations

import pytest
import torch
from sgl_engine.testing import runner_facts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROMPTS = [
    "The quick brown fox",
    "Question: What is the capital of France? Answer:",
    "hi",
    "A radix tree shares prefixes between keys. Large language models generate text",
]
GREEDY = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
BF16_FLASHINFER = dict(device="cuda", dtype="bfloat16", attention_backend="flashinfer")


@pytest.fixture(scope="module")
def gpu_llama(tmp_path_factory):
    """A small random Llama with head_dim 128 (a size flashinfer compiles kernels for)."""
    from sgl_engine.testing import make_tiny_model_dir

    path = tmp_path_factory.mktemp("gpu-llama")
    return str(
        make_tiny_model_dir(
            path,
            hidden_size=512,
            intermediate_size=1024,
            num_attention_heads=4,
            num_key_value_heads=4,
        )
    )


@pytest.fixture(scope="module")
def gpu_qwen3(tmp_path_factory):
    """A small random Qwen3 (q/k norms, so k is a tensor of its own when RoPE runs), head_dim
    128, grouped k/v."""
    from sgl_engine.testing import make_tiny_model_dir

    path = tmp_path_factory.mktemp("gpu-qwen3")
    return str(
        make_tiny_model_dir(
            path,
            arch="qwen3",
            hidden_size=512,
            intermediate_size=1024,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=128,
        )
    )


def _batch(mode, lens_prefix, lens_new, pool_slots, device):
    from sgl_engine.forward_batch import ForwardBatch

    g = torch.Generator().manual_seed(0)
    perm = (
        torch.randperm(pool_slots, generator=g)[
            : sum(a + b for a, b in zip(lens_prefix, lens_new, strict=True))
        ]
        + 1
    )
    slots, pos, ids, new_slots, kv = perm.tolist(), [], [], [], []
    for p, n in zip(lens_prefix, lens_new, strict=True):
        seq, slots = slots[: p + n], slots[p + n :]
        kv.append(seq)
        new_slots.extend(seq[p:])
        pos.extend(range(p, p + n))
        ids.extend([0] * n)
    return ForwardBatch.build(mode, ids, pos, new_slots, lens_new, lens_prefix, kv, device)


@pytest.mark.parametrize("mode", ["extend", "decode"])
def test_flashinfer_matches_torch_backend(mode):
    from types import SimpleNamespace

    from sgl_engine.attention import create_backend
    from sgl_engine.forward_batch import ForwardMode
    from sgl_engine.kv_cache import KVPool

    dev, dt = torch.device("cuda"), torch.bfloat16
    mc = SimpleNamespace(num_heads=8, num_kv_heads=8, head_dim=128)
    pool = KVPool(4096, 1, 8, 128, dt, dev)
    pool.k[0].normal_()
    pool.v[0].normal_()
    if mode == "extend":
        batch = _batch(ForwardMode.EXTEND, [0, 37, 300, 5], [19, 1, 64, 200], 4000, dev)
    else:
        batch = _batch(ForwardMode.DECODE, [0, 37, 300, 1000], [1, 1, 1, 1], 4000, dev)
    t = batch.num_tokens
    q = torch.randn(t, 8, 128, device=dev, dtype=dt)
    k = torch.randn(t, 8, 128, device=dev, dtype=dt)
    v = torch.randn(t, 8, 128, device=dev, dtype=dt)
    outs = {}
    for name in ("torch", "flashinfer"):
        be = create_backend(name, model_config=mc, device=dev, dtype=dt)
        be.plan(batch)
        outs[name] = be.forward(q, k, v, 0, batch, pool, 128**-0.5).float()
    err = (outs["torch"] - outs["flashinfer"]).abs().max().item()
    assert err < 2e-2, err


def test_torch_backend_on_cuda_equals_transformers(gpu_llama):
    from sgl_engine import Engine
    from transformers import AutoModelForCausalLM

    with Engine(
        gpu_llama, device="cuda", dtype="float32", attention_backend="torch", max_total_tokens=4096
    ) as eng:
        model = AutoModelForCausalLM.from_pretrained(gpu_llama, dtype=torch.float32).cuda().eval()
        outs = eng.generate(PROMPTS, GREEDY)
        for p, o in zip(PROMPTS, outs, strict=True):
            ids = torch.tensor([eng.tokenizer.encode(p)], device="cuda")
            ref = model.generate(
                ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
            )
            assert o["output_ids"] == ref[0, ids.shape[1] :].tolist()
        eng.check_invariants()


@pytest.mark.parametrize("model", ["gpu_llama", "gpu_qwen3"])
def test_flashinfer_engine_and_cuda_graphs_agree_with_torch_backend(model, request):
    """CUDA graphs replay exactly what eager flashinfer computes; the fused bf16 path
    (flashinfer attention and ops, RoPE + KV store in one kernel) is as close to an fp32
    reference as the torch bf16 path is, on teacher-forced prompt logprobs (greedy tokens of two
    bf16 paths may legitimately part ways after a near-tie, so tokens are not compared across
    precisions)."""
    from sgl_engine import Engine

    path = request.getfixturevalue(model)

    reference = {"attention_backend": "torch", "fused_ops": "torch"}
    tokens, scores = {}, {}
    for label, extra in (
        ("fp32", {**reference, "dtype": "float32"}),
        ("torch", {**reference, "dtype": "bfloat16"}),
        (
            "flashinfer",
            {"attention_backend": "flashinfer", "dtype": "bfloat16", "cuda_graph_max_bs": 0},
        ),
        (
            "graphs",
            {"attention_backend": "flashinfer", "dtype": "bfloat16", "cuda_graph_max_bs": 8},
        ),
    ):
        with Engine(path, device="cuda", max_total_tokens=4096, **extra) as eng:
            tokens[label] = [o["output_ids"] for o in eng.generate(PROMPTS * 2, GREEDY)]
            scored = eng.generate(
                PROMPTS, {"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0
            )
            scores[label] = [
                lp for o in scored for lp, _, _ in o["meta_info"]["input_token_logprobs"][1:]
            ]
            eng.check_invariants()
    assert tokens["graphs"] == tokens["flashinfer"]

    def error(label: str) -> float:
        pairs = zip(scores[label], scores["fp32"], strict=True)
        return sum(abs(a - b) for a, b in pairs) / len(scores["fp32"])

    assert error("flashinfer") <= 1.5 * error("torch") + 0.01, (error("flashinfer"), error("torch"))


@pytest.mark.parametrize("n,k", [(1, 8), (1000, 777), (6144, 4096), (4096, 5504), (11008, 4096)])
def test_triton_gemv_matches_an_fp32_product(n, k):
    """decode_gemv="triton": each output within bf16 rounding of the fp32 product, with and
    without programmatic dependent launch (sm90+), and the two bit for bit the same (the same
    sum in the same order); odd shapes exercise the masks."""
    from sgl_engine.models.gemv import gemv

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.05).bfloat16()
    ref = x.float() @ w.float().T
    outs = {pdl: gemv(x, w, pdl=pdl) for pdl in (False, True)}
    for y in outs.values():
        assert y.shape == (1, n) and y.dtype == torch.bfloat16
        err = (y.float() - ref).abs()
        assert (err <= ref.abs() * 2**-8 + 1e-4 * ref.abs().max()).all(), err.max()
    assert torch.equal(outs[False], outs[True])


def test_triton_gemv_in_a_graph_waits_for_the_kernel_before_it():
    """In a CUDA graph the product is launched before the kernel that writes its input has
    finished (programmatic dependent launch after flashinfer's RMSNorm, itself PDL-launched); it
    must still read that kernel's output: replays on new inputs equal eager products (before
    sm90, a plain graph)."""
    import flashinfer
    from sgl_engine.models.gemv import gemv

    g = torch.Generator(device="cuda").manual_seed(1)
    src = torch.randn(1, 4096, device="cuda", generator=g).bfloat16()
    gamma = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(11008, 4096, device="cuda", generator=g) * 0.05).bfloat16()
    w2 = (torch.randn(4096, 11008, device="cuda", generator=g) * 0.05).bfloat16()

    def step():
        h = flashinfer.norm.rmsnorm(src, gamma, 1e-6)
        return gemv(gemv(h, w), w2)

    step()  # autotune outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(20):
        src.copy_(torch.randn(1, 4096, device="cuda", generator=g).bfloat16())
        graph.replay()
        h = flashinfer.norm.rmsnorm(src, gamma, 1e-6, enable_pdl=False)
        want = gemv(gemv(h, w, pdl=False), w2, pdl=False)
        assert torch.equal(out, want)


def test_decode_gemv_auto_takes_the_triton_kernel_from_hopper_on(gpu_llama):
    from sgl_engine import Engine

    with Engine(gpu_llama, max_total_tokens=4096, decode_gemv="auto", **BF16_FLASHINFER) as eng:
        facts = eng.inspect(runner_facts)
    hopper = torch.cuda.get_device_capability()[0] >= 9
    assert facts["decode_gemv"] == ("triton" if hopper else "cublas")


def test_triton_decode_gemv_is_as_accurate_as_cublas(gpu_llama):
    """Batch-1 decode (one request at a time, so every decode step is a one-row product in the
    bs=1 graph) with decode_gemv="triton": its chosen-token logprobs are no further from an fp32
    engine's than cuBLAS's are."""
    from sgl_engine import Engine

    fp32 = {"dtype": "float32", "attention_backend": "torch", "fused_ops": "torch"}
    outs = {}
    for label, extra in (
        ("fp32", fp32),
        ("cublas", {**BF16_FLASHINFER, "decode_gemv": "cublas"}),
        ("triton", {**BF16_FLASHINFER, "decode_gemv": "triton"}),
    ):
        kw = {"device": "cuda", "cuda_graph_max_bs": 8, "max_total_tokens": 4096, **extra}
        with Engine(gpu_llama, **kw) as eng:
            sp = {**GREEDY, "max_new_tokens": 24}
            outs[label] = [eng.generate(p, sp, return_logprob=True) for p in PROMPTS]
            triton = eng.inspect(runner_facts)["decode_gemv"] == "triton"
            assert triton == (label == "triton")
            eng.check_invariants()
    err_cublas = _drift(outs["cublas"], outs["fp32"])
    err_triton = _drift(outs["triton"], outs["fp32"])
    assert err_triton <= 2 * err_cublas + 0.02, (err_triton, err_cublas)


def test_fused_ops_match_the_reference():
    from sgl_engine.models.layers import RotaryEmbedding
    from sgl_engine.models.ops import FlashInferOps, TorchOps
    from sgl_engine.testing import tiny_config

    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    ref, fused = TorchOps(), FlashInferOps()
    x = torch.randn(37, 4096, device=dev, dtype=dt)
    res = torch.randn(37, 4096, device=dev, dtype=dt)
    w = torch.rand(4096, device=dev, dtype=dt) + 0.5
    close = dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(fused.rmsnorm(x, w, 1e-5), ref.rmsnorm(x, w, 1e-5), **close)
    a, ra = ref.add_rmsnorm(x.clone(), res.clone(), w, 1e-5)
    b, rb = fused.add_rmsnorm(x.clone(), res.clone(), w, 1e-5)
    torch.testing.assert_close(rb, ra, **close)
    torch.testing.assert_close(b, a, **close)
    gu = torch.randn(37, 2 * 1024, device=dev, dtype=dt)
    torch.testing.assert_close(fused.silu_mul(gu), ref.silu_mul(gu), **close)
    rope = RotaryEmbedding(tiny_config(head_dim=128), 128, 4096).to(dev)
    pos = torch.randint(0, 4000, (37,), device=dev)
    q = torch.randn(37, 8 * 128, device=dev, dtype=dt)
    k = torch.randn(37, 2 * 128, device=dev, dtype=dt)
    qa, ka = rope(pos, q.clone(), k.clone(), ref)
    qb, kb = rope(pos, q.clone(), k.clone(), fused)
    torch.testing.assert_close(qb, qa, **close)
    torch.testing.assert_close(kb, ka, **close)


@pytest.mark.parametrize(("t", "own_k"), [(1, False), (37, False), (37, True)])
def test_rope_store_matches_rope_then_the_pools_write(t, own_k):
    """models/rope_store.py with PDL, on views of one qkv projection as the model passes them
    (or k on its own, as after a qk-norm):
    q within one bf16 rounding of TorchOps.rope, the pool's rows of the written slots within one
    rounding of KVPool.store's, every other slot untouched."""
    from sgl_engine.kv_cache import KVPool
    from sgl_engine.models.gemv import pdl_supported
    from sgl_engine.models.layers import RotaryEmbedding
    from sgl_engine.models.ops import TorchOps
    from sgl_engine.models.rope_store import rope_store
    from sgl_engine.testing import tiny_config

    torch.manual_seed(0)
    dev, dt, nh, nkv, d, slots = "cuda", torch.bfloat16, 16, 4, 128, 4096
    qkv = torch.randn(t, (nh + 2 * nkv) * d, device=dev, dtype=dt)
    q, k, v = qkv.split([nh * d, nkv * d, nkv * d], dim=-1)
    if own_k:  # as after a qk-norm: k and v with different row strides
        k = k.contiguous()
    rope = RotaryEmbedding(tiny_config(head_dim=d), d, 4096).to(dev)
    pos = torch.randint(0, 4000, (t,), device=dev)
    loc = torch.randperm(slots, device=dev)[:t]
    want_q, want_k = TorchOps.rope(pos, q.clone(), k.clone(), rope.cos, rope.sin, None, d)
    want = KVPool(slots, 1, nkv, d, dt, torch.device(dev))
    want.store(0, loc, want_k.reshape(t, nkv, d), v.reshape(t, nkv, d))
    got = KVPool(slots, 1, nkv, d, dt, torch.device(dev))
    got.kv[0].fill_(3)
    out = rope_store(pos, q, k, v, rope.cos_sin, d, got.kv[0], loc, pdl_supported(q.device))
    torch.cuda.synchronize()
    ulp = lambda x: x.abs() * 2.0**-7 + 1e-6  # noqa: E731
    assert out.data_ptr() == q.data_ptr()
    assert ((q.float() - want_q.float()).abs() <= ulp(want_q.float())).all()
    rows = want.kv[0][loc].float()
    assert ((got.kv[0][loc].float() - rows).abs() <= ulp(rows)).all()
    others = torch.ones(slots + 1, dtype=torch.bool, device=dev)
    others[loc] = False
    assert (got.kv[0][others] == 3).all()


def test_overlapped_decode_equals_the_plain_loop_on_cuda(gpu_llama):
    """With CUDA graphs and flashinfer, steps launched from the previous step's ids on the
    device (pinned copies, events, plans reusing pinned buffers) compute what the plain loop
    computes: identical tokens while the batch is the same in both (all requests alive), and
    every request its own length, with nothing leaked."""
    import random

    from sgl_engine import Engine

    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(5, 60))] for _ in range(12)]
    lens = [8 + 4 * (i % 5) for i in range(len(prompts))]
    sps = [{"max_new_tokens": n, "temperature": 0, "ignore_eos": True} for n in lens]
    same = {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}
    outs = {}
    for overlap in (True, False):
        with Engine(
            gpu_llama,
            device="cuda",
            max_total_tokens=4096,
            attention_backend="flashinfer",
            cuda_graph_max_bs=16,
            overlap_schedule=overlap,
        ) as eng:
            outs[overlap] = (
                [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=same)],
                [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=sps)],
            )
            assert (eng.metrics()["overlapped_passes"] > 0) == overlap
            eng.check_invariants()
    assert outs[True][0] == outs[False][0]
    assert [len(o) for o in outs[True][1]] == lens
    assert [o[:8] for o in outs[True][1]] == [o[:8] for o in outs[False][1]]


NEAR_TIE = 0.25  # nats between the solo run's top-2 logprobs: batch shape may flip the argmax


def test_stress_small_pool_shared_prefixes_concurrent_submitters(gpu_llama):
    """Issue 18's stress shape at test size: a pool far smaller than what the running batch
    lists (shared prefix slots repeat in every row), prompts over 4 shared prefixes, varied
    lengths, 16 submitting threads. No request is aborted, no batch leaves the graphs, nothing
    leaks, and each greedy output equals the request's solo run unless they part at a bf16
    near-tie of the solo run."""
    from sgl_engine import Engine
    from sgl_engine.testing import shared_prefix_workload, submit_concurrently

    work = shared_prefix_workload(160, prefixes=4, prompt_len=(16, 600), new_tokens=(1, 64))
    with Engine(
        gpu_llama,
        device="cuda",
        max_total_tokens=2048,
        max_running_requests=32,
        attention_backend="flashinfer",
        cuda_graph_max_bs=32,
    ) as eng:
        outs = submit_concurrently(eng, work, threads=16)
        m = eng.metrics()
        eng.check_invariants()
        assert [o["meta_info"]["finish_reason"]["type"] for o in outs] == ["length"] * len(work)
        assert m["aborted_requests"] == 0 and eng.runner.graphs.eager_fallbacks == 0
        assert [len(o["output_ids"]) for o in outs] == [n for _, n in work]
        parted, ties = 0, []
        for (ids, new), out in zip(work, outs, strict=True):
            eng.flush_cache()
            sp = {"max_new_tokens": new, "temperature": 0, "ignore_eos": True}
            solo = eng.generate(
                input_ids=ids, sampling_params=sp, return_logprob=True, top_logprobs_num=2
            )
            a, b = out["output_ids"], solo["output_ids"]
            if a == b:
                continue
            j = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
            top = solo["meta_info"]["output_top_logprobs"][j]
            parted += 1
            ties.append(top[0][0] - top[1][0])
        eng.check_invariants()
    print(f"stress: {len(work)} requests, {m['retractions']} retractions, parted {parted}: {ties}")
    assert all(gap < NEAR_TIE for gap in ties), ties
    assert parted <= len(work) // 10, (parted, ties)


def test_jump_forward_run_rounds_replay_graphs_unrolled(gpu_llama):
    """A run round after jump-forward (rows carrying several forced tokens) replays a decode
    graph unrolled, one row per token (model_runner), and gives what the eager extend gives:
    the same tokens until a bf16 near-tie, with close logprobs."""
    from sgl_engine import Engine
    from test_jump_text import SCHEMA

    sp = {"max_new_tokens": 128, "temperature": 0, "json_schema": SCHEMA}
    prompts = [f"Record {i}:" for i in range(12)]
    outs = {}
    for unroll in (False, True):
        with Engine(
            gpu_llama,
            **BF16_FLASHINFER,
            cuda_graph_max_bs=64,
            max_total_tokens=8192,
            unroll_extends=unroll,
        ) as eng:
            outs[unroll] = eng.generate(prompts, sp, return_logprob=True)
            assert (eng.runner.unrolled_passes > 0) == unroll
            assert eng.runner.graphs.eager_fallbacks == 0
            assert eng.metrics()["forced_tokens"] > 0
            eng.check_invariants()
    _close_until_they_part(outs[False], outs[True], same_length=False)


def _close_until_they_part(ref: list[dict], got: list[dict], same_length: bool) -> None:
    """Output by output, the chosen tokens' logprobs agree to bf16 precision (~1% of the
    logprob: -8.89 vs -8.78 was seen) up to and including the first differing token; forced
    tokens (logprob None) are skipped. `same_length`: the outputs must be as long as each other."""
    for a, b in _until_they_part(ref, got, same_length):
        if a is not None and b is not None:
            assert abs(a - b) <= 0.05 + 0.02 * abs(a), (a, b)


def _until_they_part(ref: list[dict], got: list[dict], same_length: bool):
    """The pairs of chosen-token logprobs of each output, up to and including the first token
    the two outputs differ in."""
    for r, g in zip(ref, got, strict=True):
        pairs = zip(
            r["meta_info"]["output_token_logprobs"],
            g["meta_info"]["output_token_logprobs"],
            strict=same_length,
        )
        for (a, token_a, _), (b, token_b, _) in pairs:
            yield a, b
            if token_a != token_b:
                break


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tp2_one_shot_all_reduce_equals_nccl(gpu_llama):
    """TP=2 with small all-reduces on the one-shot path (CUDA graphs and eager prefill) gives
    exactly NCCL's tokens and logprobs: a two-rank bf16 sum rounds a + b the same either way."""
    from sgl_engine import Engine

    prompts = PROMPTS * 4
    outs = {}
    for mode in ("nccl", "one_shot"):
        with Engine(
            gpu_llama,
            **BF16_FLASHINFER,
            cuda_graph_max_bs=16,
            max_total_tokens=8192,
            tp_size=2,
            tp_all_reduce=mode,
        ) as eng:
            outs[mode] = eng.generate(prompts, GREEDY, return_logprob=True)
            facts = eng.inspect(runner_facts)
            assert facts["all_reduce"] == ("one_shot" if mode == "one_shot" else "device_group")
            assert (facts["one_shot_calls"] > 0) == (mode == "one_shot")
            eng.check_invariants()
    for a, b in zip(outs["nccl"], outs["one_shot"], strict=True):
        assert a["output_ids"] == b["output_ids"]
        la = [x[0] for x in a["meta_info"]["output_token_logprobs"]]
        lb = [x[0] for x in b["meta_info"]["output_token_logprobs"]]
        assert la == pytest.approx(lb, abs=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tp2_fused_all_reduce_norm_is_as_accurate_as_one_shot(gpu_llama):
    """tp_all_reduce="fused" (each block half's all-reduce, residual add and RMSNorm in one
    flashinfer TensorRT-LLM kernel, in the decode graphs; longer prefills fall back to NCCL and
    the norm kernel): its chosen-token logprobs are no further from an fp32 TP=1 engine than the
    one-shot path's, and the kernel ran. The first engine with it builds the kernel (minutes,
    once per machine)."""
    from sgl_engine import Engine

    prompts = PROMPTS * 4
    fp32 = {"dtype": "float32", "attention_backend": "torch", "fused_ops": "torch"}
    outs = {}
    for label, extra in (
        ("fp32", fp32),
        ("one_shot", {**BF16_FLASHINFER, "tp_size": 2, "tp_all_reduce": "one_shot"}),
        ("fused", {**BF16_FLASHINFER, "tp_size": 2, "tp_all_reduce": "fused"}),
    ):
        kw = {"device": "cuda", "cuda_graph_max_bs": 16, "max_total_tokens": 8192, **extra}
        with Engine(gpu_llama, **kw) as eng:
            outs[label] = eng.generate(
                prompts, {**GREEDY, "max_new_tokens": 24}, return_logprob=True
            )
            if label == "fused":
                facts = eng.inspect(runner_facts)
                assert facts["all_reduce"] == "fused" and facts["fused_norm_calls"] > 0
            eng.check_invariants()
    err_one_shot = _drift(outs["one_shot"], outs["fp32"])
    err_fused = _drift(outs["fused"], outs["fp32"])
    assert err_fused <= 2 * err_one_shot + 0.02, (err_fused, err_one_shot)


def test_cascade_decode_kernels_are_as_accurate_as_plain_decode():
    """Shared-prefix decode (the prefix once for all rows, each row's own slots, the two merged:
    `CascadeDecode`) against an fp32 torch-backend reference on the same pool and queries: as
    close to it as plain flashinfer decode is."""
    from types import SimpleNamespace

    from sgl_engine.attention import create_backend
    from sgl_engine.forward_batch import ForwardBatch, ForwardMode
    from sgl_engine.kv_cache import KVPool

    dev, heads = torch.device("cuda"), 8
    slots = (torch.randperm(4000, generator=torch.Generator().manual_seed(1)) + 1).tolist()
    shared, rest = slots[:300], slots[300:]
    kv = []
    for n in [1, 2, 7, 50, 1, 33, 120, 5] * 2:
        kv.append(shared + rest[:n])
        rest = rest[n:]
    rows = len(kv)
    lens = [len(s) - 1 for s in kv]
    batch = ForwardBatch.build(
        ForwardMode.DECODE, [0] * rows, lens, [s[-1] for s in kv], [1] * rows, lens, kv, dev, 256
    )
    assert batch.shared_prefix == 300
    mc = SimpleNamespace(num_heads=heads, num_kv_heads=heads, head_dim=128)
    q, k, v = (torch.randn(rows, heads, 128, device=dev).bfloat16() for _ in range(3))
    pools = {dt: KVPool(4096, 1, heads, 128, dt, dev) for dt in (torch.float32, torch.bfloat16)}
    pools[torch.bfloat16].kv[0].normal_()
    pools[torch.float32].kv[0].copy_(pools[torch.bfloat16].kv[0])
    ref = create_backend("torch", model_config=mc, device=dev, dtype=torch.float32)
    ref.plan(batch)
    want = ref.forward(q.float(), k.float(), v.float(), 0, batch, pools[torch.float32], 128**-0.5)
    pool = pools[torch.bfloat16]
    fi = create_backend("flashinfer", model_config=mc, device=dev, dtype=torch.bfloat16)
    fi.plan(batch)
    plain = fi.forward(q, k, v, 0, batch, pool, 128**-0.5).float()
    i32 = dict(dtype=torch.int32, device=dev)
    meta = fi.graph_cascade(rows, torch.zeros(4096, **i32), torch.zeros(4096, **i32))
    own = [n - 300 for n in batch.seq_lens]
    fi.plan_cascade(meta, rows, batch.kv_indices[:300], own, batch.own_indices)
    cascade = meta.run(q, pool.kv[0].unsqueeze(2)).reshape(rows, -1).float()
    err_plain = (plain - want).abs().max().item()
    err_cascade = (cascade - want).abs().max().item()
    assert err_cascade <= 2 * err_plain + 1e-3, (err_cascade, err_plain)
    assert err_cascade < 2e-2, err_cascade


def test_cascade_decode_graphs_as_accurate_as_plain_graphs(gpu_llama):
    """Decode graphs that read a few-shot batch's shared prefix once (cascade_attention) end to
    end: replayed for the batch, and their chosen-token logprobs no further from an fp32
    reference engine than the plain graphs' are (bf16 drift grows through the layers, so two
    bf16 paths are compared through their distance to fp32, not to each other)."""
    import random

    from sgl_engine import Engine
    from sgl_engine.cuda_graph import CASCADE_MIN_PREFIX, CASCADE_MIN_ROWS

    rng = random.Random(3)
    shared = [rng.randrange(3, 400) for _ in range(CASCADE_MIN_PREFIX + 44)]
    prompts = [
        shared + [rng.randrange(3, 400) for _ in range(8)] for _ in range(2 * CASCADE_MIN_ROWS)
    ]
    sp = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    outs = {}
    for label, extra in (
        ("fp32", {"dtype": "float32", "attention_backend": "torch", "fused_ops": "torch"}),
        ("plain", {**BF16_FLASHINFER, "cuda_graph_max_bs": 32, "cascade_attention": False}),
        ("cascade", {**BF16_FLASHINFER, "cuda_graph_max_bs": 32, "cascade_attention": True}),
    ):
        with Engine(gpu_llama, **{"device": "cuda", **extra}, max_total_tokens=16384) as eng:
            eng.generate(input_ids=prompts[:1], sampling_params={**sp, "max_new_tokens": 1})
            outs[label] = eng.generate(input_ids=prompts, sampling_params=sp, return_logprob=True)
            if label != "fp32":
                assert (eng.runner.graphs.cascade_replays > 0) == (label == "cascade")
            eng.check_invariants()
    err_plain = _drift(outs["plain"], outs["fp32"])
    err_cascade = _drift(outs["cascade"], outs["fp32"])
    assert err_cascade <= 2 * err_plain + 0.02, (err_cascade, err_plain)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tp2_push_products_are_as_accurate_as_fused(gpu_llama):
    """tp_all_reduce="push" (batch-1 row-parallel products push their partial sums to the peer;
    push_norm.py sums, adds and normalises): greedy batch-1 streams, alone and beside a batch,
    are no further from an fp32 TP=1 engine than the fused path with the same products, and
    the push kernel ran (in graphs replayed many times, so the buffer's rows rotate)."""
    from sgl_engine import Engine

    fp32 = {"dtype": "float32", "attention_backend": "torch", "fused_ops": "torch"}
    tp2 = {**BF16_FLASHINFER, "tp_size": 2, "decode_gemv": "triton"}
    outs = {}
    for label, extra in (
        ("fp32", fp32),
        ("fused", {**tp2, "tp_all_reduce": "fused"}),
        ("push", {**tp2, "tp_all_reduce": "push"}),
    ):
        kw = {"device": "cuda", "cuda_graph_max_bs": 16, "max_total_tokens": 8192, **extra}
        with Engine(gpu_llama, **kw) as eng:
            params = {**GREEDY, "max_new_tokens": 40}
            outs[label] = [eng.generate(p, params, return_logprob=True) for p in PROMPTS]
            outs[label] += eng.generate(PROMPTS * 2, params, return_logprob=True)
            if label == "push":
                facts = eng.inspect(runner_facts)
                assert facts["all_reduce"] == "push" and facts["push_norm_calls"] > 0
                assert facts["push_rounds"] > 300  # graph replays: the device counts them
                assert facts["fused_norm_calls"] > 0  # the batch's rounds
            eng.check_invariants()
    err_fused = _drift(outs["fused"], outs["fp32"])
    err_push = _drift(outs["push"], outs["fp32"])
    assert err_push <= 1.5 * err_fused + 0.01, (err_push, err_fused)


def _drift(got: list[dict], ref: list[dict]) -> float:
    """The mean absolute difference of chosen-token logprobs, output by output, up to and
    including the first differing token."""
    diffs = [abs(a - b) for a, b in _until_they_part(got, ref, same_length=True)]
    return sum(diffs) / len(diffs)


KILL_CHILD = """
import json, os, signal, sys, time
import torch.distributed as dist
from sgl_engine import Engine

path, mode = sys.argv[1:]
greedy = {"temperature": 0, "ignore_eos": True}
kw = dict(device="cuda", dtype="bfloat16", attention_backend="flashinfer",
          cuda_graph_max_bs=16, max_total_tokens=8192, tp_size=2, tp_all_reduce=mode,
          decode_gemv="triton" if mode == "push" else "cublas")
eng = Engine(path, **kw)
core, follower = eng.pids
stream = eng.generate("hi", {**greedy, "max_new_tokens": 100000}, stream=True)
first = next(stream)["meta_info"]["finish_reason"]
os.kill(follower, signal.SIGKILL)
reason = list(stream)[-1]["meta_info"]["finish_reason"]
later = eng.generate("hello", {**greedy, "max_new_tokens": 3})["meta_info"]["finish_reason"]
t = time.perf_counter()
eng.shutdown()
shutdown_s = time.perf_counter() - t
with Engine(path, **kw) as again:  # the same process serves a new TP engine
    after = again.generate("hello", {**greedy, "max_new_tokens": 3})["meta_info"]["finish_reason"]
print(json.dumps({"first": first, "reason": reason, "later": later, "after": after,
      "core_exit": eng.proc.exitcode, "joined_a_group": dist.is_initialized(),
      "shutdown_s": shutdown_s}), flush=True)
"""


KILL_CHILD_S = 400  # two TP=2 engines started and stopped (about 2 minutes on two H200s)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("mode", ["nccl", "one_shot", "fused", "push"])
def test_tp2_killed_rank_fails_the_stream_instead_of_hanging(gpu_llama, mode):
    """A follower killed mid-stream on GPUs: the stream ends as an abort naming the rank (the
    one-shot kernel then spins for good, so rank 0 must poll rather than block), a later request
    fails the same way, shutdown returns, the engine's child process (rank 0) exits 0, the same
    caller process then serves a new TP engine and exits cleanly itself (it runs as a script
    of its own, so its exit code is seen). Before rank 0 moved into a child process, the
    caller's process was left with a spinning kernel and an NCCL abort that never returned, and
    ended by SIGABRT at exit (2 x H200, 7dbb8d2)."""
    import json
    import subprocess
    import sys
    import time

    child = subprocess.Popen(
        [sys.executable, "-c", KILL_CHILD, gpu_llama, mode],
        stdout=subprocess.PIPE,
        text=True,
    )
    t = time.perf_counter()
    try:  # bounded: a child that hangs (or never exits) fails the test instead of hanging it
        out, _ = child.communicate(timeout=KILL_CHILD_S)
    except subprocess.TimeoutExpired:
        child.kill()
        out, _ = child.communicate()
        pytest.fail(f"the child did not finish within {KILL_CHILD_S} s; it printed: {out[-2000:]}")
    rc = child.returncode
    line = next((x for x in out.splitlines() if x.startswith("{")), "{}")
    print(f"killed rank, {mode}: {line} in {time.perf_counter() - t:.1f} s, rc {rc}")
    got = json.loads(line)
    assert got["first"] is None
    for reason in (got["reason"], got["later"]):
        assert reason["type"] == "abort" and "tensor-parallel rank 1" in reason["message"]
    assert got["after"]["type"] == "length"
    assert got["core_exit"] == 0 and not got["joined_a_group"]
    assert got["shutdown_s"] < 30
    assert rc == 0
