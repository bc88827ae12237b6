"""The paper's whole experiment in one job: SFT reference, oracle labels, TaH / TaH+ / AlwaysThink, evaluation.

    python jobs/experiment.py                                  # the embedded default, jobs/configs/tiny.yaml (make run)
    python jobs/experiment.py --config jobs/configs/tiny.yaml seed=1 output=runs/tiny-seed1
    python jobs/experiment.py --config jobs/configs/tiny.yaml train.optim.epochs=1 eval.limit=30
    ray job submit --working-dir . -- python jobs/experiment.py --config jobs/configs/qwen3-1.7b/tah.yaml \
        output=s3://bucket/tah/qwen3-1.7b reference_model=s3://bucket/sft/qwen3-1.7b

Stages (each skipped when its output is complete, so a re-run resumes):
1. the source tokenized by the label job (its oracle columns unused) -> Standard SFT of the base model;
   the SFT model is the reference (skipped when `reference_model` names one and `standard` is not
   among the methods);
2. oracle labels with the reference (Ray Data actors);
3. from the same base, same data, same steps: TaH+ (unpruned), TaH (one layer pruned), AlwaysThink,
   TaH2 (`tah2`: one joint stage with online labels, the model in `tah2:`);
4. every model through jobs/eval.py on the held-out split (+ the token-level analysis, whose oracle
   policy is the upper bound of paper table 14);
5. `<output>/results.{md,json}` (one row per method), `<output>/hard_tokens.{md,json}` (the oracle's
   hard ratio per domain and per kind of target token), and plots `<output>/results.png`,
   `<output>/eval/<model>/analysis/threshold.png`. Checkpoints are servable:
   `serve run serve.tah:app model=<output>/train/tah/stage2/model`.
With `output=s3://...` labels and checkpoints go to S3 directly; the evaluation and the results are
written in a local scratch directory and uploaded under the same prefix at the end.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from jobs.common import init_ray, parse  # (first: sets Ray's loopback switch before ray is imported)
from jobs.eval import EvalConfig
from jobs.label import LabelConfig
from jobs.train import TrainConfig
from tah.config import TaHConfig
from tah.assets import shipped_base_model, shipped_task, shipped_tokenizer

DEFAULT_RECIPE = str(files("jobs").joinpath("configs", "tiny.yaml"))  # the embedded default

METHODS = {  # name -> (TrainConfig.method, prune, eval policy)
    "standard": ("standard", False, "standard"),
    "always_think": ("always_think", False, "always_think"),
    "tah_plus": ("tah", False, "decider"),
    "tah": ("tah", True, "decider"),
    "tah2": ("tah2", False, "decider"),  # TaH2: one joint stage, labels computed online (needs no oracle)
}


@dataclass
class ExperimentConfig:
    """A whole experiment: base model + source -> every method trained, evaluated and tabled."""

    base_model: str = field(default_factory=shipped_base_model)
    source: str = field(default_factory=shipped_task)
    tokenizer: str = field(default_factory=shipped_tokenizer)
    output: str = "runs/tiny"
    """Local directory or s3://bucket/prefix."""
    reference_model: str = ""
    """The oracle's reference SFT model (local, hub id or s3://); empty: this experiment's Standard."""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    eval_reference: bool = False
    """Also evaluate `reference_model` itself, as it is, at depth 1 (row "reference"): the starting
    point when the experiment fine-tunes an existing model (the real-model recipe)."""
    seed: int = 0
    """Training and sampling seed (the data selection stays fixed by label.seed)."""
    label: LabelConfig = field(default_factory=LabelConfig)
    """Template for both label passes (reference_model, source, output are set per pass)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Template for every training run (method, prune, base_model, labels, name are set per run)."""
    tah2: TaHConfig = field(default_factory=TaHConfig.tah2)
    """The model method tah2 trains (TaHConfig.tah2 fields; max_depth 2 by default): it replaces
    train.model, the v1 model, for that run alone."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Template for the evaluation (models, policies, output, labels are set here)."""

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown methods {bad}; known: {list(METHODS)}")
        if self.eval_reference and not self.reference_model:
            raise ValueError("eval_reference=true needs reference_model (the model to evaluate as it is)")


def _label(cfg: ExperimentConfig, reference: str, output: str) -> str:
    from jobs.label import run as label_run
    from tah import storage

    if storage.exists(storage.join(output, "manifest.json")):
        print(f"[experiment] labels already in {output}", flush=True)
        return output
    label_run(dataclasses.replace(cfg.label, reference_model=reference, source=cfg.source, tokenizer=cfg.tokenizer,
                                  output=output))
    return output


