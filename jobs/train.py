"""Training on Ray Train + DeepSpeed: Standard, AlwaysThink, TaH (stage 1 then stage 2), TaH2 (one joint stage).

    python jobs/train.py --config jobs/configs/train/tiny.yaml method=tah labels=runs/tiny/labels
    ray job submit -- python jobs/train.py --config jobs/configs/train/qwen3-1.7b.yaml storage_path=s3://bucket/runs
    python jobs/train.py --config jobs/configs/train/tah2-tiny.yaml labels=runs/tiny/labels

Each stage is one TorchTrainer run named `<name>-<stage>` under `storage_path`; re-running the same
command resumes each unfinished stage from its latest checkpoint (DeepSpeed states included) and
skips finished ones. The labelled Parquet is read with Ray Data and split across the workers
(`get_dataset_shard`, one fixed part per rank). The final model of each stage is the TaH checkpoint in `<stage>/model`.
With `prune=true` (TaH rather than TaH+) the job first scores every decoder layer by the perplexity
increase its removal causes on the assistant tokens of calibration samples (Ray tasks, layers split
between them), removes the smallest, and trains from that backbone (`<name>/pruned-base`, with
`pruning.json`).

`method: tah2` trains a TaH2 model (`model:` a TaHConfig.tah2 configuration) in one stage, `joint`:
the decider routes, labels are computed online (tah/train/tah2.py), everything trains. It reads the
same Parquet as the other methods but only its `input_ids` and `assistant_mask` (the oracle columns
are ignored), so any jobs/label.py output serves, e.g. one labelled with the base model itself.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Literal

from jobs.common import absolute_local, init_ray, parse  # (first: sets Ray's loopback switch before import)
from tah.assets import shipped_base_model
from tah.config import TaHConfig, check_choices
from tah.train.loop import OptimConfig

STAGES = {"standard": ["standard"], "always_think": ["stage1"], "tah": ["stage1", "stage2"], "tah2": ["joint"]}
Method = Literal["standard", "always_think", "tah", "tah2"]


@dataclass
class TrainConfig:
    """jobs/train.py: one training method on oracle-labelled data (Standard, AlwaysThink, TaH, TaH+, TaH2)."""

    ALIASES: ClassVar[dict[str, str]] = {k: f"optim.{k}" for k in (
        "lr", "stage2_lr", "min_lr_ratio", "warmup_ratio", "weight_decay", "max_grad_norm", "epochs",
        "stage2_epochs", "max_steps", "global_batch", "micro_batch", "max_length", "eval_every",
        "checkpoint_every", "zero_stage", "bf16")}
    """The optimizer's flat names of earlier recipes (`lr=3e-5`) still work as overrides."""

    method: Method = "tah"
    """standard | always_think | tah (stage 1 under oracle depths, then stage 2: the decider) | tah2 (one
    joint stage with online labels; model must be a TaH2 configuration)."""
    prune: bool = False
    """TaH (one layer pruned first, chosen by the smallest perplexity increase) vs TaH+ (unpruned)."""
    prune_layer: int | None = None
    """With prune: remove this decoder layer instead of the one with the smallest perplexity increase."""
    base_model: str = field(default_factory=shipped_base_model)
    """The backbone to start from: local dir, hub id or s3:// checkpoint (default: the shipped tiny base)."""
    labels: str = "runs/tiny/labels"
    """Output of jobs/label.py (local dir or s3://)."""
    storage_path: str = "runs/tiny/train"
    """Ray Train storage (local dir or s3://bucket/prefix): checkpoints and the final model."""
    name: str = "tah"
    """Run name; re-running with the same name resumes from its latest checkpoint."""
    model: TaHConfig = field(default_factory=TaHConfig)
    """The TaH model (Standard trains it at max_depth 1, AlwaysThink with depth_attention current:
    see `model_for_method`)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    num_workers: int = 2
    use_gpu: bool = False
    seed: int = 0
    metric: Literal["mismatch", "entropy", "ce"] = "mismatch"
    """Oracle metric used to derive depths from the stored reference statistics."""

    def __post_init__(self) -> None:
        check_choices(self)
        if self.prune_layer is not None and not self.prune:
            raise ValueError("prune_layer is set but prune is false: set prune=true to remove a layer")
        if self.num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        self.optim.grad_accum(self.num_workers)  # global_batch must split over the workers
        m = self.model
        if self.method == "tah2" and (m.max_depth < 2 or m.input_rule != "updater" or m.decider_kind != "tah2"
                                      or m.combine == "logit_residual" or m.depth_lora):
            raise ValueError("method tah2 trains a TaH2 model: set model.input_rule=updater, "
                             "model.decider_kind=tah2, model.combine=stop_prob_mix, model.depth_lora=false, "
                             "model.threshold=0.5 and max_depth >= 2 (see jobs/configs/train/tah2-tiny.yaml)")
        if self.method == "tah2" and self.prune:
            raise ValueError("prune is a TaH (v1) option; method tah2 trains the whole backbone")
        if self.method == "tah2" and self.optim.zero_stage == 3:
            raise ValueError("method tah2 trains with optim.zero_stage 0-2 (see tah/train/loop.py)")


def model_for_method(cfg: TrainConfig) -> TaHConfig:
    """The model a method trains, derived in the open (the config itself is never rewritten):
    Standard is the plain backbone (max_depth 1); AlwaysThink attends causally within each depth
    (paper, appendix A.1); TaH and TaH2 train cfg.model as written."""
    if cfg.method == "standard":
        return dataclasses.replace(cfg.model, max_depth=1)
    if cfg.method == "always_think":
        return dataclasses.replace(cfg.model, depth_attention="current")
    return cfg.model


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: build the model, read this worker's rows, run the stage."""
    import ray.train
    import ray.train.torch
    import torch
    from transformers import AutoModelForCausalLM

    from tah import TaHForCausalLM, storage
    from tah.config import from_dict
    from tah.train.loop import Hooks, run_stage

    cfg = from_dict(TrainConfig, config["cfg"])
    stage, init_from = config["stage"], config["init_from"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    if stage == "stage2":
        model = TaHForCausalLM.from_pretrained(init_from)
    else:
        backbone = AutoModelForCausalLM.from_pretrained(storage.local_copy(init_from), dtype=torch.float32)
        model = TaHForCausalLM.from_backbone(backbone, model_for_method(cfg))
    # This worker's rows, split by the driver (label_splits): a fixed assignment, so a resumed run
    # sees exactly the same batches. Sorted by sample id so the order does not depend on block layout.
    train, val = (sorted(_shard_rows(f"{kind}_{rank}"), key=lambda r: r["sample_id"]) for kind in ("train", "val"))
    ckpt = ray.train.get_checkpoint()

    def report(metrics: dict, directory: str | None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if directory else None)

    with (ckpt.as_directory() if ckpt else nullcontext(None)) as resume_dir:
        hooks = Hooks(report=report, resume_dir=resume_dir, log_dir=config.get("log_dir"),
                      after_checkpoint=config.get("after_checkpoint"))
        run_stage(model, stage, cfg.method, train, val, cfg.optim, hooks, rank, world, ray.train.torch.get_device(),
                  len(train) * world, metric=cfg.metric, seed=cfg.seed)


def _shard_rows(name: str) -> list[dict]:
    """Every row of this worker's dataset shard as Python dicts (the label table's columns)."""
    import ray.train

    rows: list[dict] = []
    for batch in ray.train.get_dataset_shard(name).iter_batches(batch_size=256, batch_format="pyarrow"):
        rows += batch.to_pylist()
    return rows


@contextmanager
def _progress(metrics_jsonl: Path | None, label: str, every: float = 2.0) -> Iterator[None]:
    """While a stage trains, print each validation step that rank 0 appends to its metrics file: the
    workers' own output stays in Ray's logs, and this is the stage's progress view on the console."""
    if metrics_jsonl is None:
        yield
        return
    stop = threading.Event()
    # Byte offset of what was already read (a resumed run's earlier lines are skipped): each poll
    # reads only what rank 0 appended since, and only whole lines (the last may be half-written).
    offset = metrics_jsonl.stat().st_size if metrics_jsonl.exists() else 0

    def follow() -> None:
        nonlocal offset
        while True:
            done = stop.wait(every)
            if metrics_jsonl.exists():
                with open(metrics_jsonl, "rb") as f:
                    f.seek(offset)
                    new = f.read()
                whole = new[:new.rfind(b"\n") + 1]
                offset += len(whole)
                for line in whole.decode().splitlines():
                    m = json.loads(line)
                    if "val_loss" in m:
                        print(f"[train] {label} step {m['step']} loss {m['loss']:.4f} val {m['val_loss']:.4f} "
                              f"lr {m['lr']:.2e} {m['tokens_per_s']:.0f} tok/s", flush=True)
            if done:
                return

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def label_splits(labels: str, max_length: int, world: int) -> dict[str, object]:
    """The labelled Parquet read with Ray Data, samples longer than max_length dropped, and split into
    `world` equal parts for training and for validation: {"train_<rank>": ds, "val_<rank>": ds}.

    Materialised and split here, while the cluster's CPUs are free: once the train workers hold every
    CPU of a small machine, Ray Data read tasks started from the workers would wait forever. Order is
    preserved, so the same labels give every rank the same rows on every run (exact resume). Equal
    parts keep collective calls in step; up to world-1 samples of each split are left out."""
    import ray.data
    from ray.data.expressions import col

    from tah import storage
    from tah.data.labeling import label_files

    files = label_files(labels)
    if not files:
        raise SystemExit(f"no label shards under {labels}: run jobs/label.py first")
    fs, _ = storage.pyarrow_fs(files[0])
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ds = ray.data.read_parquet([storage.pyarrow_fs(f)[1] for f in files], filesystem=fs)
    out: dict[str, object] = {}
    for kind, is_val in (("train", False), ("val", True)):
        part = ds.filter(expr=(col("num_tokens") <= max_length) & (col("is_validation") == is_val)).materialize()
        if part.count() < world:
            raise SystemExit(f"{part.count()} {kind} samples of <= {max_length} tokens in {labels}: fewer than "
                             f"num_workers={world}")
        for rank, split in enumerate(part.split(world, equal=True)):
            out[f"{kind}_{rank}"] = split
    return out


def score_layers(base_model: str, labels: str, layers: list[int], n_calib: int, max_length: int) -> dict[int, float]:
    """Perplexity increase of removing each of `layers`, on the assistant tokens of the first validation
    samples in sample-id order (a hash: a mix of domains); one Ray task."""
    import torch
    from transformers import AutoModelForCausalLM

    from tah import storage
    from tah.data.labeling import read_validation_rows
    from tah.prune import layer_ppl_deltas

    model = AutoModelForCausalLM.from_pretrained(storage.local_copy(base_model), dtype=torch.float32).eval()
    rows = read_validation_rows(labels, max_length)[:n_calib]
    if not rows:
        raise SystemExit(f"no validation samples in {labels} to calibrate pruning on")
    # Scored on the assistant tokens (what the model is fine-tuned on and generates): see tah/prune.py.
    batches = [(torch.tensor([r["input_ids"]]), torch.ones(1, len(r["input_ids"]), dtype=torch.long),
                torch.tensor([r["assistant_mask"]], dtype=torch.long)) for r in rows]
    return layer_ppl_deltas(model, batches, layers)


def prune_base(cfg: TrainConfig, n_calib: int = 64) -> str:
    """Score every layer with parallel Ray tasks, remove the cheapest (or cfg.prune_layer); returns the
    pruned base model."""
    import ray
    from transformers import AutoConfig, AutoModelForCausalLM

    from tah import storage
    from tah.prune import prune_layer

    out = storage.join(cfg.storage_path, cfg.name, "pruned-base")
    if storage.is_published(out, "pruning.json"):
        return out
    n = AutoConfig.from_pretrained(storage.local_copy(cfg.base_model)).num_hidden_layers
    parts = [list(range(n))[i::cfg.num_workers] for i in range(min(cfg.num_workers, n))]
    # DEFAULT scheduling: inside a Tune trial (jobs/sweep.py) the tasks would otherwise be captured by
    # the trial's placement group, which holds no CPU for them.
    task = ray.remote(num_cpus=1, scheduling_strategy="DEFAULT")(score_layers)
    deltas: dict[int, float] = {}
    for d in ray.get([task.remote(cfg.base_model, cfg.labels, p, n_calib, cfg.optim.max_length) for p in parts]):
        deltas.update(d)
    layer = min(deltas, key=deltas.get) if cfg.prune_layer is None else cfg.prune_layer
    if layer not in deltas:
        raise SystemExit(f"prune_layer={layer}: the base model has layers 0..{n - 1}")
    pruned = prune_layer(AutoModelForCausalLM.from_pretrained(storage.local_copy(cfg.base_model)), layer, inplace=True)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        pruned.save_pretrained(tmp)
        report = {"pruned_layer": layer, "ppl_increase": {str(k): v for k, v in sorted(deltas.items())}}
        Path(tmp, "pruning.json").write_text(json.dumps(report, indent=2))
        storage.publish_dir(tmp, out, last="pruning.json")  # pruning.json marks it finished
    why = "smallest perplexity increase" if cfg.prune_layer is None else "prune_layer; perplexity increase"
    print(f"[train] pruned layer {layer} of {n} ({why} {deltas[layer]:.4f}) -> {out}", flush=True)
    return out


def run(cfg: TrainConfig, callbacks: Callable[[str], list] | None = None,
        after_checkpoint: Callable[[int], None] | None = None) -> dict[str, str]:
    """Train every stage of cfg.method; returns {stage: path of its final TaH checkpoint}.

    `callbacks(stage)` gives Ray Train callbacks for that stage's TorchTrainer (jobs/sweep.py passes
    one that forwards the reports to Ray Tune). Each finished stage also gets `<stage>/result.json`:
    the metrics of the checkpoint chosen as its model. `after_checkpoint(step)` runs in every worker
    after each checkpoint is reported (tests pass `tah.testing.FailAfterStep` to crash a worker there;
    it is pickled to the workers, so it must be importable from the installed package)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tah import storage
    from tah.config import to_dict
    from tah.train.loop import MODEL_DIR

    if not cfg.base_model:
        raise SystemExit("base_model is required (a local dir, hub id or s3:// checkpoint)")
    # Train workers run in their own working directory: local paths must be absolute.
    cfg = dataclasses.replace(cfg, base_model=absolute_local(cfg.base_model), labels=absolute_local(cfg.labels),
                              storage_path=cfg.storage_path if storage.is_s3(cfg.storage_path)
                              else str(Path(cfg.storage_path).resolve()))
    out: dict[str, str] = {}
    init = prune_base(cfg) if cfg.prune else cfg.base_model
    # An explicit pyarrow filesystem carries a custom S3 endpoint (AWS_ENDPOINT_URL) into Ray Train.
    storage_fs, storage_path = (storage.pyarrow_fs(cfg.storage_path) if storage.is_s3(cfg.storage_path)
                                else (None, str(Path(cfg.storage_path).resolve())))
    datasets = None
    for stage in STAGES[cfg.method]:
        final = storage.join(cfg.storage_path, cfg.name, stage, MODEL_DIR)
        if storage.is_published(final, "tah_config.json"):
            print(f"[train] {stage}: already finished ({final})", flush=True)
        else:
            datasets = datasets or label_splits(cfg.labels, cfg.optim.max_length, cfg.num_workers)
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config={"cfg": to_dict(cfg), "stage": stage, "init_from": init,
                                   "after_checkpoint": after_checkpoint,
                                   "log_dir": None if storage.is_s3(cfg.storage_path)
                                   else str(Path(cfg.storage_path, cfg.name, "tensorboard"))},
                scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
                # Each rank reads its own pre-split dataset (see label_splits), so none is split again.
                datasets=datasets, dataset_config=DataConfig(datasets_to_split=[]),
                run_config=RunConfig(name=f"{cfg.name}-{stage}", storage_path=storage_path,
                                     storage_filesystem=storage_fs,
                                     callbacks=callbacks(stage) if callbacks else None,
                                     failure_config=FailureConfig(max_failures=2),
                                     checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_loss",
                                                                        checkpoint_score_order="min")),
            )
            log_dir = None if storage.is_s3(cfg.storage_path) else Path(cfg.storage_path, cfg.name, "tensorboard")
            with _progress(log_dir and log_dir / stage / "metrics.jsonl", f"{cfg.name}/{stage}"):
                result = trainer.fit()
            if not result.best_checkpoints:
                raise RuntimeError(f"{stage} finished without a checkpoint")
            # The stage's model is its best checkpoint by validation loss, not merely the last one.
            best, best_metrics = min(result.best_checkpoints, key=lambda cm: cm[1].get("val_loss", float("inf")))
            storage.write_bytes_atomic(storage.join(cfg.storage_path, cfg.name, stage, "result.json"),
                                       json.dumps(best_metrics, indent=2).encode())
            with best.as_directory() as d:  # tah_config.json marks the stage finished
                storage.publish_dir(Path(d) / MODEL_DIR, final, last="tah_config.json")
            print(f"[train] {stage}: done, best val_loss {best_metrics.get('val_loss')} at step "
                  f"{best_metrics.get('step')} -> {final}", flush=True)
        out[stage] = final
        init = final
    return out


def main(argv: list[str] | None = None) -> dict[str, str]:
    cfg = parse(TrainConfig, argv, __doc__.split("\n")[0])
    model = model_for_method(cfg)
    if model != cfg.model:
        print(f"[train] method {cfg.method}: trains model.max_depth={model.max_depth}, "
              f"model.depth_attention={model.depth_attention}", flush=True)
    init_ray(output=cfg.storage_path)
    return run(cfg)


if __name__ == "__main__":
    # Run the package's copy: Ray pickles a __main__ function by value, and the workers' configs would
    # then resolve their type hints against this script's globals instead of jobs.train's.
    from jobs.train import main as package_main

    package_main()
