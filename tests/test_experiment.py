"""A shortened `make run`: the whole experiment (same stages, a few steps each) on local Ray."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from tah import TaHForCausalLM
from tah.assets import shipped_base_model

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_base_model_and_its_record():
    from transformers import AutoModelForCausalLM

    base = Path(shipped_base_model())
    rec = json.loads((base / "pretrain.json").read_text())
    assert rec["command"].startswith("python jobs/pretrain.py")
    model = AutoModelForCausalLM.from_pretrained(base)
    assert model.config.model_type == "qwen3"
    assert sum(p.numel() for p in model.parameters()) == rec["parameters"]
    # made from the shipped task as it is now (regenerate the task and this changes: pretrain again)
    from jobs.pretrain import data_sha256
    from tah.assets import shipped_task

    assert rec["data_sha256"] == data_sha256(shipped_task())
    # deep enough that pruning one layer is an eighth of the model, not a quarter
    assert model.config.num_hidden_layers == rec["config"]["num_layers"] >= 8
    assert (base / "model.safetensors").stat().st_size < 8 * 2**20


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from jobs.common import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def test_short_experiment_produces_every_artifact(ray_local, tmp_path):
    from jobs.experiment import ExperimentConfig, run
    from tah.config import load_config

    cfg = load_config(ExperimentConfig, ROOT / "jobs/configs/tiny.yaml", [
        f"output={tmp_path}", "label.samples_per_domain=12", "label.validation_fraction=0.25",
        "train.max_steps=2", "train.global_batch=4", "train.micro_batch=2", "train.eval_every=2",
        "train.checkpoint_every=2", "eval.limit=6", "eval.max_tokens=24", "eval.batch_size=6"])
    rows = run(cfg)
    assert [r["method"] for r in rows] == ["standard", "always_think", "tah_plus", "tah", "tah2"]
    for name, stage in (("standard", "standard"), ("always_think", "stage1"), ("tah_plus", "stage2"),
                        ("tah", "stage2"), ("tah2", "joint")):
        ckpt = tmp_path / "train" / name / stage / "model"
        assert (ckpt / "tah_config.json").exists(), name
        assert (tmp_path / "eval" / name / "tinytask.jsonl").exists()
    assert (tmp_path / "labels" / "manifest.json").exists() and (tmp_path / "sft-data" / "manifest.json").exists()
    assert (tmp_path / "train" / "tah" / "pruned-base" / "pruning.json").exists()
    assert (tmp_path / "results.png").stat().st_size > 1000
    assert "| target token kind |" in (tmp_path / "hard_tokens.md").read_text()
    assert (tmp_path / "eval" / "tah" / "analysis" / "threshold.png").exists()
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {m} |" in table for m in ("standard", "always_think", "tah_plus", "tah", "tah2"))
    res = json.loads((tmp_path / "results.json").read_text())["rows"]
    by = {r["method"]: r for r in res}
    # TaH has one decoder layer fewer than TaH+ (pruned), and Standard has no LoRA or decider.
    n_layers = {m: TaHForCausalLM.from_pretrained(by[m]["checkpoint"]).num_layers for m in by}
    assert n_layers["tah"] == n_layers["tah_plus"] - 1 == n_layers["standard"] - 1
    assert by["standard"]["pct_iterated"] == 0 and by["always_think"]["avg_depth"] == 2
    tah2 = TaHForCausalLM.from_pretrained(by["tah2"]["checkpoint"]).config
    assert (tah2.input_rule, tah2.combine, tah2.max_depth) == ("updater", "stop_prob_mix", 2)
    assert by["standard"]["parameters"] < by["tah_plus"]["parameters"]
    # A rerun into the same output with other inputs is refused before any stage (here: another seed).
    with pytest.raises(SystemExit, match=r"other inputs \(seed changed"):
        run(dataclasses.replace(cfg, seed=1))


def test_inputs_follow_the_base_model_files(tmp_path):
    import shutil

    from jobs.experiment import ExperimentConfig, inputs

    base = tmp_path / "base"
    shutil.copytree(shipped_base_model(), base)
    cfg = ExperimentConfig(base_model=str(base), output=str(tmp_path / "out"))
    before = inputs(cfg)
    assert before["base_model"]["model.safetensors"].endswith(
        hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest())
    with open(base / "config.json", "a") as f:
        f.write(" ")
    after = inputs(cfg)
    assert after["base_model"] != before["base_model"] and after["source"] == before["source"]