def _train(cfg: ExperimentConfig, name: str, labels: str) -> dict[str, str]:
    from jobs.train import run as train_run
    from tah import storage

    method, prune, _ = METHODS[name]
    tc = dataclasses.replace(cfg.train, method=method, prune=prune, base_model=cfg.base_model, labels=labels,
                             storage_path=storage.join(cfg.output, "train"), name=name, seed=cfg.seed,
                             **({"model": cfg.tah2} if method == "tah2" else {}))
    return train_run(tc)


def results_table(cfg: ExperimentConfig, finals: dict[str, str], summary: list[dict[str, Any]],
                  out: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per method: accuracy overall and per domain, parameters, % iterated, depth, tokens/s;
    and the domains (first-seen order)."""
    rows, domains = [], []
    for s in summary:
        name = s["model"]
        recs = [json.loads(x) for x in (out / "eval" / name / f"{s['benchmark']}.jsonl").read_text().splitlines()]
        by = by_domain(recs)
        domains += [d for d in by if d not in domains]
        per = {dom: sum(r["correct"] for r in rs) / len(rs) for dom, rs in by.items()}
        row = {"method": name, "accuracy": s["accuracy"], **per, "problems": len(recs), "parameters": s["parameters"],
               "pct_iterated": s["pct_iterated"], "avg_depth": s["avg_depth"], "output_tokens": s["output_tokens"],
               "decode_tokens_per_s": s["tokens_per_s"], "checkpoint": finals[name]}
        ana = out / "eval" / name / "analysis" / "analysis.json"
        if ana.exists():
            a = json.loads(ana.read_text())
            row.update({"token_acc_depth1": a["accuracy"]["depth1"], "token_acc_decider": a["accuracy"]["decider"],
                        "token_acc_oracle": a["accuracy"]["oracle"]})
        rows.append(row)
    return rows, domains


def by_domain(recs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The records of each domain, domains in first-seen order, from the ids (`benchmarks.domain_of`;
    benchmarks without domains have none)."""
    from tah.eval.benchmarks import domain_of

    out: dict[str, list[dict[str, Any]]] = {}
    for r in recs:
        if (dom := domain_of(r["id"])) is not None:
            out.setdefault(dom, []).append(r)
    return out


def write_results(cfg: ExperimentConfig, rows: list[dict[str, Any]], seconds: float, out: Path,
                  domains: list[str]) -> None:
    from tah.eval.cost_plot import plot, points
    from tah.eval.harness import markdown_table

    cols = ("method", "accuracy", *domains, "parameters", "pct_iterated", "avg_depth",
            "output_tokens", "decode_tokens_per_s")
    tok_cols = ("method", "token_acc_depth1", "token_acc_decider", "token_acc_oracle")
    md = [f"# Results: {cfg.output} (seed {cfg.seed}, {seconds / 60:.1f} min)", "",
          f"Held-out split of `{cfg.source}`, pass@1 over {cfg.eval.n_samples} sample(s), temperature "
          f"{cfg.eval.sampling.temperature}. Reproduce: `python jobs/experiment.py --config <this recipe> "
          f"seed={cfg.seed}`.", "",
          markdown_table(rows, cols)]
    tok_rows = [r for r in rows if "token_acc_oracle" in r]
    if tok_rows:
        md += ["Teacher-forced next-token accuracy on the labelled validation set (oracle policy = upper bound):", "",
               markdown_table(tok_rows, tok_cols)]
    md += ["", "`results.png`: accuracy against decoding cost (average depth, decode tokens/s), one point per "
           "method, error bars the binomial standard error over the problems; per-domain bars on the right. "
           "Over seeds: `python -m tah.eval.cost_plot <runs>/results.json --out DIR`."]
    (out / "results.md").write_text("\n".join(md))
    (out / "results.json").write_text(json.dumps({"seed": cfg.seed, "seconds": seconds, "domains": domains,
                                                  "rows": rows}, indent=2) + "\n")
    plot(points([rows], tuple(domains)), out / "results.png", f"seed {cfg.seed}, "
         f"{rows[0]['problems'] if rows else 0} problems; error bars: binomial s.e. (overall only)", tuple(domains))


INPUTS_NAME = "experiment.json"


def _files(path: str) -> Any:
    """A local directory's files, each by storage.file_tag (size + SHA-256); other inputs (hub ids,
    s3:// prefixes, single files) by name."""
    from tah import storage

    if storage.is_s3(path) or not Path(path).is_dir():
        return path
    root = Path(path)
    return {f.relative_to(root).as_posix(): storage.file_tag(f) for f in sorted(root.rglob("*")) if f.is_file()}


def inputs(cfg: ExperimentConfig) -> dict[str, Any]:
    """What the stages under `output` are made from: the base model, source and tokenizer (their files'
    digests when local), the reference, the seed and the label / train / TaH2 settings. The methods and
    the evaluation are not in it: adding a method or re-evaluating reuses what is finished."""
    from tah.config import to_dict

    return {"base_model": _files(cfg.base_model), "source": _files(cfg.source), "tokenizer": _files(cfg.tokenizer),
            "reference_model": cfg.reference_model, "seed": cfg.seed, "label": to_dict(cfg.label),
            "train": to_dict(cfg.train), "tah2": to_dict(cfg.tah2)}


def claim_output(cfg: ExperimentConfig) -> None:
    """Record `inputs(cfg)` in a fresh output, or check a rerun's against it. Finished stages are resumed
    by name, so without this a rerun after the base model, the task or a setting changed would table
    checkpoints made from the old ones as if they were new."""
    from tah import storage

    diff, _ = storage.claim(storage.join(cfg.output, INPUTS_NAME), inputs(cfg))
    if not diff:
        return
    raise SystemExit(f"{cfg.output} holds an experiment made from other inputs ({', '.join(diff)} changed since "
                     f"it started, see its {INPUTS_NAME}); its finished stages would be reused as they are: "
                     "pass a new output= (or remove that directory)")


def _check_base(base: str) -> None:
    """Fail early on a local base model that is not there; s3:// and hub ids (org/name, where no local
    `org/` directory exists) are resolved by the stages themselves."""
    from tah import storage

    if storage.is_s3(base) or Path(base, "config.json").exists():
        return
    hub_id = base.count("/") == 1 and not base.startswith((".", "/")) and not Path(base.split("/")[0]).is_dir()
    if not hub_id:
        raise SystemExit(f"no base model at {base}: run `python jobs/pretrain.py` (or pass base_model=)")


def run(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    from jobs.eval import run as eval_run
    from tah import storage

    t0 = time.time()
    if not storage.is_s3(cfg.output):
        cfg = dataclasses.replace(cfg, output=str(Path(cfg.output).resolve()))
    _check_base(cfg.base_model)
    claim_output(cfg)
    finals: dict[str, str] = {}
    if "standard" in cfg.methods or not cfg.reference_model:
        sft_data = _label(cfg, cfg.base_model, storage.join(cfg.output, "sft-data"))
        finals["standard"] = _train(cfg, "standard", sft_data)["standard"]
    reference = cfg.reference_model or finals["standard"]
    labels = _label(cfg, reference, storage.join(cfg.output, "labels"))
    for name in cfg.methods:
        if name != "standard":
            finals[name] = list(_train(cfg, name, labels).values())[-1]
    finals = {**({"reference": reference} if cfg.eval_reference else {}), **{m: finals[m] for m in cfg.methods}}
    policies = {m: METHODS[m][2] if m in METHODS else "standard" for m in finals}
    # The held-out split of the task trained on (the tinytask reader's default is the shipped copy).
    own = "tinytask" in cfg.eval.benchmarks and "tinytask" not in cfg.eval.sources and Path(cfg.source, "math").is_dir()
    sources = {**cfg.eval.sources, **({"tinytask": cfg.source} if own else {})}
    # Evaluation records and results are files a person reads: written locally, uploaded when remote.
    with storage.staged_dir(cfg.output, prefix="tah-experiment-") as out:
        ecfg = dataclasses.replace(cfg.eval, models=finals, policies=policies,
                                   sources=sources, output=str(out / "eval"), labels=labels, tokenizer=cfg.tokenizer,
                                   seed=cfg.seed)
        summary = eval_run(ecfg)
        from tah.eval.hard_tokens import report_for, report_markdown

        hard = report_for(labels, cfg.tokenizer)  # which tokens the reference gets wrong, by kind
        (out / "hard_tokens.json").write_text(json.dumps(hard, indent=2) + "\n")
        (out / "hard_tokens.md").write_text(report_markdown(hard, f"Hard tokens of {labels}"))
        rows, domains = results_table(cfg, finals, summary, out)
        write_results(cfg, rows, time.time() - t0, out, domains)
        print((out / "results.md").read_text(), flush=True)
    if storage.is_s3(cfg.output):
        print(f"[experiment] evaluation and results uploaded to {cfg.output}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse(ExperimentConfig, argv if "--config" in argv else ["--config", DEFAULT_RECIPE, *argv],
                __doc__.split("\n")[0])
    init_ray(output=cfg.output)
    return run(cfg)


if __name__ == "__main__":
    from jobs.experiment import main as package_main  # the package's copy (see jobs/train.py)

    package_main()
