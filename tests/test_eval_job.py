"""jobs/eval.py end to end on local Ray (engine actors through Ray Data), and the token analysis."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tah import TaHConfig, TaHForCausalLM
from jobs.eval import EvalConfig
from jobs.label import LabelConfig
from tah.config import from_dict
from tah.tokenizer import load_tokenizer
from tah.testing import randomize_lora, tiny_qwen3
from tah.assets import shipped_task, shipped_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = shipped_tokenizer()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import ray

    from jobs.common import init_ray
    from jobs.label import run as label

    root = tmp_path_factory.mktemp("eval")
    tok = load_tokenizer(TOKENIZER)
    base = tiny_qwen3(vocab_size=len(tok), seed=1, initializer_range=0.02)
    base.save_pretrained(root / "base")
    torch.manual_seed(0)
    model = TaHForCausalLM.from_backbone(base, TaHConfig(max_depth=2, threshold=0.5))
    randomize_lora(model)
    model.save_pretrained(root / "tah", tokenizer=tok)
    init_ray(num_cpus=2)
    label(LabelConfig(reference_model=str(root / "base"), source=shipped_task(), tokenizer=TOKENIZER,
                      output=str(root / "labels"), samples_per_domain=8, num_shards=1, validation_fraction=0.5))
    yield root
    ray.shutdown()


def test_eval_job_end_to_end(setup):
    from jobs.eval import run

    root = setup
    cfg = from_dict(EvalConfig, {"models": {"tah": str(root / "tah"), "standard": str(root / "tah")},
                                 "policies": {"standard": "standard"}, "limit": 6, "max_tokens": 12,
                                 "max_model_len": 256, "batch_size": 4, "n_samples": 2,
                                 "output": str(root / "out"), "labels": str(root / "labels")})
    rows = run(cfg)
    assert {(r["model"], r["benchmark"]) for r in rows} == {("tah", "tinytask"), ("standard", "tinytask")}
    by = {r["model"]: r for r in rows}
    assert by["standard"]["pct_iterated"] == 0 and by["standard"]["avg_depth"] == 1
    assert by["tah"]["pct_iterated"] > 0 and 1 < by["tah"]["avg_depth"] <= 2
    for name in ("tah", "standard"):
        recs = [json.loads(line) for line in (root / "out" / name / "tinytask.jsonl").read_text().splitlines()]
        assert len(recs) == 12 and {r["sample"] for r in recs} == {0, 1}
        assert all({"prompt", "output", "extracted", "correct", "tokens", "iterated"} <= set(r) for r in recs)
        assert all(r["tokens"] <= 12 for r in recs)
    summary = json.loads((root / "out" / "summary.json").read_text())
    assert summary == json.loads(json.dumps(rows))
    assert "| model | benchmark |" in (root / "out" / "summary.md").read_text()
    assert (root / "out" / "tah" / "analysis" / "threshold.png").stat().st_size > 1000
    assert not (root / "out" / "standard" / "analysis").exists()


def test_analysis_invariants(setup):
    """Depth-1 predictions of tokens that do not iterate are unchanged by other tokens' depth 2, so
    accuracy(policy) - accuracy(depth 1) = (fixed - broken) / tokens exactly, for both policies."""
    from tah.data.labeling import read_labels
    from tah.eval.analysis import token_analysis

    root = setup
    model = TaHForCausalLM.from_pretrained(root / "tah")
    rows = [r for r in read_labels(str(root / "labels")).to_pylist() if r["is_validation"]][:6]
    res = token_analysis(model, rows, thresholds=(0.0, 0.5, 1.0))
    n = res["tokens"]
    for p in ("oracle", "decider"):
        diff = (res["accuracy"][p] - res["accuracy"]["depth1"]) * n
        assert abs(diff - (res["fixed"][p] - res["broken"][p])) < 1e-6
    sweep = {s["threshold"]: s for s in res["threshold_sweep"]}
    assert sweep[1.0]["pct_iterated"] == 0 and sweep[1.0]["accuracy"] == res["accuracy"]["depth1"]
    assert sweep[0.0]["pct_iterated"] == 100
    assert 0 <= res["decider_vs_oracle"]["precision"] <= 1 or res["decider_vs_oracle"]["precision"] != res["decider_vs_oracle"]["precision"]
