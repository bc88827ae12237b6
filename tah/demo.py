"""A two-minute tour of the TaH model core on a tiny random Qwen3 (what `make run` runs for now).

Builds a tiny Qwen3 backbone, wraps it in TaH (max depth 3), checks depth 1 against the plain HF
model, runs a forward pass with mixed depths, generates with the decider choosing depths per token,
and saves + reloads the checkpoint. Prints which attention path ran at each stage.

    python -m tah.demo [--out runs/demo]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from .config import DeciderSettings, LoraSettings, TaHConfig
from .model import TaHForCausalLM
from .testing import randomize_lora, random_depths, tiny_qwen3


def _paths(model: TaHForCausalLM) -> str:
    s = ", ".join(f"{k} x{v}" for k, v in sorted(model.attention_paths.items()))
    model.attention_paths.clear()
    return s


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/demo", help="where the demo checkpoint is written")
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    hf = tiny_qwen3(vocab_size=512, hidden_size=64, num_layers=4)
    plain = copy.deepcopy(hf)
    cfg = TaHConfig(max_depth=3, lora=LoraSettings(r=8, alpha=16), decider=DeciderSettings(width=64, blocks=2))
    model = TaHForCausalLM.from_backbone(hf, cfg).eval()
    randomize_lora(model, scale=0.1)  # a fresh adapter is a no-op (B = 0); make depth >= 2 visible
    rep = model.parameter_report()
    print(f"TaH over tiny Qwen3: {rep['backbone']['total']:,} backbone + {rep['lora']['total']:,} LoRA + "
          f"{rep['decider']['total']:,} decider parameters; decider reads hidden states {model.decider_layers}")

    ids = torch.randint(3, 512, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding on row 2
    with torch.no_grad():
        d1 = model(ids, attention_mask=mask, depths=torch.ones_like(ids)).logits
        ref = plain(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0)).logits
        err = (d1 - ref)[mask.bool()].abs().max().item()
        print(f"[1] all tokens at depth 1 vs plain HF Qwen3: max |diff| = {err:.2e}   ({_paths(model)})")

        depths = random_depths(2, 24, 3, hard_fraction=0.25, seed=1)
        out = model(ids, attention_mask=mask, depths=depths)
        v = mask.bool()
        share = {d: int(((out.depths == d) & v).sum()) for d in (1, 2, 3)}
        print(f"[2] forced mixed depths: tokens per depth {share}; depth >= 2 ran packed   ({_paths(model)})")

        probs = torch.sigmoid(model(ids, attention_mask=mask, depths=torch.full_like(ids, 3)).decider_logits)
        thr = float(probs[..., 0][v].quantile(0.8))  # the untrained decider: pick a threshold it crosses
        model.attention_paths.clear()
        t0 = time.perf_counter()
        gen = model.generate(ids[:, -8:], attention_mask=mask[:, -8:], max_new_tokens=16, threshold=thr)
        dt = time.perf_counter() - t0
        print(f"[3] generate 16 tokens x 2 rows, decider threshold {thr:.3f}: {32 / dt:.0f} tok/s, "
              f"tokens per depth {gen.tokens_per_depth()}   ({_paths(model)})")
        for b in range(2):
            toks = gen.sequences[b, 8:].tolist()
            print(f"    row {b}: " + " ".join(f"{t}@d{d}" if d else f"{t}" for t, d in zip(toks, gen.depths[b].tolist())))

        out_dir = Path(args.out)
        model.save_pretrained(out_dir)
        again = TaHForCausalLM.from_pretrained(out_dir).eval()
        same = torch.equal(again(ids, attention_mask=mask, depths=depths).logits[v], out.logits[v])
        files = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
        print(f"[4] saved to {out_dir} ({', '.join(files)}); reloaded logits identical: {same}")


if __name__ == "__main__":
    main()
