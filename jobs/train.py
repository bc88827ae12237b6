"""Training on Ray Train + DeepSpeed: Standard, AlwaysThink, TaH (stage 1 then stage 2).

    python jobs/train.py --config jobs/configs/train/tiny.yaml method=tah base_model=runs/tiny/base
    ray job submit -- python jobs/train.py --config jobs/configs/train/qwen3-1.7b.yaml storage_path=s3://bucket/runs

Each stage is one TorchTrainer run named `<name>-<stage>` under `storage_path`; re-running the same
command resumes each unfinished stage from its latest checkpoint (DeepSpeed states included) and
skips finished ones. The final model of each stage is the TaH checkpoint in `<stage>/model`.
Status: the pruning step (TaH vs TaH+), S3 end-to-end and the resume test are still open (issue #4).
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
    rows = sorted(read_labels(cfg.labels).to_pylist(), key=lambda r: r["sample_id"])  # deterministic order
    train = [r for r in rows if not r["is_validation"] and len(r["input_ids"]) <= cfg.max_length]
    val = [r for r in rows if r["is_validation"] and len(r["input_ids"]) <= cfg.max_length]
    ckpt = ray.train.get_checkpoint()

    def report(metrics: dict, directory: str | None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if directory else None)

    with (ckpt.as_directory() if ckpt else nullcontext(None)) as resume_dir:
        hooks = Hooks(report=report, resume_dir=resume_dir, log_dir=config.get("log_dir"))
        run_stage(model, stage, train, val, cfg, hooks, rank, world, ray.train.torch.get_device())


def run(cfg) -> dict[str, str]:
    """Train every stage of cfg.method; returns {stage: path of its final TaH checkpoint}."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tah import storage
    from tah.config import to_dict
    from tah.train.loop import FAIL_AFTER_STEP, MODEL_DIR

    if not cfg.base_model:
        raise SystemExit("base_model is required (a local dir, hub id or s3:// checkpoint)")
    if cfg.prune:
        raise SystemExit("prune=true (TaH with a pruned layer) is not implemented yet; use prune=false (TaH+)")
    out: dict[str, str] = {}
    init = cfg.base_model
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
                run_config=RunConfig(name=f"{cfg.name}-{stage}", storage_path=str(Path(cfg.storage_path).resolve())
                                     if not storage.is_s3(cfg.storage_path) else cfg.storage_path,
                                     failure_config=FailureConfig(max_failures=2),
                                     checkpoint_config=CheckpointConfig(num_to_keep=2)),
            )
            result = trainer.fit()
            if result.checkpoint is None:
                raise RuntimeError(f"{stage} finished without a checkpoint")
            with result.checkpoint.as_directory() as d:
                if storage.is_s3(final):
                    storage.upload_dir(Path(d) / MODEL_DIR, final, last="tah_config.json")
                else:
                    import shutil

                    shutil.copytree(Path(d) / MODEL_DIR, final, dirs_exist_ok=True)
            print(f"[train] {stage}: done, last metrics {result.metrics} -> {final}", flush=True)
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
