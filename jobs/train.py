"""Training on Ray Train + DeepSpeed: Standard, AlwaysThink, TaH (stage 1 then stage 2).

    python jobs/train.py --config jobs/configs/train/tiny.yaml method=tah base_model=runs/tiny/base
    ray job submit -- python jobs/train.py --config jobs/configs/train/qwen3-1.7b.yaml storage_path=s3://bucket/runs

Each stage is one TorchTrainer run named `<name>-<stage>` under `storage_path`; re-running the same
command resumes each unfinished stage from its latest checkpoint (DeepSpeed states included) and
skips finished ones. The final model of each stage is the TaH checkpoint in `<stage>/model`.
With `prune=true` (TaH rather than TaH+) the job first scores every decoder layer by the perplexity
increase its removal causes on calibration samples (Ray tasks, layers split between them), removes
the smallest, and trains from that backbone (`<name>/pruned-base`, with `pruning.json`).
"""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.common import init_ray, parse  # noqa: E402  (first: sets Ray's loopback switch before import)

STAGES = {"standard": ["standard"], "always_think": ["stage1"], "tah": ["stage1", "stage2"]}


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: build the model, read this worker's rows, run the stage."""
    import ray.train
    import ray.train.torch
    import torch
    from transformers import AutoModelForCausalLM

    from tah import TaHForCausalLM, storage
    from tah.config import TrainConfig, from_dict
    from tah.data.labeling import read_labels
    from tah.train.loop import Hooks, run_stage

    cfg = from_dict(TrainConfig, config["cfg"])
    stage, init_from = config["stage"], config["init_from"]
    if config.get("fail_after_step"):  # test hook, forwarded from the driver's environment
        import os

        from tah.train.loop import FAIL_AFTER_STEP

        os.environ[FAIL_AFTER_STEP] = config["fail_after_step"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    if stage == "stage2":
        model = TaHForCausalLM.from_pretrained(init_from)
    else:
        backbone = AutoModelForCausalLM.from_pretrained(storage.local_copy(init_from), dtype=torch.float32)
        model = TaHForCausalLM.from_backbone(backbone, cfg.model)
    # Every worker reads the label shards in one fixed order and keeps every world-th sample (train and
    # validation counted separately), so a resumed run sees exactly the same batches. (Not Ray Data's
    # get_dataset_shard: with every CPU held by a train worker its read tasks never get scheduled on a
    # small machine, and its streaming split gives no fixed row-to-worker assignment to resume from.)
    train, val, n_train, n_val = [], [], 0, 0
    for row in sorted(read_labels(cfg.labels).to_pylist(), key=lambda r: r["sample_id"]):
        if len(row["input_ids"]) > cfg.max_length:
            continue
        if row["is_validation"]:
            n_val += 1
            if (n_val - 1) % world == rank:
                val.append(row)
        else:
            n_train += 1
            if (n_train - 1) % world == rank:
                train.append(row)
    ckpt = ray.train.get_checkpoint()

    def report(metrics: dict, directory: str | None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if directory else None)

    with (ckpt.as_directory() if ckpt else nullcontext(None)) as resume_dir:
        hooks = Hooks(report=report, resume_dir=resume_dir, log_dir=config.get("log_dir"))
        run_stage(model, stage, train, val, cfg, hooks, rank, world, ray.train.torch.get_device(), n_train)


def score_layers(base_model: str, labels: str, layers: list[int], n_calib: int, max_length: int) -> dict[int, float]:
    """Perplexity increase of removing each of `layers` on the first validation samples (one Ray task)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tah import storage
    from tah.data.labeling import read_labels
    from tah.prune import layer_ppl_deltas

    model = AutoModelForCausalLM.from_pretrained(storage.local_copy(base_model), dtype=torch.float32).eval()
    rows = sorted((r for r in read_labels(labels).to_pylist() if r["is_validation"]), key=lambda r: r["sample_id"])
    rows = [r for r in rows if len(r["input_ids"]) <= max_length][:n_calib]
    if not rows:
        raise SystemExit(f"no validation samples in {labels} to calibrate pruning on")
    batches = [(torch.tensor([r["input_ids"]]), torch.ones(1, len(r["input_ids"]), dtype=torch.long)) for r in rows]
    return layer_ppl_deltas(model, batches, layers)


def prune_base(cfg, n_calib: int = 16) -> str:
    """Score every layer with parallel Ray tasks, remove the cheapest; returns the pruned base model."""
    import json

    import ray
    from transformers import AutoConfig, AutoModelForCausalLM

    from tah import storage
    from tah.prune import prune_layer

    out = storage.join(cfg.storage_path, cfg.name, "pruned-base")
    if storage.exists(storage.join(out, "pruning.json")):
        return out
    n = AutoConfig.from_pretrained(storage.local_copy(cfg.base_model)).num_hidden_layers
    parts = [list(range(n))[i::cfg.num_workers] for i in range(min(cfg.num_workers, n))]
    task = ray.remote(num_cpus=1)(score_layers)
    deltas: dict[int, float] = {}
    for d in ray.get([task.remote(cfg.base_model, cfg.labels, p, n_calib, cfg.max_length) for p in parts]):
        deltas.update(d)
    layer = min(deltas, key=deltas.get)
    pruned = prune_layer(AutoModelForCausalLM.from_pretrained(storage.local_copy(cfg.base_model)), layer, inplace=True)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        pruned.save_pretrained(tmp)
        report = {"pruned_layer": layer, "ppl_increase": {str(k): v for k, v in sorted(deltas.items())}}
        Path(tmp, "pruning.json").write_text(json.dumps(report, indent=2))
        storage.publish_dir(tmp, out, last="pruning.json")  # pruning.json marks it finished
    print(f"[train] pruned layer {layer} of {n} (smallest perplexity increase {deltas[layer]:.4f}) -> {out}", flush=True)
    return out


def run(cfg) -> dict[str, str]:
    """Train every stage of cfg.method; returns {stage: path of its final TaH checkpoint}."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tah import storage
    from tah.config import to_dict
    from tah.train.loop import FAIL_AFTER_STEP, MODEL_DIR

    if not cfg.base_model:
        raise SystemExit("base_model is required (a local dir, hub id or s3:// checkpoint)")
    out: dict[str, str] = {}
    init = prune_base(cfg) if cfg.prune else cfg.base_model
    # An explicit pyarrow filesystem carries a custom S3 endpoint (AWS_ENDPOINT_URL) into Ray Train.
    storage_fs, storage_path = (storage.pyarrow_fs(cfg.storage_path) if storage.is_s3(cfg.storage_path)
                                else (None, str(Path(cfg.storage_path).resolve())))
    for stage in STAGES[cfg.method]:
        final = storage.join(cfg.storage_path, cfg.name, stage, MODEL_DIR)
        if storage.exists(storage.join(final, "tah_config.json")):
            print(f"[train] {stage}: already finished ({final})", flush=True)
        else:
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config={"cfg": to_dict(cfg), "stage": stage, "init_from": init,
                                   "fail_after_step": os.environ.get(FAIL_AFTER_STEP),
                                   "log_dir": None if storage.is_s3(cfg.storage_path)
                                   else str(Path(cfg.storage_path, cfg.name, "tensorboard"))},
                scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
                run_config=RunConfig(name=f"{cfg.name}-{stage}", storage_path=storage_path,
                                     storage_filesystem=storage_fs,
                                     failure_config=FailureConfig(max_failures=2),
                                     checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_loss",
                                                                        checkpoint_score_order="min")),
            )
            result = trainer.fit()
            if not result.best_checkpoints:
                raise RuntimeError(f"{stage} finished without a checkpoint")
            # The stage's model is its best checkpoint by validation loss, not merely the last one.
            best, best_metrics = min(result.best_checkpoints, key=lambda cm: cm[1].get("val_loss", float("inf")))
            with best.as_directory() as d:  # tah_config.json marks the stage finished
                storage.publish_dir(Path(d) / MODEL_DIR, final, last="tah_config.json")
            print(f"[train] {stage}: done, best val_loss {best_metrics.get('val_loss')} at step "
                  f"{best_metrics.get('step')} -> {final}", flush=True)
        out[stage] = final
        init = final
    return out


def main(argv: list[str] | None = None) -> dict[str, str]:
    from tah.config import TrainConfig

    cfg = parse(TrainConfig, argv, __doc__.split("\n")[0])
    init_ray()
    return run(cfg)


if __name__ == "__main__":
    main()
