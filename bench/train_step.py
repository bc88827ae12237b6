"""Training step cost of TaH vs Standard vs AlwaysThink, measured side by side in one run.

Same backbone and batch for all three: Standard = depth 1 only; TaH = 15% of tokens at depth 2
(stage 1: backbone + LoRA trainable, no decider); AlwaysThink = every token at depth 2, causal within
each depth. Forward + backward, fp32 on CPU (bf16 on CUDA). Prints time and peak-memory ratios.

    python bench/train_step.py                      # T = 512 and 2048
    python bench/train_step.py --seqlens 512 --hard 0.15 --repeats 3
    python bench/train_step.py --labels runs/tiny/labels   # TaH at the labelled hard ratio (manifest.json)
"""

from __future__ import annotations

import argparse
import json

import torch

from common import measure, run_timed_and_measured

METHODS = ("standard", "tah", "always_think")


def worker(method: str, seqlen: int, hard: float, repeats: int, size: str) -> dict:
    from tah import TaHConfig, TaHForCausalLM
    from tah.config import LoraSettings
    from tah.testing import random_depths, tiny_qwen3

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    dims = {"small": dict(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=32,
                          intermediate_size=768),
            "medium": dict(vocab_size=32768, hidden_size=1024, num_layers=8, num_heads=16, num_kv_heads=8,
                           head_dim=64, intermediate_size=3072)}[size]
    hf = tiny_qwen3(**dims, initializer_range=0.02).to(dev, dtype)
    cfg = TaHConfig(max_depth=1 if method == "standard" else 2, lora=LoraSettings(r=16, alpha=32, dropout=0.0),
                    depth_attention="current" if method == "always_think" else "duo_causal")
    model = TaHForCausalLM.from_backbone(hf, cfg).train()
    model.set_trainable("standard" if method == "standard" else "stage1")
    ids = torch.randint(3, dims["vocab_size"], (1, seqlen), device=dev)
    if method == "standard":
        depths = torch.ones_like(ids)
    elif method == "always_think":
        depths = torch.full_like(ids, 2)
    else:
        depths = random_depths(1, seqlen, 2, hard_fraction=hard, seed=1).to(dev)

    def step() -> None:
        out = model(ids, depths=depths, labels=ids, return_decider_logits=False, return_logits=False)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    res = measure(step, repeats)
    res["paths"] = dict(model.attention_paths)
    res["tokens_at_depth2"] = int((depths == 2).sum())
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlens", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--hard", type=float, default=0.15)
    ap.add_argument("--labels", help="a jobs/label.py output: use its measured hard ratio instead of --hard")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", default="small", choices=["small", "medium"])
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("rest", nargs="*")
    args = ap.parse_args()
    if args.labels and not args.worker:
        from tah import storage

        args.hard = json.loads(storage.read_bytes(storage.join(args.labels, "manifest.json")))["hard_ratio"]
    if args.worker:
        method, seqlen = args.rest[0], int(args.rest[1])
        print(json.dumps(worker(method, seqlen, args.hard, args.repeats, args.size)))
        return
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"# train step (fwd+bwd), {args.size} Qwen3, batch 1, device {dev}, TaH hard share {args.hard}")
    print("| T | method | s/step | tokens/s | peak MiB | time / Standard | memory / Standard |")
    print("|---|---|---|---|---|---|---|")
    for T in args.seqlens:
        res = {m: run_timed_and_measured(__file__, ["--hard", str(args.hard), "--repeats", str(args.repeats),
                                                    "--size", args.size, m, str(T)]) for m in METHODS}
        base = res["standard"]
        for m in METHODS:
            r = res[m]
            print(f"| {T} | {m} | {r['seconds']:.3f} | {T / r['seconds']:.0f} | {r['peak_mib']:.0f} | "
                  f"{r['seconds'] / base['seconds']:.2f}x "
                  f"| {r['peak_mib'] / max(base['peak_mib'], 1e-9):.2f}x |", flush=True)


if __name__ == "__main__":
    main()
