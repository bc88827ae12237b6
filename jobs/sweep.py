"""Ray Tune sweeps: the decider threshold or the maximum depth (evaluation only), and LoRA rank x pruned
layer x learning rate (train + evaluate, ASHA on the validation loss).

    python jobs/sweep.py --config jobs/configs/sweep/tiny-threshold.yaml     # after `make run`
    python jobs/sweep.py --config jobs/configs/sweep/tiny-train.yaml
    ray job submit --working-dir . -- python jobs/sweep.py --config jobs/configs/sweep/qwen3-1.7b.yaml \\
        output=s3://bucket/sweeps train.labels=s3://bucket/labels

`kind: threshold` decodes the evaluation problems with one TaH checkpoint (v1 or TaH2) once per threshold
(label once, decode many; one engine per trial); `kind: max_depth` likewise once per maximum depth
(`max_depths`: each request's max_depth, 1..the checkpoint's M, at the eval's threshold). `kind: train` trains TaH (stage 1 + stage 2) once per grid
point: each trial is a Ray Tune function that runs a Ray Train `TorchTrainer` (Ray 2.60's way of
running Train inside Tune; a callback forwards the workers' reports), then evaluates the model.
ASHA stops trials whose stage-1 validation loss lags. Trials are named after their settings, so
re-running the same command restores the experiment (`Tuner.restore`): finished trials are kept,
unfinished ones resume from their Train checkpoints. Writes `<output>/<name>/results.{md,json}`,
PNG plots, and `best.yaml`: the best setting as a recipe for `python jobs/train.py --config`.

A train trial that ASHA stops is killed while its TorchTrainer runs; Ray Train's placement-group
cleaner then frees that run's workers, and it sees the controller die through the dashboard's state
API. A local sweep therefore starts Ray with its dashboard, and a train sweep refuses to start on a
cluster whose state API does not answer (without it each stopped trial would keep its workers'
CPUs/GPUs reserved until the sweep's driver exits, and the trials after it would wait).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from jobs.common import absolute_local, init_ray, parse  # (first: sets Ray's loopback switch before ray is imported)
from jobs.eval import EvalConfig, worker_args
from jobs.train import TrainConfig
from tah.config import check_choices



@dataclass
class AshaSettings:
    """ASHA over Tune's training_iteration (one per report: each validation of a Train stage)."""

    grace_period: int = 2
    reduction_factor: int = 2
    max_t: int = 10_000


@dataclass
class SweepConfig:
    """jobs/sweep.py: a grid of trials, each evaluated on the same problems."""

    kind: Literal["threshold", "max_depth", "train"] = "threshold"
    """threshold | max_depth (evaluation only) | train (LoRA rank x pruned layer x lr: train then evaluate)."""
    name: str = "sweep"
    output: str = "runs/sweep"
    """Tune's storage and the results (local dir or s3://bucket/prefix)."""
    checkpoint: str = "runs/tiny/train/tah_plus/stage2/model"
    """kind=threshold | max_depth: the TaH checkpoint to decode with."""
    thresholds: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.9, 0.95, 0.99])
    max_depths: list[int] = field(default_factory=list)
    """kind=max_depth: the maximum depths to decode with (1 = the backbone alone)."""
    lora_ranks: list[int] = field(default_factory=list)
    """kind=train grid axes; an empty axis keeps the template's value."""
    prune_layers: list[int] = field(default_factory=list)
    """-1: no pruning (TaH+); i >= 0: decoder layer i removed before training (TaH); -2: the layer
    whose removal raises perplexity least (as jobs/train.py's prune=true)."""
    lrs: list[float] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)
    """kind=train: the template recipe every trial starts from (method tah)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Problems, sampling and engine settings for every trial."""
    select: Literal["accuracy", "val_loss"] = "accuracy"
    """The metric that picks the best trial: accuracy (max) or val_loss (min)."""
    max_concurrent_trials: int = 1
    cpus_per_trial: float = 1.0
    """Threshold trials' engine; train trials take none (their Train workers hold the resources)."""
    gpus_per_trial: float = 0.0
    asha: AshaSettings = field(default_factory=AshaSettings)

    def __post_init__(self) -> None:
        check_choices(self)
        if self.kind == "threshold" and not self.thresholds:
            raise ValueError("kind=threshold needs at least one value in thresholds")
        if any(not 0.0 <= t <= 1.0 for t in self.thresholds):
            raise ValueError(f"thresholds must lie in [0, 1], got {self.thresholds}")
        if self.kind == "max_depth" and not self.max_depths:
            raise ValueError("kind=max_depth needs at least one value in max_depths")
        if any(not isinstance(m, int) or m < 1 for m in self.max_depths):
            raise ValueError(f"max_depths must be integers >= 1, got {self.max_depths}")
        if self.kind == "train" and self.train.method != "tah":
            raise ValueError(f"kind=train sweeps TaH: train.method must be tah, got {self.train.method!r}")
        if any(r < 1 for r in self.lora_ranks) or any(p < -2 for p in self.prune_layers):
            raise ValueError("lora_ranks must be >= 1 and prune_layers >= -2 (-1: no pruning, -2: by perplexity)")


