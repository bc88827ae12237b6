"""Token-level analysis of a TaH checkpoint on a labelled validation set (paper figs. 1/3/4b, table 17).

Teacher-forced next-token predictions at the assistant positions:
- accuracy at depth 1, and after depth 2 under the oracle's depths and under the decider's;
- among the tokens that iterate, how many wrong depth-1 predictions depth 2 fixes and how many right
  ones it breaks (latent overthinking);
- the decider against the oracle's continue labels: accuracy, precision, recall;
- the tokens that iterate most and what their prediction changes into;
- accuracy and % iterated vs the decider threshold (threshold.png beside analysis.json / .md).

    python -m tah.eval.analysis runs/tiny/train/tah/stage2/model runs/tiny/labels runs/tiny/analysis
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..model import TaHForCausalLM, next_token_targets
from ..oracle import row_depths, row_labels

THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


def _ratio(a: int, b: int) -> float:
    return a / b if b else float("nan")


@torch.no_grad()
def token_analysis(model: TaHForCausalLM, rows: list[dict[str, Any]], tokenizer: Any = None,
                   thresholds: tuple[float, ...] = THRESHOLDS) -> dict[str, Any]:
    model.eval()
    thr0 = model.threshold
    c: Counter = Counter()
    sweep = {t: Counter() for t in thresholds}
    changes: Counter = Counter()
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        target = next_token_targets(row_labels(row)[None], torch.ones_like(ids, dtype=torch.bool))[0]  # (T,)
        at = target != -100
        if not bool(at.any()):
            continue
        gold = target[at]
        oracle = row_depths(row, "tah", 2)[None]
        p1 = model(ids, depths=torch.ones_like(ids)).logits[0].argmax(-1)[at]
        f2 = model(ids, depths=torch.full_like(ids, 2))
        prob = torch.sigmoid(f2.decider_logits[0, :, 0])[at]
        p_or = model(ids, depths=oracle).logits[0].argmax(-1)[at]
        dec = model(ids, threshold=thr0)
        p_dec, it_dec = dec.logits[0].argmax(-1)[at], (dec.depths[0] > 1)[at]
        it_or = (oracle[0] > 1)[at]
        ok1 = p1 == gold
        c["tokens"] += int(at.sum())
        c["right_depth1"] += int(ok1.sum())
        for name, pred, it in (("oracle", p_or, it_or), ("decider", p_dec, it_dec)):
            ok = pred == gold
            c[f"right_{name}"] += int(ok.sum())
            c[f"iterated_{name}"] += int(it.sum())
            c[f"fixed_{name}"] += int((it & ~ok1 & ok).sum())
            c[f"broken_{name}"] += int((it & ok1 & ~ok).sum())
        says = prob > thr0
        c["tp"] += int((says & it_or).sum())
        c["fp"] += int((says & ~it_or).sum())
        c["fn"] += int((~says & it_or).sum())
        c["tn"] += int((~says & ~it_or).sum())
        for a, b in zip(p1[it_dec].tolist(), p_dec[it_dec].tolist()):
            changes[(a, b)] += 1
        for t in thresholds:
            out = model(ids, threshold=t)
            sweep[t]["right"] += int((out.logits[0].argmax(-1)[at] == gold).sum())
            sweep[t]["iterated"] += int((out.depths[0] > 1)[at].sum())
    n = c["tokens"]
    dec = lambda t: tokenizer.decode([t]) if tokenizer is not None else str(t)  # noqa: E731
    top_in: Counter = Counter()
    for (a, _), k in changes.items():
        top_in[a] += k
    top = []
    for a, k in top_in.most_common(15):
        into = Counter({b: m for (x, b), m in changes.items() if x == a})
        top.append({"token": dec(a), "iterations": k,
                    "changes_into": [{"token": dec(b), "count": m} for b, m in into.most_common(3)]})
    return {
        "tokens": n, "threshold": thr0,
        "accuracy": {"depth1": _ratio(c["right_depth1"], n), "oracle": _ratio(c["right_oracle"], n),
                     "decider": _ratio(c["right_decider"], n)},
        "iterated_share": {"oracle": _ratio(c["iterated_oracle"], n), "decider": _ratio(c["iterated_decider"], n)},
        "fixed": {"oracle": c["fixed_oracle"], "decider": c["fixed_decider"]},
        "broken": {"oracle": c["broken_oracle"], "decider": c["broken_decider"]},
        "decider_vs_oracle": {"accuracy": _ratio(c["tp"] + c["tn"], n), "precision": _ratio(c["tp"], c["tp"] + c["fp"]),
                              "recall": _ratio(c["tp"], c["tp"] + c["fn"])},
        "top_iterated_tokens": top,
        "threshold_sweep": [{"threshold": t, "accuracy": _ratio(s["right"], n), "pct_iterated": 100 * _ratio(s["iterated"], n)}
                            for t, s in sweep.items()],
    }


def plot_threshold(sweep: list[dict[str, float]], path: Path, accuracy: str = "next-token accuracy",
                   extra: dict[str, str] | None = None) -> None:
    """Accuracy (left axis) and % tokens iterated (right axis) against the decider threshold, one
    point per entry of `sweep` ({threshold, accuracy, pct_iterated, ...}); `extra` adds more accuracy
    series by key -> label (the sweep job adds the token accuracy beside pass@1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = sorted(sweep, key=lambda s: s["threshold"])
    fig, ax = plt.subplots(figsize=(5, 3.2))
    t = [s["threshold"] for s in sweep]
    ax.plot(t, [s.get("accuracy", float("nan")) for s in sweep], "o-", color="tab:blue", label=accuracy)
    for (key, label), style in zip((extra or {}).items(), ("^:", "v-.", "d:")):
        if any(key in s for s in sweep):
            ax.plot(t, [s.get(key, float("nan")) for s in sweep], style, label=label)
    ax.set_xlabel("decider threshold")
    ax.set_ylabel(accuracy, color="tab:blue")
    if extra:
        ax.legend(fontsize=7, loc="lower left")
    ax2 = ax.twinx()
    ax2.plot(t, [s.get("pct_iterated", float("nan")) for s in sweep], "s--", color="tab:orange")
    ax2.set_ylabel("% tokens iterated", color="tab:orange")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(res: dict[str, Any]) -> str:
    a, it = res["accuracy"], res["iterated_share"]
    lines = [f"# Token-level analysis ({res['tokens']} labelled tokens, threshold {res['threshold']})", "",
             "| policy | next-token accuracy | % iterated | fixed by depth 2 | broken by depth 2 |", "|---|---|---|---|---|",
             f"| depth 1 only | {a['depth1']:.4f} | 0 | | |"]
    for p in ("oracle", "decider"):
        lines.append(f"| {p} | {a[p]:.4f} | {100 * it[p]:.2f} | {res['fixed'][p]} | {res['broken'][p]} |")
    d = res["decider_vs_oracle"]
    lines += ["", f"Decider vs oracle labels: accuracy {d['accuracy']:.4f}, precision {d['precision']:.4f}, "
              f"recall {d['recall']:.4f}", "", "| token | iterations | most common change |", "|---|---|---|"]
    for t in res["top_iterated_tokens"]:
        ch = ", ".join(f"{c['token']!r} x{c['count']}" for c in t["changes_into"])
        lines.append(f"| {t['token']!r} | {t['iterations']} | {ch} |")
    lines += ["", "| threshold | accuracy | % iterated |", "|---|---|---|"]
    lines += [f"| {s['threshold']} | {s['accuracy']:.4f} | {s['pct_iterated']:.2f} |" for s in res["threshold_sweep"]]
    return "\n".join(lines) + "\n"


def analyze(checkpoint: str, labels: str, output: str | Path, max_rows: int = 64) -> dict[str, Any]:
    """Run the analysis on the first `max_rows` validation rows; write analysis.{json,md} and threshold.png."""
    from ..data.labeling import read_validation_rows
    from ..tokenizer import checkpoint_tokenizer, load_tokenizer

    model = TaHForCausalLM.from_pretrained(checkpoint)
    if model.config.max_depth < 2:
        raise ValueError(f"{checkpoint} has max_depth {model.config.max_depth}: nothing iterates to analyse")
    rows = read_validation_rows(labels)
    res = token_analysis(model, rows[:max_rows], load_tokenizer(checkpoint_tokenizer(checkpoint)))
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "analysis.md").write_text(markdown(res))
    plot_threshold(res["threshold_sweep"], out / "threshold.png")
    return res


if __name__ == "__main__":
    analyze(*sys.argv[1:4])
