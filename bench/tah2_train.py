"""TaH2 training step cost vs Standard SFT, measured side by side in one run.

Same random Qwen3 backbone and batch (1 sequence of T tokens, every target supervised) for:
Standard = the plain backbone (max_depth 1), NTP loss; TaH2 = TaHConfig.tah2(max_depth=M) trained as
the joint stage (tah/train/tah2.py: main pass under the decider's routing, the side pass of every
stopped token, the online labels, NTP + 0.05 x cost-weighted BCE); "TaH2 NTP only" = the same main
pass and mixture NLL without the labels (what the side pass and labels add). Each step is forward +
backward + AdamW step (at lr 0, so that the routing does not drift). The decider's threshold is set so that `--share` of the tokens continue
(default 0.442: the paper's depth-2 share for M = 2). fp32 on CPU (bf16 on CUDA); each configuration
runs in its own process; the median of `--repeats` steps after one warm-up step, and the configurations
take turns `--rounds` times (the fastest round is kept: a busy machine slows rounds, never speeds them).
CPU runs use `--threads` (1 by default): on a shared machine two OpenMP threads stall at every barrier
whenever another process holds a core, which made the same step 2-10x slower from run to run.

    python bench/tah2_train.py                         # T = 512 and 2048
    python bench/tah2_train.py --seqlens 512 --repeats 3 --max-depth 4 --share 0.5
"""

from __future__ import annotations

import argparse
import json

import torch

from common import measure, run_isolated

METHODS = ("standard", "tah2", "tah2_ntp_only")
DIMS = dict(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=32,
            intermediate_size=768)  # bench/train_step.py's "small"


def worker(method: str, seqlen: int, max_depth: int, share: float, repeats: int, threads: int) -> dict:
    from tah import TaHConfig, TaHForCausalLM
    from tah.testing import tiny_qwen3
    from tah.train.losses import Tah2Objective
    from tah.train.tah2 import JointStep

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and threads > 0:
        torch.set_num_threads(threads)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    hf = tiny_qwen3(**DIMS, initializer_range=0.02).to(dev, dtype)
    cfg = TaHConfig(max_depth=1) if method == "standard" else TaHConfig.tah2(max_depth=max_depth)
    model = TaHForCausalLM.from_backbone(hf, cfg).train()
    # lr 0: the update is computed and applied as usual, but the routing stays where it was set
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    ids = torch.randint(3, DIMS["vocab_size"], (1, seqlen), device=dev)
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    res: dict = {}
    if method != "standard":
        with torch.no_grad():  # the threshold that lets `share` of the tokens continue after depth 1
            p = torch.sigmoid(model(ids, depths=torch.full_like(ids, 2)).decider_logits[0, :, 0].float())
        model.threshold = float(torch.quantile(p, 1 - share))
    joint = JointStep(model, Tah2Objective()) if method == "tah2" else None

    def step() -> None:
        if joint is not None:
            joint.begin([b])
            loss = joint.micro(model, b)
        else:
            loss = model(ids, labels=ids, return_decider_logits=False, return_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    res.update(measure(step, repeats))
    if method != "standard":
        with torch.no_grad():
            res["share_deeper"] = float((model(ids).depths > 1).float().mean())
    if joint is not None:
        res["side_tokens"] = joint.side_tokens
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlens", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--max-depth", type=int, default=2)
    ap.add_argument("--share", type=float, default=0.442)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per run (0: torch's default)")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("rest", nargs="*")
    args = ap.parse_args()
    if args.worker:
        method, seqlen = args.rest[0], int(args.rest[1])
        print(json.dumps(worker(method, seqlen, args.max_depth, args.share, args.repeats, args.threads)))
        return
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"# TaH2 joint training step vs Standard SFT (fwd + bwd + AdamW), small Qwen3 {DIMS}, batch 1, "
          f"device {dev}{f', {args.threads} thread(s)' if dev == 'cpu' else ''}, M = {args.max_depth}, "
          f"threshold set for a continuing share of {args.share}")
    print("| T | method | s/step | tokens/s | time / Standard | tokens deeper | side-pass tokens |")
    print("|---|---|---|---|---|---|---|")
    for T in args.seqlens:
        res: dict[str, dict] = {}
        for _ in range(args.rounds):
            for m in METHODS:
                r = run_isolated(__file__, ["--max-depth", str(args.max_depth), "--share", str(args.share),
                                            "--repeats", str(args.repeats), "--threads", str(args.threads), m, str(T)])
                if m not in res or r["seconds"] < res[m]["seconds"]:
                    res[m] = r
        base = res["standard"]["seconds"]
        for m in METHODS:
            r = res[m]
            print(f"| {T} | {m} | {r['seconds']:.3f} | {T / r['seconds']:.0f} | {r['seconds'] / base:.2f}x | "
                  f"{r.get('share_deeper', 0.0):.3f} | {r.get('side_tokens', 0)} |", flush=True)


if __name__ == "__main__":
    main()
