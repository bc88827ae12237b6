"""A TaH2 checkpoint through the evaluation path without Ray: jobs/sweep.py's `evaluate` (the harness's
EngineWorker built from jobs/eval.py's `worker_args`, grading, the summary) at several maximum depths and
thresholds, and the max-depth sweep's grid, names, results and best recipe.

    PYTHONPATH=. .venv/bin/python -m pytest -x -q tests/test_eval_tah2.py
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from jobs.eval import EvalConfig, worker_args
from jobs.sweep import SweepConfig, best_recipe, evaluate, grid, trial_name, write_results
from tah import TaHConfig, TaHForCausalLM
from tah.assets import shipped_tokenizer
from tah.config import from_dict
from tah.eval.benchmarks import load_benchmark
from tah.eval.harness import run_local, summarize
from tah.testing import tiny_qwen3
from tah.tokenizer import load_tokenizer

N_TOKENS = 8


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tok = load_tokenizer(shipped_tokenizer())
    torch.manual_seed(0)
    model = TaHForCausalLM.from_backbone(tiny_qwen3(vocab_size=len(tok), seed=1), TaHConfig.tah2(max_depth=3))
    path = tmp_path_factory.mktemp("tah2") / "model"
    model.save_pretrained(path, tokenizer=tok)
    return str(path)


def _cfg(ckpt: str, out: str, **fields) -> SweepConfig:
    return from_dict(SweepConfig, {"kind": "max_depth", "checkpoint": ckpt, "max_depths": [1, 2, 3], "output": out,
                                   "eval": {"limit": 3, "batch_size": 3, "n_samples": 2,
                                            "sampling": {"max_tokens": N_TOKENS, "ignore_eos": True},
                                            "engine": {"max_model_len": 512}}, **fields})


def test_tah2_checkpoint_evaluates_at_each_max_depth(ckpt, tmp_path):
    """Threshold 0 sends every token as deep as allowed: the average depth is the cap exactly; the
    checkpoint's own threshold (0.5, a random decider) lands in between at the full depth."""
    cfg = _cfg(ckpt, str(tmp_path))
    rows = []
    for m in (1, 2, 3):
        out = evaluate(ckpt, cfg, threshold=0.0, max_depth=m)
        assert out["avg_depth"] == pytest.approx(m) and out["pct_iterated"] == pytest.approx(100.0 * (m > 1))
        assert 0.0 <= out["accuracy"] <= 1.0 and out["parameters"] > 0
        rows.append({"trial": trial_name({"max_depth": m}), "max_depth": m, "status": "done", **out})
    free = evaluate(ckpt, cfg, threshold=None)  # the checkpoint's threshold and M
    assert 1.0 < free["avg_depth"] < 3.0
    # The sweep's own pieces: grid, results (table, plot), best recipe.
    assert grid(cfg) == [{"max_depth": 1}, {"max_depth": 2}, {"max_depth": 3}]
    rows[2]["accuracy"] += 1.0  # make the best trial unambiguous
    write_results(cfg, rows)
    res = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert res["best"] == "max_depth-3" and (tmp_path / "sweep" / "max_depth.png").stat().st_size > 1000
    assert "| max_depth-1 | 1 |" in (tmp_path / "sweep" / "results.md").read_text()
    assert yaml.safe_load((tmp_path / "sweep" / "best.yaml").read_text())["model"]["max_depth"] == 3
    assert best_recipe(cfg, rows[1])["model"]["max_depth"] == 2


def test_eval_worker_args_carry_max_depth(ckpt):
    """jobs/eval.py's worker arguments (what its Ray actors get) with sampling.max_depth: the samples of
    a TaH2 checkpoint never run deeper; a max_depth beyond the checkpoint's M fails loudly."""
    cfg = from_dict(EvalConfig, {"limit": 2, "sampling": {"max_tokens": N_TOKENS, "max_depth": 2, "ignore_eos": True},
                                 "engine": {"threshold": 0.0, "max_model_len": 512}})
    problems = load_benchmark("tinytask", None, cfg.limit)
    records = run_local(ckpt, problems, cfg.batch_size, **worker_args(cfg))
    for r in records:
        r.update(correct=False, benchmark="tinytask")
    (row,) = summarize("tah2", records)
    assert row["avg_depth"] == pytest.approx(2.0) and row["output_tokens"] == N_TOKENS
    bad = from_dict(EvalConfig, {"limit": 1, "sampling": {"max_tokens": 2, "max_depth": 4},
                                 "engine": {"max_model_len": 512}})
    with pytest.raises(ValueError, match="max_depth must be at most"):
        run_local(ckpt, problems[:1], 1, **worker_args(bad))


def test_max_depth_sweep_config_errors(tmp_path):
    with pytest.raises(ValueError, match="max_depths"):
        SweepConfig(kind="max_depth")
    with pytest.raises(ValueError, match="max_depths"):
        SweepConfig(kind="max_depth", max_depths=[0])
