"""jobs/train.py on local Ray: 2 CPU workers, DeepSpeed ZeRO-2 over gloo, the shipped task's labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tah import TaHForCausalLM
from jobs.label import LabelConfig
from jobs.train import TrainConfig
from tah.config import from_dict
from tah.assets import shipped_task, shipped_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"lora": {"r": 4, "alpha": 8, "dropout": 0.1}, "decider": {"width": 32, "blocks": 1, "dropout": 0.1}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import ray

    from jobs.common import init_ray
    from jobs.label import run as label
    from tah.tokenizer import load_tokenizer
    from tah.testing import tiny_qwen3

    root = tmp_path_factory.mktemp("train")
    tok = load_tokenizer(shipped_tokenizer())
    # A "reference" that is right more often than chance, so that hard and easy tokens both occur.
    tiny_qwen3(vocab_size=len(tok), seed=1, initializer_range=0.02).save_pretrained(root / "base")
    init_ray(num_cpus=2)
    label(LabelConfig(reference_model=str(root / "base"), source=shipped_task(),
                      tokenizer=shipped_tokenizer(), output=str(root / "labels"),
                      samples_per_domain=24, num_shards=2, validation_fraction=0.1))
    yield root
    ray.shutdown()


def _cfg(root: Path, name: str, **kw) -> TrainConfig:
    base = dict(base_model=str(root / "base"), labels=str(root / "labels"), storage_path=str(root / "runs"),
                name=name, num_workers=2, zero_stage=2, global_batch=8, micro_batch=2, max_steps=4, lr=3e-3,
                stage2_lr=3e-3, eval_every=2, checkpoint_every=2, model=MODEL)
    return from_dict(TrainConfig, {**base, **kw})


def _losses(root: Path, name: str, stage: str) -> list[float]:
    path = root / "runs" / name / "tensorboard" / stage / "metrics.jsonl"
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    out = {f"backbone.{k}": v for k, v in load_file(path / "model.safetensors").items()}
    if (path / "lora").exists():
        out.update({f"lora.{k}": v for k, v in load_file(path / "lora/adapter_model.safetensors").items()})
    if (path / "decider.safetensors").exists():
        out.update({f"decider.{k}": v for k, v in load_file(path / "decider.safetensors").items()})
    return out


def test_tah_stages_train_what_they_should(setup):
    from jobs.train import run

    root = setup
    cfg = _cfg(root, "tah", method="tah")
    out = run(cfg)
    s1, s2 = Path(out["stage1"]), Path(out["stage2"])
    l1, l2 = _losses(root, "tah", "stage1"), _losses(root, "tah", "stage2")
    # Four steps on different batches: the losses are logged and finite; what each stage trains is
    # checked on the weights below (a first-vs-last loss comparison flipped with the data).
    assert len(l1) == 4 and len(l2) == 4 and all(x == x and abs(x) < 1e6 for x in l1 + l2)
    # What stage 1 started from: the same seeded construction as the workers'.
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    init = TaHForCausalLM.from_backbone(AutoModelForCausalLM.from_pretrained(root / "base"), cfg.model)
    init.save_pretrained(root / "init")
    w0, w1, w2 = _weights(root / "init"), _weights(s1), _weights(s2)
    changed1 = {k for k in w0 if not torch.equal(w0[k], w1[k])}
    assert any(k.startswith("backbone.") for k in changed1) and any(k.startswith("lora.") for k in changed1)
    assert not any(k.startswith("decider.") for k in changed1)
    changed2 = {k for k in w1 if not torch.equal(w1[k], w2[k])}
    assert changed2 and all(k.startswith("decider.") for k in changed2)
    loaded = TaHForCausalLM.from_pretrained(s2)  # the final checkpoint loads and runs
    assert loaded(torch.tensor([[1, 2, 3]])).logits.shape[-1] == loaded.backbone.config.vocab_size
    # Re-running the finished command does no work.
    assert run(cfg) == out


def test_a_rank_without_hard_tokens_still_trains(setup, tmp_path):
    """Rank 1's rows carry no hard token, so depth 2 (and the LoRA weights) never run there; both ranks
    must still reduce the same gradients under ZeRO-2, or gloo aborts the run."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.train import run
    from tah.data.labeling import read_labels

    table = read_labels(str(setup / "labels"))
    train_idx = [i for i, v in enumerate(table.column("is_validation").to_pylist()) if not v]
    easy = set(train_idx[len(train_idx) // 2:])  # label_splits gives rank 1 the second half, in order
    # Training depths come from the reference's mismatches (the oracle), so those are what goes.
    for col in ("ref_mismatch", "depth"):
        easy_value = 0 if col == "ref_mismatch" else 1
        vals = [[easy_value] * len(v) if i in easy else v for i, v in enumerate(table.column(col).to_pylist())]
        table = table.set_column(table.schema.get_field_index(col), col, pa.array(vals, type=table.schema.field(col).type))
    hard = table.column("ref_mismatch").to_pylist()
    assert all(any(hard[i]) for i in train_idx if i not in easy) and not any(any(hard[i]) for i in easy)
    (tmp_path / "labels").mkdir()
    pq.write_table(table, tmp_path / "labels" / "shard-00000.parquet")
    out = run(_cfg(setup, "easyrank", method="tah", labels=str(tmp_path / "labels"), max_steps=2, eval_every=2,
                   checkpoint_every=2))
    assert Path(out["stage2"], "tah_config.json").exists()


def test_standard_baseline_shares_the_code_path(setup):
    from jobs.train import run

    root = setup
    out = run(_cfg(root, "standard", method="standard"))
    losses = _losses(root, "standard", "standard")
    assert losses[-1] < losses[0]
    assert TaHForCausalLM.from_pretrained(out["standard"]).config.max_depth == 1


def test_crash_and_resume_equals_uninterrupted(setup):
    """AlwaysThink (the other baseline, one stage at depth 2 everywhere) trained twice, the second
    time with a worker killed after the step-2 checkpoint: the same weights and loss."""
    from jobs.train import run
    from tah.testing import FailAfterStep

    root = setup
    a = run(_cfg(root, "resume-a", method="always_think"))
    m = TaHForCausalLM.from_pretrained(a["stage1"])
    assert m.config.max_depth == 2 and m.config.depth_attention == "current"
    losses = _losses(root, "resume-a", "stage1")
    assert losses[-1] < losses[0]
    b = run(_cfg(root, "resume-b", method="always_think"),
            after_checkpoint=FailAfterStep(2, str(root / "crashed-once")))
    assert (root / "crashed-once").exists()  # the worker really died after the step-2 checkpoint
    wa, wb = _weights(Path(a["stage1"])), _weights(Path(b["stage1"]))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    assert _losses(root, "resume-a", "stage1")[-1] == pytest.approx(_losses(root, "resume-b", "stage1")[-1], abs=1e-6)


def test_pruned_run_trains_one_layer_less(setup):
    from jobs.train import run

    root = setup
    out = run(_cfg(root, "pruned", method="always_think", prune=True, max_steps=2))
    report = json.loads((root / "runs/pruned/pruned-base/pruning.json").read_text())
    deltas = {int(k): v for k, v in report["ppl_increase"].items()}
    assert sorted(deltas) == [0, 1, 2, 3] and report["pruned_layer"] == min(deltas, key=deltas.get)
    m = TaHForCausalLM.from_pretrained(out["stage1"])
    assert m.backbone.config.num_hidden_layers == 3