def grid(cfg: SweepConfig) -> list[dict[str, Any]]:
    """Every trial's settings, in a fixed order."""
    if cfg.kind == "threshold":
        return [{"threshold": t} for t in cfg.thresholds]
    if cfg.kind == "max_depth":
        return [{"max_depth": m} for m in cfg.max_depths]
    ranks = cfg.lora_ranks or [cfg.train.model.lora.r]
    template_layer = -1 if not cfg.train.prune else (-2 if cfg.train.prune_layer is None else cfg.train.prune_layer)
    layers = cfg.prune_layers or [template_layer]
    lrs = cfg.lrs or [cfg.train.optim.lr]
    return [{"lora_r": r, "prune_layer": p, "lr": lr} for r in ranks for p in layers for lr in lrs]


def trial_name(point: dict[str, Any]) -> str:
    """A stable name from the settings: a restored sweep finds each trial's Train run under it."""
    if "threshold" in point:
        return f"threshold-{point['threshold']:g}"
    if "max_depth" in point:
        return f"max_depth-{point['max_depth']}"
    layer = {-1: "none", -2: "auto"}.get(point["prune_layer"], str(point["prune_layer"]))
    return f"r{point['lora_r']}-prune-{layer}-lr{point['lr']:g}"


def trial_train_config(cfg: SweepConfig, point: dict[str, Any]) -> TrainConfig:
    """The template recipe with this trial's settings (LoRA alpha scaled with the rank)."""
    t = cfg.train
    lora = dataclasses.replace(t.model.lora, r=point["lora_r"], alpha=max(1, t.model.lora.alpha * point["lora_r"] // t.model.lora.r))
    layer = point["prune_layer"]
    return dataclasses.replace(t, model=dataclasses.replace(t.model, lora=lora),
                               optim=dataclasses.replace(t.optim, lr=point["lr"]), prune=layer != -1,
                               prune_layer=layer if layer >= 0 else None)


def evaluate(checkpoint: str, cfg: SweepConfig, threshold: float | None,
             max_depth: int | None = None) -> dict[str, float]:
    """Decode the problems with one engine in this process (every request capped at `max_depth`, None:
    the checkpoint's), grade, and (with labels) measure the teacher-forced next-token accuracy at the
    same threshold and depth cap."""
    from tah.eval.benchmarks import load_benchmark
    from tah.eval.harness import grade, run_local, summarize

    ecfg = dataclasses.replace(cfg.eval, engine=dataclasses.replace(cfg.eval.engine, threshold=threshold),
                               sampling=dataclasses.replace(cfg.eval.sampling, max_depth=max_depth))
    problems = [p for b in ecfg.benchmarks for p in load_benchmark(b, ecfg.sources.get(b), ecfg.limit)]
    records = grade(run_local(checkpoint, problems, ecfg.batch_size, **worker_args(ecfg)), problems,
                    ecfg.grade_workers, ecfg.sandbox)
    rows = summarize("trial", records)
    n = sum(r["samples"] for r in rows)
    out = {"accuracy": sum(r["accuracy"] * r["samples"] for r in rows) / n,
           "pct_iterated": sum(r["pct_iterated"] * r["samples"] for r in rows) / n,
           "avg_depth": sum(r["avg_depth"] * r["samples"] for r in rows) / n,
           "tokens_per_s": sum(r["tokens_per_s"] * r["samples"] for r in rows) / n,
           "parameters": rows[0]["parameters"]}
    if ecfg.labels and (max_depth is None or max_depth >= 2):  # (at depth 1 alone nothing iterates)
        out.update(token_metrics(checkpoint, ecfg.labels, threshold, max_depth=max_depth))
    return out


def token_metrics(checkpoint: str, labels: str, threshold: float | None, max_rows: int = 32,
                  max_depth: int | None = None) -> dict[str, float]:
    from tah import TaHForCausalLM
    from tah.data.labeling import read_validation_rows
    from tah.eval.analysis import token_analysis

    overrides = {k: v for k, v in (("threshold", threshold), ("max_depth", max_depth)) if v is not None}
    model = TaHForCausalLM.from_pretrained(checkpoint, **overrides)
    res = token_analysis(model, read_validation_rows(labels)[:max_rows], thresholds=())
    return {"token_acc": res["accuracy"]["decider"], "token_acc_depth1": res["accuracy"]["depth1"],
            "token_acc_oracle": res["accuracy"]["oracle"], "token_pct_iterated": 100 * res["iterated_share"]["decider"],
            "decider_precision": res["decider_vs_oracle"]["precision"],
            "decider_recall": res["decider_vs_oracle"]["recall"]}


def threshold_trial(config: dict[str, Any], sweep: dict[str, Any]) -> None:
    """One evaluation-only Tune trial: decode at config["threshold"] or config["max_depth"] (the other
    setting: the eval's engine threshold / the checkpoint's M)."""
    import ray.tune

    from tah.config import from_dict

    cfg = from_dict(SweepConfig, sweep)
    ray.tune.report(evaluate(cfg.checkpoint, cfg, config.get("threshold", cfg.eval.engine.threshold),
                             config.get("max_depth")))


def _stage_report_callback(stage1_val_loss: float | None):
    """Ray Train -> Tune: the workers' reports. ASHA compares stage-1 language-model losses only, and
    Tune wants its metric in every result: stage 2's own validation loss (the decider's BCE) goes as
    decider_val_loss, and val_loss stays the one of the model stage 1 handed on."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class StageReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            m = dict(metrics[0])
            if m.get("stage") == 2:
                m["decider_val_loss"] = m.pop("val_loss", float("nan"))
                m["val_loss"] = stage1_val_loss
            self._training_actor_item_queue.put(m)

    return StageReport()


def train_trial(config: dict[str, Any], sweep: dict[str, Any]) -> None:
    """One Tune trial: TaH stage 1 + stage 2 with this trial's settings (a TorchTrainer per stage),
    then the final evaluation report."""
    import ray.tune

    from jobs.train import run as train_run
    from tah import storage
    from tah.config import from_dict

    cfg = from_dict(SweepConfig, sweep)
    point = {k: config[k] for k in ("lora_r", "prune_layer", "lr")}
    tc = dataclasses.replace(trial_train_config(cfg, point), name=trial_name(point),
                             storage_path=storage.join(cfg.output, cfg.name, "trials"))
    base = storage.join(tc.storage_path, tc.name)

    def callbacks(stage: str) -> list:  # called as each stage starts: stage 1's result exists by stage 2
        if stage == "stage1":
            return [_stage_report_callback(None)]
        return [_stage_report_callback(json.loads(storage.read_bytes(storage.join(base, "stage1", "result.json")))
                                       ["val_loss"])]

    finals = train_run(tc, callbacks=callbacks)
    stage1 = json.loads(storage.read_bytes(storage.join(base, "stage1", "result.json")))
    stage2 = json.loads(storage.read_bytes(storage.join(base, "stage2", "result.json")))
    metrics = {"val_loss": stage1["val_loss"], "decider_val_loss": stage2["val_loss"], "stage": 3,
               "checkpoint": finals["stage2"], **evaluate(finals["stage2"], cfg, None)}
    if tc.prune:
        pruned_base = storage.resolve(storage.join(base, "pruned-base"))  # on S3: its published version
        pruning = json.loads(storage.read_bytes(storage.join(pruned_base, "pruning.json")))
        metrics["pruned_layer"] = pruning["pruned_layer"]
        metrics["ppl_increase"] = pruning["ppl_increase"][str(pruning["pruned_layer"])]
    ray.tune.report(metrics)


def tuner(cfg: SweepConfig):
    """A new Tuner for cfg, or the restored one when its experiment exists (a driver restart)."""
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler

    from tah import storage
    from tah.config import to_dict

    fn = train_trial if cfg.kind == "train" else threshold_trial
    # A train trial only drives its TorchTrainer, whose workers reserve their own CPUs/GPUs: the trial
    # takes no CPU (a fraction would leave no whole CPU for a worker on a small node). Tune refuses an
    # empty request, so it asks for a little memory instead.
    resources = ({"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial} if cfg.kind != "train"
                 else {"cpu": 0, "memory": 2**26})
    trainable = ray.tune.with_resources(ray.tune.with_parameters(fn, sweep=to_dict(cfg)), resources)
    storage_fs, storage_path = (storage.pyarrow_fs(cfg.output) if storage.is_s3(cfg.output)
                                else (None, str(Path(cfg.output).resolve())))
    path = f"{storage_path.rstrip('/')}/{cfg.name}"
    if ray.tune.Tuner.can_restore(path, storage_filesystem=storage_fs):
        print(f"[sweep] restoring {storage.join(cfg.output, cfg.name)}", flush=True)
        return ray.tune.Tuner.restore(path, trainable=trainable, resume_errored=True, storage_filesystem=storage_fs)
    points = grid(cfg)
    # Tune's grid_search over each axis runs their product: the same points as grid(cfg).
    space = {k: ray.tune.grid_search(sorted({p[k] for p in points})) for k in points[0]}
    scheduler = (ASHAScheduler(metric="val_loss", mode="min", time_attr="training_iteration",
                               grace_period=cfg.asha.grace_period, reduction_factor=cfg.asha.reduction_factor,
                               max_t=cfg.asha.max_t) if cfg.kind == "train" else None)
    return ray.tune.Tuner(
        trainable, param_space=space,
        tune_config=ray.tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=cfg.max_concurrent_trials,
                                        trial_name_creator=lambda t: trial_name(t.config),
                                        trial_dirname_creator=lambda t: trial_name(t.config)),
        run_config=ray.tune.RunConfig(name=cfg.name, storage_path=storage_path, storage_filesystem=storage_fs,
                                      failure_config=ray.tune.FailureConfig(max_failures=1)))


COLUMNS = {"threshold": ("trial", "threshold", "accuracy", "pct_iterated", "tokens_per_s", "token_acc",
                         "token_pct_iterated", "decider_precision", "decider_recall"),
           "max_depth": ("trial", "max_depth", "accuracy", "avg_depth", "pct_iterated", "tokens_per_s", "token_acc",
                         "token_pct_iterated"),
           "train": ("trial", "lora_r", "prune_layer", "lr", "status", "stopped_at_step", "val_loss",
                     "decider_val_loss", "accuracy", "pct_iterated", "ppl_increase", "parameters", "token_acc",
                     "token_acc_oracle")}


def collect(cfg: SweepConfig, results) -> list[dict[str, Any]]:
    """One row per trial from Tune's ResultGrid: its settings and last metrics ("stopped" = by ASHA)."""
    rows = []
    for r in results:
        m = dict(r.metrics or {})
        point = {k: r.config[k] for k in r.config}
        finished = m.get("stage") == 3 or cfg.kind != "train"
        status = "error" if r.error else ("done" if finished else "stopped")
        row = {"trial": trial_name(point), **point, "status": status,
               **{k: v for k, v in m.items() if isinstance(v, (int, float, str)) and k not in point}}
        if status == "stopped":  # its val_loss is the one at this stage-1 step, not a finished run's
            row["stopped_at_step"] = m.get("step")
        rows.append(row)
    return sorted(rows, key=lambda x: x["trial"])


def best_row(cfg: SweepConfig, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    done = [r for r in rows if r["status"] == "done" and isinstance(r.get(cfg.select), (int, float))
            and not math.isnan(r[cfg.select])]
    if not done:
        return None
    sign = -1 if cfg.select == "accuracy" else 1  # accuracy: highest; losses: lowest
    # Ties (small evaluations) go to the better token accuracy, then to fewer iterated tokens.
    return min(done, key=lambda r: (sign * r[cfg.select], -r.get("token_acc", 0.0), r.get("pct_iterated", 0.0)))


def best_recipe(cfg: SweepConfig, best: dict[str, Any]) -> dict[str, Any]:
    """The best trial as a jobs/train.py recipe (the template with the trial's settings)."""
    from tah.config import to_dict

    if cfg.kind == "threshold":
        tc = dataclasses.replace(cfg.train, model=dataclasses.replace(cfg.train.model, threshold=best["threshold"]))
    elif cfg.kind == "max_depth":
        tc = dataclasses.replace(cfg.train, model=dataclasses.replace(cfg.train.model, max_depth=best["max_depth"]))
    else:
        tc = trial_train_config(cfg, best)
    # Its own run name: training it never lands on (and skips as finished) the template's run.
    return to_dict(dataclasses.replace(tc, name=f"{cfg.train.name}-{best['trial']}"))


def write_results(cfg: SweepConfig, rows: list[dict[str, Any]]) -> None:
    """results.{md,json}, plots and best.yaml under output/name, beside Tune's own files (for an
    s3:// output written in a scratch directory, then uploaded), and the table printed."""
    import yaml

    from tah import storage
    from tah.eval.harness import markdown_table

    target = storage.join(cfg.output, cfg.name)
    best = best_row(cfg, rows)
    with storage.staged_dir(target, prefix="tah-sweep-") as local:
        md = [f"# Sweep {cfg.name} ({cfg.kind}, {len(rows)} trials)", "",
              markdown_table(rows, tuple(c for c in COLUMNS[cfg.kind] if any(c in r for r in rows))), ""]
        if best is not None:
            md.append(f"Best by {cfg.select}: **{best['trial']}** -> `best.yaml` "
                      f"(`python jobs/train.py --config {storage.join(target, 'best.yaml')}`)")
            recipe = best_recipe(cfg, best)
            head = (f"# Best trial of sweep {cfg.name} by {cfg.select}: {best['trial']} "
                    f"({cfg.select} {best[cfg.select]:.4f})\n")
            (local / "best.yaml").write_text(head + yaml.safe_dump(recipe, sort_keys=False))
        else:
            md.append("No trial finished: no best recipe written.")
        (local / "results.md").write_text("\n".join(md) + "\n")
        (local / "results.json").write_text(json.dumps({"kind": cfg.kind, "select": cfg.select, "rows": rows,
                                                         "best": best and best["trial"]}, indent=2) + "\n")
        plot(cfg, rows, local)
        print((local / "results.md").read_text(), flush=True)


def plot(cfg: SweepConfig, rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if cfg.kind == "threshold":
        from tah.eval.analysis import plot_threshold

        plot_threshold(rows, out / "threshold.png", accuracy="pass@1", extra={"token_acc": "token acc"})
        return
    if cfg.kind == "max_depth":
        sel = sorted(rows, key=lambda r: r["max_depth"])
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([r["max_depth"] for r in sel], [r.get("accuracy", float("nan")) for r in sel], "o-", label="pass@1")
        ax.set_xlabel("maximum depth")
        ax.set_ylabel("pass@1")
        ax2 = ax.twinx()
        ax2.plot([r["max_depth"] for r in sel], [r.get("avg_depth", float("nan")) for r in sel], "s--",
                 color="tab:orange")
        ax2.set_ylabel("average depth", color="tab:orange")
        fig.tight_layout()
        fig.savefig(out / "max_depth.png", dpi=120)
        plt.close(fig)
        return
    for axis, ys, fname in (("lora_r", ("val_loss",), "lora_rank.png"),
                            ("prune_layer", ("ppl_increase", "accuracy"), "pruned_layer.png")):
        if len({r[axis] for r in rows}) < 2 and axis == "prune_layer":
            continue
        fig, axes = plt.subplots(1, len(ys), figsize=(4.2 * len(ys), 3.2), squeeze=False)
        for ax, y in zip(axes[0], ys):
            for key in sorted({tuple((k, r[k]) for k in ("lora_r", "prune_layer", "lr") if k != axis) for r in rows}):
                sel = sorted((r for r in rows if all(r[k] == v for k, v in key)), key=lambda r: r[axis])
                (line,) = ax.plot([r[axis] for r in sel], [r.get(y, float("nan")) for r in sel], "o-",
                                  label=", ".join(f"{k}={v:g}" for k, v in key))
                stopped = [r for r in sel if r["status"] == "stopped"]
                ax.plot([r[axis] for r in stopped], [r.get(y, float("nan")) for r in stopped], "o",
                        color=line.get_color(), mfc="white")
            if any(r["status"] == "stopped" for r in rows):
                ax.set_title("hollow: stopped by ASHA (value when stopped)", fontsize=7)
            ax.set_xlabel({"lora_r": "LoRA rank", "prune_layer": "pruned layer (-1: none)"}[axis])
            ax.set_ylabel({"val_loss": "stage-1 validation loss", "ppl_increase": "perplexity increase (ΔPPL)",
                           "accuracy": "pass@1"}[y])
            ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)


def check_state_api(timeout: float = 10.0) -> None:
    """A train sweep needs Ray's state API (served by the dashboard): Ray Train's placement-group
    cleaner polls it to free the workers of a trial that ASHA stopped."""
    from ray.util.state import list_nodes
    from ray.util.state.exception import RayStateApiException

    try:
        list_nodes(limit=1, timeout=timeout, raise_on_missing_output=False)
    except RayStateApiException as e:
        raise SystemExit(
            "a train sweep needs Ray's state API (the dashboard): without it the Train workers of a trial "
            "that ASHA stops stay reserved and later trials wait. Start Ray with its dashboard "
            "(`ray start --head` does; jobs.common.init_ray(dashboard=True) locally). "
            f"The state API said: {str(e).splitlines()[0]}") from e


def run(cfg: SweepConfig) -> list[dict[str, Any]]:
    from tah import storage

    cfg = dataclasses.replace(
        cfg, checkpoint=absolute_local(cfg.checkpoint),
        output=cfg.output if storage.is_s3(cfg.output) else str(Path(cfg.output).resolve()),
        train=dataclasses.replace(cfg.train, base_model=absolute_local(cfg.train.base_model),
                                  labels=absolute_local(cfg.train.labels)),
        eval=dataclasses.replace(cfg.eval, labels=absolute_local(cfg.eval.labels),
                                 tokenizer=absolute_local(cfg.eval.tokenizer),
                                 sources={k: absolute_local(v) for k, v in cfg.eval.sources.items()}))
    if cfg.kind != "train" and not (storage.is_s3(cfg.checkpoint) or Path(cfg.checkpoint, "tah_config.json").exists()):
        raise SystemExit(f"no TaH checkpoint at {cfg.checkpoint}: run `make run` first or pass checkpoint=")
    if cfg.kind == "train":
        check_state_api()
    results = tuner(cfg).fit()
    rows = collect(cfg, results)
    write_results(cfg, rows)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    cfg = parse(SweepConfig, argv, __doc__.split("\n")[0])
    init_ray(dashboard=cfg.kind == "train", output=cfg.output)
    return run(cfg)


if __name__ == "__main__":
    # Run the package's copy: Ray pickles a __main__ function by value, and the trials' configs would
    # then resolve their type hints against this script's globals instead of jobs.sweep's.
    from jobs.sweep import main as package_main

    package_main()
