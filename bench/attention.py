"""Duo-causal attention alone: fast backends vs the reference mask, time and peak memory, T = 512..4096.

One TaH layer's attention work: depth 1 (T queries over T keys, causal) plus depth 2 (15% of the
tokens as queries over the T depth-1 keys and their own depth-2 keys, duo-causal). Backends:
reference (explicit (Tq x Tk) mask, fp32 naive softmax), sdpa (is_causal at depth 1, a (Tq2 x Tk)
mask at depth 2), flex (block masks; forward only on CPU, where torch has no FlexAttention backward).

    python bench/attention.py                       # T = 512 1024 2048 4096
    python bench/attention.py --seqlens 1024 --hard 0.15
"""

from __future__ import annotations

import argparse
import json

import torch

from common import measure, run_timed_and_measured


def make_calls(T: int, hard: float, heads: int, kv_heads: int, dim: int, backend: str, grad: bool, dev: str):
    from tah.attention import DuoCausalSpec

    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    n2 = max(1, int(T * hard))
    hard_pos = torch.randperm(T, generator=g)[:n2].sort().values.to(dev)
    pos = torch.arange(T, device=dev)
    specs = [
        DuoCausalSpec(q_pos=pos[None], k_pos=pos[None], k_valid=torch.ones(1, T, dtype=torch.bool, device=dev),
                      backend=backend, causal=True),
        DuoCausalSpec(q_pos=hard_pos[None], k_pos=torch.cat([pos, hard_pos])[None],
                      k_valid=torch.ones(1, T + n2, dtype=torch.bool, device=dev), backend=backend),
    ]
    shapes = [(T, T), (n2, T + n2)]
    tensors = []
    for tq, tk in shapes:
        q = torch.randn(1, heads, tq, dim, device=dev, dtype=dtype, requires_grad=grad)
        k = torch.randn(1, kv_heads, tk, dim, device=dev, dtype=dtype, requires_grad=grad)
        v = torch.randn(1, kv_heads, tk, dim, device=dev, dtype=dtype, requires_grad=grad)
        tensors.append((q, k, v))
    return specs, tensors


def worker(backend: str, T: int, hard: float, grad: bool, repeats: int) -> dict:
    import tah.attention as A

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    specs, tensors = make_calls(T, hard, 16, 8, 64, backend, grad, dev)
    mod = torch.nn.Module()

    def step() -> None:
        with torch.set_grad_enabled(grad):
            outs = [A.tah_attention(mod, q, k, v, spec, scaling=0.125)[0] for spec, (q, k, v) in zip(specs, tensors)]
            if grad:
                sum(o.float().sum() for o in outs).backward()

    res = measure(step, repeats, warmup=2 if backend == "flex" else 1)
    res["paths"] = dict(sum((s.counts for s in specs), start=type(specs[0].counts)()))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--hard", type=float, default=0.15)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("rest", nargs="*")
    args = ap.parse_args()
    if args.worker:
        backend, T, grad = args.rest[0], int(args.rest[1]), args.rest[2] == "1"
        print(json.dumps(worker(backend, T, args.hard, grad, args.repeats)))
        return
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"# duo-causal attention (depth 1 + depth 2 at {args.hard:.0%} hard), 16 heads / 8 kv heads x 64, "
          f"batch 1, device {dev}")
    print("| T | pass | backend | ms | peak MiB | time / reference | memory / reference |")
    print("|---|---|---|---|---|---|---|")
    for T in args.seqlens:
        for grad in (False, True):
            backends = ["reference", "sdpa"] + (["flex"] if (not grad or dev == "cuda") else [])
            res = {b: run_timed_and_measured(__file__, ["--hard", str(args.hard), "--repeats", str(args.repeats), b,
                                                        str(T), "1" if grad else "0"]) for b in backends}
            ref = res["reference"]
            for b in backends:
                r = res[b]
                print(f"| {T} | {'fwd+bwd' if grad else 'fwd'} | {b} | {1e3 * r['seconds']:.1f} | {r['peak_mib']:.0f} | "
                      f"{r['seconds'] / ref['seconds']:.2f}x | {r['peak_mib'] / max(ref['peak_mib'], 1e-9):.3f}x |",
                      flush=True)


if __name__ == "__main__":
    main()
