"""jobs/sweep.py on local Ray with the tiny recipes: Train inside Tune, ASHA, restore, results, best recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from jobs.label import LabelConfig
from jobs.train import TrainConfig
from tah.config import from_dict, load_config
from tah.assets import shipped_task, shipped_tokenizer, shipped_base_model

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["train.max_steps=2", "train.global_batch=4", "train.micro_batch=2", "train.eval_every=1",
         "train.checkpoint_every=2", "asha.grace_period=1", "eval.limit=3", "eval.max_tokens=16", "eval.batch_size=3",
         "eval.max_model_len=512", "train.max_length=512"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import ray

    from jobs.common import init_ray
    from jobs.label import run as label

    root = tmp_path_factory.mktemp("sweep")
    init_ray(num_cpus=2, dashboard=True)  # as jobs/sweep.py starts it: Train's PG cleaner needs the state API
    label(LabelConfig(reference_model=shipped_base_model(), source=shipped_task(),
                      tokenizer=shipped_tokenizer(), output=str(root / "labels"),
                      samples_per_domain=12, num_shards=2, validation_fraction=0.25))
    yield root
    ray.shutdown()


def _cfg(root: Path, recipe: str, *extra: str):
    from jobs.sweep import SweepConfig

    return load_config(SweepConfig, ROOT / "jobs/configs/sweep" / recipe, [
        f"output={root / 'sweeps'}", f"train.labels={root / 'labels'}", f"eval.labels={root / 'labels'}",
        f"train.base_model={shipped_base_model()}", *SHORT, *extra])


def _reserved_placement_groups(wait_s: float = 30.0) -> list[dict]:
    """Placement groups still holding resources, after giving Ray's cleaner wait_s to remove them."""
    import time

    from ray.util import placement_group_table

    deadline = time.monotonic() + wait_s
    while True:
        held = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
        if not held or time.monotonic() > deadline:
            return held
        time.sleep(0.5)


@pytest.mark.slow  # ~3.5 min: `make test-slow` (the threshold sweep below keeps Tune in the default suite)
def test_train_sweep_asha_restore_and_best_recipe(setup):
    """Two trials, the second with a learning rate that wrecks the model at its first step: ASHA
    (grace 1) stops it at its first stage-1 validation, while its TorchTrainer runs. Its Train workers
    must be freed (no placement group left), so the best recipe then trains on the same 2 CPUs."""
    from jobs.sweep import run
    from jobs.train import run as train_run

    cfg = _cfg(setup, "tiny-train.yaml", "lora_ranks=[4]", "prune_layers=[1]", "lrs=[0.002,0.5]")
    rows = run(cfg)
    out = setup / "sweeps" / "tiny-train"
    assert [(r["trial"], r["status"]) for r in rows] == [("r4-prune-1-lr0.002", "done"),
                                                         ("r4-prune-1-lr0.5", "stopped")]
    good, bad = rows
    assert bad["val_loss"] > good["val_loss"] and "accuracy" not in bad  # stopped in stage 1: never evaluated
    assert bad["stopped_at_step"] == 1 and "stopped_at_step" not in good
    assert not Path(setup / "sweeps/tiny-train/trials" / bad["trial"], "stage2").exists()
    assert _reserved_placement_groups() == []
    # The finished trial trained both stages and was evaluated.
    assert 0.0 <= good["accuracy"] <= 1.0 and good["val_loss"] > 0 and good["decider_val_loss"] > 0
    assert Path(good["checkpoint"], "tah_config.json").exists()
    # The pruned layer is the one asked for, and its perplexity cost is reported.
    assert good["pruned_layer"] == 1 and "ppl_increase" in good
    res = json.loads((out / "results.json").read_text())
    assert res["best"] == good["trial"]
    assert (out / "results.md").read_text().count("| r") == 2
    assert (out / "lora_rank.png").stat().st_size > 1000

    # The best recipe is a jobs/train.py recipe with the best trial's settings, and it trains.
    best = next(r for r in rows if r["trial"] == res["best"])
    tc = load_config(TrainConfig, out / "best.yaml", ["max_steps=2", "eval_every=2", "checkpoint_every=2",
                                                      f"storage_path={setup / 'best'}", "name=best"])
    assert tc.model.lora.r == best["lora_r"] and tc.prune == (best["prune_layer"] != -1)
    finals = train_run(tc)
    assert Path(finals["stage2"], "tah_config.json").exists()

    # A second run of the same command restores the experiment: nothing retrains.
    stamp = {p: p.stat().st_mtime for p in (setup / "sweeps" / "tiny-train" / "trials").rglob("result.json")}
    again = run(cfg)
    assert [(r["trial"], r["status"]) for r in again] == [(r["trial"], r["status"]) for r in rows]
    assert {p: p.stat().st_mtime for p in stamp} == stamp


def test_threshold_sweep_is_evaluation_only(setup):
    """As the README runs it: `python jobs/sweep.py --config ...` in its own process (its own Ray)."""
    import os
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    from tah import TaHConfig, TaHForCausalLM

    # A TaH checkpoint over the shipped base (its LoRA and decider untrained): the sweep only evaluates.
    ckpt = setup / "threshold-ckpt"
    TaHForCausalLM.from_backbone(AutoModelForCausalLM.from_pretrained(shipped_base_model()),
                                 TaHConfig(max_depth=2)).save_pretrained(ckpt)
    args = [f"output={setup / 'sweeps'}", f"eval.labels={setup / 'labels'}", *SHORT, f"checkpoint={ckpt}",
            "thresholds=[0.0,1.0]"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "jobs/sweep.py", "--config", "jobs/configs/sweep/tiny-threshold.yaml",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = {r["threshold"]: r for r in json.loads((setup / "sweeps/tiny-threshold/results.json").read_text())["rows"]}
    assert set(rows) == {0.0, 1.0} and all(r["status"] == "done" for r in rows.values())
    # Threshold 1.0: nothing iterates; 0.0: every generated token does (sigmoid > 0).
    assert rows[1.0]["pct_iterated"] == 0.0 and rows[0.0]["pct_iterated"] == pytest.approx(100.0)
    assert rows[1.0]["token_pct_iterated"] == 0.0
    assert rows[1.0]["token_acc"] == pytest.approx(rows[1.0]["token_acc_depth1"])
    out = setup / "sweeps" / "tiny-threshold"
    assert (out / "threshold.png").stat().st_size > 1000
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["model"]["threshold"] in (0.0, 1.0)


def test_sweep_config_errors():
    from jobs.sweep import SweepConfig

    with pytest.raises(ValueError, match="kind"):
        SweepConfig(kind="random")
    with pytest.raises(ValueError, match="thresholds"):
        SweepConfig(thresholds=[1.5])
    with pytest.raises(ValueError, match="method"):
        SweepConfig(kind="train", train=from_dict(TrainConfig, {"method": "standard", "model": {"max_depth": 1}}))
    with pytest.raises(ValueError, match="prune_layer"):
        TrainConfig(prune_layer=1)
