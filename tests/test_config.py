"""The config machinery: strict typed recipes, Literal choices checked once, flat aliases, layering.

    .venv/bin/python -m pytest -q tests/test_config.py
"""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from jobs.eval import EvalConfig
from jobs.experiment import ExperimentConfig
from jobs.train import TrainConfig, model_for_method
from tah.config import TaHConfig, from_dict, load_config, to_dict


def test_literal_choices_are_checked_in_recipes_and_in_python():
    with pytest.raises(ValueError, match="method must be one of standard | always_think | tah"):
        load_config(TrainConfig, None, ["method=sft"])
    with pytest.raises(ValueError, match="TrainConfig.method"):
        TrainConfig(method="sft")
    with pytest.raises(ValueError, match="attn_backend"):
        TaHConfig(attn_backend="fast")
    with pytest.raises(ValueError, match="zero_stage"):
        load_config(TrainConfig, None, ["optim.zero_stage=4"])
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(TrainConfig, None, ["optim.learning_rate=1"])


def test_flat_aliases_reach_the_nested_home(tmp_path):
    cfg = load_config(TrainConfig, None, ["lr=3e-5", "max_steps=7", "optim.epochs=1"])
    assert (cfg.optim.lr, cfg.optim.max_steps, cfg.optim.epochs) == (3e-5, 7, 1.0)
    exp = load_config(ExperimentConfig, None, ["train.lr=0.01", "eval.max_tokens=12", "eval.threshold=0.7"])
    assert exp.train.optim.lr == 0.01 and exp.eval.sampling.max_tokens == 12 and exp.eval.engine.threshold == 0.7
    recipe = tmp_path / "old.yaml"  # a recipe in the earlier flat form still loads, into the nested one
    recipe.write_text(yaml.safe_dump({"method": "standard", "lr": 0.002, "global_batch": 16, "micro_batch": 8}))
    old = load_config(TrainConfig, recipe)
    assert old.optim.lr == 0.002 and old.optim.global_batch == 16
    assert to_dict(old)["optim"]["micro_batch"] == 8 and "lr" not in to_dict(old)
    assert from_dict(TrainConfig, to_dict(old)) == old  # the nested form round-trips across processes


def test_job_configs_nest_the_library_configs_instead_of_copying_them():
    from serve.tah import ServeConfig
    from tah.engine import EngineConfig
    from tah.sampling import SamplingParams

    names = {f.name for f in dataclasses.fields(EvalConfig)}
    assert {"engine", "sampling"} <= names
    # (EvalConfig.seed is the base every sample's own sampling.seed is derived from: another thing)
    assert not names - {"seed"} & ({f.name for f in dataclasses.fields(EngineConfig)}
                                   | {f.name for f in dataclasses.fields(SamplingParams)})
    serve = {f.name for f in dataclasses.fields(ServeConfig)}
    assert "engine" in serve and not serve & {f.name for f in dataclasses.fields(EngineConfig)}
    assert load_config(ServeConfig, None, ["max_num_seqs=8"]).engine.max_num_seqs == 8  # the flat name users type


def test_a_method_derives_its_model_without_rewriting_the_config():
    cfg = from_dict(TrainConfig, {"method": "standard", "model": {"max_depth": 2}})
    assert cfg.model.max_depth == 2  # the config keeps what was written
    assert model_for_method(cfg).max_depth == 1
    at = from_dict(TrainConfig, {"method": "always_think"})
    assert at.model.depth_attention == "duo_causal" and model_for_method(at).depth_attention == "current"
    tah = from_dict(TrainConfig, {"method": "tah"})
    assert model_for_method(tah) is tah.model

