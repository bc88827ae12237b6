"""Accuracy against decoding cost, one point per method with error bars: the shape of the paper's figures.

A method's point: its task accuracy (pass@1) against its average depth per generated token and against
its measured decode tokens/s. Over several seeds the point is the mean and the error bar the standard
error of the mean across seeds (sd / sqrt(seeds)); from one run the accuracy's bar is the binomial
standard error over its problems, sqrt(p (1 - p) / n), and the cost's bar is absent (one measurement).
`jobs/experiment.py` draws one run's figure into `<output>/results.png`; this module's command
aggregates seed runs (their `results.json`) into one table and one figure:

    python -m tah.eval.cost_plot runs/tiny-seed*/results.json --out runs/tiny-seeds
    python -m tah.eval.cost_plot runs/tiny-seed*/results.json runs/tiny-tah2-seed*/results.json \
        --merge-seeds --out runs/tiny-seeds      # tah2's rows from its own reruns, per seed
    make seeds          # 5 seeds of `make run` + TaH2 at M = 4, then this aggregation
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

COST_AXES = (("avg_depth", "average depth per generated token"), ("decode_tokens_per_s", "decode tokens / s"))


def _sem(values: list[float]) -> float:
    """Standard error of the mean across runs (0 for a single run)."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def points(runs: list[list[dict[str, Any]]], domains: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Per method, over the runs it appears in (each run: its results rows): mean and error of accuracy,
    of each of `domains`' accuracy (a row key each), average depth and tokens/s, the iterated share,
    and how many runs. Methods keep their first order."""
    order: list[str] = []
    by: dict[str, list[dict[str, Any]]] = {}
    for rows in runs:
        for r in rows:
            if r["method"] not in by:
                order.append(r["method"])
            by.setdefault(r["method"], []).append(r)
    out = []
    for m in order:
        rs = by[m]
        acc = [float(r["accuracy"]) for r in rs]
        p = {"method": m, "runs": len(rs), "accuracy": statistics.fmean(acc)}
        if len(rs) > 1:
            p["accuracy_err"] = _sem(acc)
        else:  # one run: the binomial error of its problems (none when the count is unknown)
            n = rs[0].get("problems") or 0
            p["accuracy_err"] = math.sqrt(p["accuracy"] * (1 - p["accuracy"]) / n) if n else 0.0
        for dom in domains:  # per-domain accuracy: mean and s.e. across runs (the targets are per domain)
            vals = [float(r[dom]) for r in rs if r.get(dom) is not None and not math.isnan(float(r[dom]))]
            p[dom] = statistics.fmean(vals) if vals else float("nan")
            p[dom + "_err"] = _sem(vals) if vals else 0.0
        for key, _ in COST_AXES:
            vals = [float(r[key]) for r in rs if r.get(key) is not None]
            p[key] = statistics.fmean(vals) if vals else float("nan")
            p[key + "_err"] = _sem(vals) if vals else 0.0
        p["pct_iterated"] = statistics.fmean(float(r.get("pct_iterated") or 0.0) for r in rs)
        out.append(p)
    return out


def plot(pts: list[dict[str, Any]], path: Path, title: str, domains: tuple[str, ...] = ()) -> None:
    """Accuracy vs average depth and vs tokens/s (error bars both ways), plus per-domain bars (with the
    points' errors) when `domains` is given. Written as PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(COST_AXES) + (1 if domains else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, label) in zip(axes, COST_AXES):
        for i, p in enumerate(pts):
            if math.isnan(p[key]):
                continue
            ax.errorbar(p[key], p["accuracy"], xerr=p[key + "_err"] or None, yerr=p["accuracy_err"] or None,
                        fmt="o", capsize=3, color=colors[i % len(colors)], label=p["method"])
            ax.annotate(p["method"], (p[key], p["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel("task accuracy (pass@1)")
        ax.grid(alpha=0.3)
    axes[0].set_title(title, fontsize=8, loc="left")
    if domains:
        ax = axes[-1]
        doms = ("accuracy", *domains)
        w = 0.8 / len(doms)
        for i, dom in enumerate(doms):
            ax.bar([j + w * i for j in range(len(pts))], [p.get(dom, float("nan")) for p in pts], width=w,
                   yerr=[p.get(dom + "_err", 0.0) for p in pts], capsize=2, label=dom)
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(pts))], [p["method"] for p in pts], fontsize=7,
                      rotation=20)
        ax.set_ylabel("pass@1")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(pts: list[dict[str, Any]], domains: tuple[str, ...] = ()) -> str:
    lines = ["| method | runs | accuracy ± s.e. | " + "".join(f"{d} ± s.e. | " for d in domains)
             + "% iterated | avg depth ± s.e. | decode tok/s ± s.e. |",
             "|---|---|---|" + "---|" * len(domains) + "---|---|---|"]
    for p in pts:
        lines.append(f"| {p['method']} | {p['runs']} | {p['accuracy']:.3f} ± {p['accuracy_err']:.3f} | "
                     + "".join(f"{p[d]:.3f} ± {p[d + '_err']:.3f} | " for d in domains)
                     + f"{p['pct_iterated']:.1f} | {p['avg_depth']:.3f} ± {p['avg_depth_err']:.3f} | "
                     f"{p['decode_tokens_per_s']:.0f} ± {p['decode_tokens_per_s_err']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+", type=Path, help="results.json of each run (one seed each)")
    ap.add_argument("--out", type=Path, required=True, help="directory for seeds.md, seeds.json, seeds.png")
    ap.add_argument("--merge-seeds", action="store_true",
                    help="files of the same seed form one run, a later file's method replacing an earlier "
                         "file's row of that method (a rerun of some methods beside the full runs)")
    args = ap.parse_args(argv)
    runs, seeds, domains = [], [], []
    for f in args.results:
        doc = json.loads(f.read_text())
        seed = doc.get("seed")
        domains += [d for d in doc.get("domains", []) if d not in domains]
        if args.merge_seeds and seed in seeds:
            if seed is None:
                raise SystemExit(f"{f}: no seed recorded, so --merge-seeds cannot place it")
            rows = runs[seeds.index(seed)]
            new = {r["method"]: r for r in doc["rows"]}
            rows[:] = [new.pop(r["method"], r) for r in rows] + list(new.values())
            continue
        runs.append(list(doc["rows"]))
        seeds.append(seed)
    pts = points(runs, tuple(domains))
    args.out.mkdir(parents=True, exist_ok=True)
    title = f"{len(runs)} runs (seeds {', '.join(str(s) for s in seeds)}); error bars: s.e. across runs"
    plot(pts, args.out / "seeds.png", title, tuple(domains))
    table = markdown(pts, tuple(domains))
    (args.out / "seeds.md").write_text(f"# {title}\n\n" + table)
    (args.out / "seeds.json").write_text(json.dumps({"seeds": seeds, "domains": domains, "points": pts},
                                                    indent=2) + "\n")
    print(table, f"\n-> {args.out}/seeds.{{md,json,png}}", sep="")
    return pts


if __name__ == "__main__":
    main()
