"""Shared-prefix (cascade) attention against plain paged attention, kernel time on the GPU.

    python benchmarks/cascade_kernels.py [--json out.json]

One layer of the MMLU-style workload's attention (7B shape: 32 heads of 128, MHA; and the 70B
shape's rank at TP=2: 32 query heads over 4 KV heads): 64 sequences sharing a 1,024-token
prefix, each with its own 64 tokens, KV slots scattered over a 131,072-slot pool.
- decode: one new token per sequence (kv = 1,024 shared + 65 own);
- extend: the 64 own tokens of every sequence (causal), over the shared prefix.
Plain: one paged kernel over each sequence's whole KV. Cascade: the shared prefix once for all
queries (a non-causal prefill over the prefix), each sequence's own KV (paged), then a merge of
the two partial softmaxes by their log-sum-exps. Time is the sum of the kernels' device time
from the torch profiler (what a CUDA-graph replay costs; host launch time is excluded), per
call, over 20 calls; `max_err` is cascade against plain.
"""

from __future__ import annotations

import argparse
import json
from itertools import accumulate

import torch


def kernel_us(fn, reps: int = 20) -> float:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return sum(e.device_time_total for e in prof.key_averages()) / reps


def case(mode: str, nh: int, nkv: int, bs=64, shared=1024, own=64, slots=1 << 17) -> dict:
    import flashinfer

    dev, dt, hd = "cuda", torch.bfloat16, 128
    i32 = dict(dtype=torch.int32, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    kv = torch.randn(slots, 2, 1, nkv, hd, device=dev, dtype=dt, generator=g)
    new = 1 if mode == "decode" else own
    ctx = own + 1 if mode == "decode" else own
    perm = torch.randperm(slots, device=dev, generator=g).int()
    prefix, mine = perm[:shared], perm[shared : shared + bs * ctx].view(bs, ctx)
    full = torch.cat([torch.cat([prefix, mine[i]]) for i in range(bs)])
    q = torch.randn(bs * new, nh, hd, device=dev, dtype=dt, generator=g)
    ws = [torch.zeros(256 << 20, dtype=torch.uint8, device=dev) for _ in range(2)]
    ones = torch.ones(bs, **i32)
    common = dict(q_data_type=dt, kv_data_type=dt)

    def paged(lens_q, lens_kv, indices, causal, w):
        kp = torch.tensor(list(accumulate(lens_kv, initial=0)), **i32)
        last = torch.ones(len(lens_kv), **i32)
        if lens_q is None:  # decode: one query row per sequence
            wr = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                w, "NHD", use_tensor_cores=nh // nkv >= 4
            )
            wr.plan(kp, indices, last, nh, nkv, hd, 1, **common)
        else:
            qo = torch.tensor(list(accumulate(lens_q, initial=0)), **i32)
            wr = flashinfer.BatchPrefillWithPagedKVCacheWrapper(w, "NHD")
            wr.plan(qo, kp, indices, last, nh, nkv, hd, 1, causal=causal, **common)
        return wr

    if mode == "decode":
        plain = paged(None, [shared + ctx] * bs, full, False, ws[0])
        own_w = paged(None, [ctx] * bs, mine.reshape(-1), False, ws[1])
    else:
        plain = paged([new] * bs, [shared + ctx] * bs, full, True, ws[0])
        own_w = paged([new] * bs, [ctx] * bs, mine.reshape(-1), True, ws[1])
    pre_ws = torch.zeros(256 << 20, dtype=torch.uint8, device=dev)
    pre = flashinfer.BatchPrefillWithPagedKVCacheWrapper(pre_ws, "NHD")
    pre.plan(
        torch.tensor([0, bs * new], **i32),
        torch.tensor([0, shared], **i32),
        prefix,
        ones[:1],
        nh,
        nkv,
        hd,
        1,
        causal=False,
        **common,
    )

    def cascade():
        o, s = own_w.run(q, kv, return_lse=True)
        o2, s2 = pre.run(q, kv, return_lse=True)
        flashinfer.merge_state_in_place(o, s, o2, s2)
        return o

    ref = plain.run(q, kv)
    err = (cascade().float() - ref.float()).abs().max().item()
    return {
        "plain_us": round(kernel_us(lambda: plain.run(q, kv)), 1),
        "cascade_us": round(kernel_us(cascade), 1),
        "max_err": err,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out = {}
    for mode in ("decode", "extend"):
        for name, nh, nkv in (("7b", 32, 32), ("70b-tp2", 32, 4)):
            key = f"{mode} {name}"
            try:
                out[key] = case(mode, nh, nkv)
            except Exception as exc:  # noqa: BLE001 -- report and go on to the next case
                out[key] = {"error": repr(exc)[:400]}
            print(key, out[key], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
