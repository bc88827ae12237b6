"""TaH2 training (method tah2): the coverage threshold, labels, costs and loss on hand-built numbers; the
side pass against a brute-force forward per token; the pooled threshold on 2 real (gloo) workers ==
one worker holding both micro-batches; a short 2-worker Ray Train + DeepSpeed run whose loss falls.

    PYTHONPATH=. .venv/bin/python -m pytest -x -q tests/test_tah2_train.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tah import TaHConfig, TaHForCausalLM
from tah.model import next_token_targets
from tah.oracle import boundary_labels, coverage_threshold, dense_lookahead_labels
from tah.testing import tiny_qwen3
from tah.train.losses import Tah2Objective, cost_weighted_bce, dynamic_pos_weight
from tah.train.tah2 import JointStep, joint_loss, lookahead_scores

from . import helpers
from .helpers import batch, free_port


def make_tah2(max_depth: int = 2, seed: int = 0, dtype: torch.dtype = torch.float64, **fields) -> TaHForCausalLM:
    model = helpers.make_tah2(max_depth, seed, dtype, **fields)
    return model


# ------------------------------------------------------------------ pure functions, by hand
def test_coverage_threshold_by_hand():
    d = torch.tensor([3.0, 1.0, 0.5, -1.0])
    # positives 3, 1, 0.5 (sum 4.5); running sums 3, 4, 4.5
    assert coverage_threshold(d, 0.99) == 0.5  # 0.99 x 4.5 = 4.455 -> reached at 4.5
    assert coverage_threshold(d, 0.8) == 1.0  # 3.6 -> reached at 4
    assert coverage_threshold(d, 0.5) == 3.0  # 2.25 -> reached at 3
    assert coverage_threshold(d, 1.0) == 0.5
    assert coverage_threshold(torch.tensor([2.0, 2.0, 1.0]), 0.5) == 2.0  # 2.5 of 5 -> at the second 2
    assert coverage_threshold(torch.tensor([-1.0, 0.0]), 0.99) is None  # no positive gain
    assert coverage_threshold(torch.zeros(0), 0.99) is None
    assert coverage_threshold(torch.tensor([float("nan"), 1.0]), 0.99) == 1.0  # NaN takes no part
    with pytest.raises(ValueError, match="coverage"):
        coverage_threshold(d, 0.0)


def test_boundary_labels_and_costs_by_hand():
    deltas = torch.tensor([3.0, 1.0, 0.5, -1.0, 7.0])
    cand = torch.tensor([True, True, True, True, False])  # the 7 is no candidate: it is not pooled
    hard, cost, tau = boundary_labels(deltas, cand, 0.8)
    assert tau == 1.0
    assert hard.tolist() == [True, True, False, False, False]
    # clamp(|delta - tau|, 1e-6, 1) for candidates, 1e-6 for the rest
    assert torch.allclose(cost, torch.tensor([1.0, 1e-6, 0.5, 1.0, 1e-6]), atol=0, rtol=1e-6)
    hard, cost, tau = boundary_labels(torch.tensor([-0.3, -2.0, 0.0]), torch.tensor([True, True, False]), 0.99)
    assert tau is None and not hard.any()  # no positive gain: no hard token, costs |delta|
    assert torch.allclose(cost, torch.tensor([0.3, 1.0, 1e-6]), rtol=1e-6)


def test_dense_labels_three_depths_by_hand():
    nan = float("nan")
    # scores s1, s2, s3 per token (s_{d+1} of a token that stopped at d is the side pass's)
    scores = torch.tensor([[2.0, 0.5, 0.4], [1.0, 0.9, 0.2], [0.5, 1.5, nan], [3.0, 1.0, 0.0], [1.2, 0.4, 0.1]])
    executed = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1]]).bool()
    sup = torch.tensor([True, True, True, False, True])
    labels, costs, taus = dense_lookahead_labels(scores, executed, sup, [0.9, 0.7])
    # boundary 1: candidates 0, 1, 2, 4; gains 1.5, 0.1, -1.0, 0.8; positives sum 2.4, 0.9 of it = 2.16
    #   reached at 1.5 + 0.8 -> tau1 = 0.8; hard: 0 and 4 (label 2)
    # boundary 2: candidates 0, 4 (hard at 1, ran 2); gains 0.1, 0.3; 0.7 x 0.4 = 0.28 -> tau2 = 0.3;
    #   hard: 4 (label 3). Token 1 ran depth 2 without being a candidate: cost 1e-6 there.
    assert taus[0] == pytest.approx(0.8) and taus[1] == pytest.approx(0.3)
    assert labels.tolist() == [2, 1, 1, 0, 3]
    want = torch.tensor([[0.7, 0.2], [0.7, 1e-6], [1.0, 1e-6], [1e-6, 1e-6], [1e-6, 1e-6]])
    assert torch.allclose(costs, want, atol=1e-6)


def test_pos_weight_and_cost_weighted_bce_by_hand():
    counts = torch.tensor([[2, 6], [0, 3], [5, 0], [1, 1000], [100, 1]], dtype=torch.float64)  # [pos, neg]
    assert dynamic_pos_weight(counts).tolist() == pytest.approx([3.0, 1.0, 1.0, 50.0, 0.02])
    z, y, c = torch.tensor([0.0, 2.0, -1.0]), torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.5, 1.0, 0.25])
    # cost x [-(pw y log sigmoid(z) + (1 - y) log(1 - sigmoid(z)))]
    want = 0.5 * 3 * math.log(2) + 1.0 * math.log(1 + math.exp(2)) + 0.25 * 3 * math.log(1 + math.exp(1))
    assert float(cost_weighted_bce(z, y, c, 3.0)) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="coverage"):
        Tah2Objective(coverage=[0.9, 1.5])


def test_train_config_asks_for_a_tah2_model():
    from jobs.train import STAGES, TrainConfig, model_for_method
    from tah.config import from_dict

    with pytest.raises(ValueError, match="method tah2 trains a TaH2 model"):
        from_dict(TrainConfig, {"method": "tah2"})  # the default model is v1's
    model = {"max_depth": 2, "input_rule": "updater", "combine": "stop_prob_mix", "decider_kind": "tah2",
             "depth_lora": False, "threshold": 0.5}
    cfg = from_dict(TrainConfig, {"method": "tah2", "model": model})
    assert model_for_method(cfg) == TaHConfig.tah2(max_depth=2) and STAGES["tah2"] == ["joint"]
    with pytest.raises(ValueError, match="zero_stage"):
        from_dict(TrainConfig, {"method": "tah2", "model": model, "optim": {"zero_stage": 3}})
    with pytest.raises(ValueError, match="TaH2 training needs a TaH2 model"):
        JointStep(TaHForCausalLM.from_backbone(tiny_qwen3(), TaHConfig(max_depth=2)), Tah2Objective())


# ------------------------------------------------------------------ the side pass
def _packed_batch(T: int = 12, seed: int = 0):
    """Two rows, each holding two samples (segment ids 0, 1) and right padding on the second."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (2, T), generator=g)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, T - 3:] = 0
    seg = torch.zeros(2, T, dtype=torch.long)
    seg[0, 5:], seg[1, 7:] = 1, 1
    return ids.masked_fill(mask == 0, 0), mask, seg


@pytest.mark.parametrize("max_depth,attention,packed", [(2, "duo_causal", False), (3, "duo_causal", False),
                                                        (3, "first_self", False), (2, "duo_causal", True)])
def test_side_pass_equals_forced_forward_per_token(max_depth, attention, packed):
    """s_{d+1} of each token that stopped at d, from the side pass, == its depth-(d+1) CE in a full forward
    where only that token runs one depth deeper (fp64: exact up to summation order)."""
    model = make_tah2(max_depth, depth_attention=attention).eval()
    if packed:
        ids, mask, seg = _packed_batch()
    else:
        (ids, mask), seg = batch(B=2, T=10, padding="left", seed=22), None
    B, T = ids.shape
    extra = {"segment_ids": seg} if packed else {}
    target = next_token_targets(ids, mask.bool(), seg).reshape(-1)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, return_depth_states=True, **extra)
    run = out.depths.reshape(-1)
    for d in range(1, max_depth):
        stopped = (run == d).nonzero().squeeze(1)
        assert stopped.numel() >= 2 and bool((run > d).any()), "the routing must mix depths here"
        side = lookahead_scores(model, out.depth_states, ids, target, d, stopped, seg)
        for k, t in enumerate(stopped.tolist()):
            forced = run.clone()
            forced[t] = d + 1
            with torch.no_grad():
                o = model(ids, attention_mask=mask, depths=forced.view(B, T), return_depth_states=True, **extra)
            st = o.depth_states
            z = st.logits[d][int(torch.searchsorted(st.flat[d], torch.tensor(t)))]
            ce = 0.0 if target[t] == -100 else float(F.cross_entropy(z[None], target[t:t + 1]))
            assert abs(float(side[k]) - ce) <= 1e-9, (d, t, float(side[k]), ce)
        with pytest.raises(ValueError, match="must not have run"):
            lookahead_scores(model, out.depth_states, ids, target, d, (run > d).nonzero().squeeze(1)[:1], seg)


def test_joint_loss_labels_equal_bruteforce_rule_and_the_loss_is_written_out():
    """The labels and costs of joint_loss == the dense rule over score tables built by brute force, and its
    loss == -sum log p_mix(target) + 0.05 x the cost-weighted BCE written out term by term."""
    M = 3
    model = make_tah2(M)
    ids, mask = batch(B=3, T=12, padding="left", seed=22)
    labels = ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) < 0.25, -100)
    obj = Tah2Objective(coverage=[0.9, 0.8])
    res = joint_loss(model, model, {"input_ids": ids, "attention_mask": mask, "labels": labels}, obj)
    B, T = ids.shape
    target = next_token_targets(labels, mask.bool()).reshape(-1)
    sup = target != -100
    with torch.no_grad():
        full = model(ids, attention_mask=mask, return_depth_states=True)
    run = full.depths.reshape(-1)
    scores = torch.full((B * T, M), float("nan"), dtype=torch.float64)
    for t in sup.nonzero().squeeze(1).tolist():
        for d in range(1, min(int(run[t]) + 1, M) + 1):  # every depth it ran, and one more (forced)
            st = full.depth_states
            if d > run[t]:
                forced = run.clone()
                forced[t] = d
                with torch.no_grad():
                    st = model(ids, attention_mask=mask, depths=forced.view(B, T), return_depth_states=True).depth_states
            z = st.logits[d - 1][int(torch.searchsorted(st.flat[d - 1], torch.tensor(t)))]
            scores[t, d - 1] = float(F.cross_entropy(z[None], target[t:t + 1]))
    executed = torch.stack([run >= d for d in range(1, M + 1)], 1)
    want_labels, want_costs, want_taus = dense_lookahead_labels(scores, executed, sup, [0.9, 0.8])
    assert torch.equal(res.lookahead.labels, want_labels)
    assert torch.allclose(res.lookahead.costs.double(), want_costs.double(), atol=1e-6)
    assert res.lookahead.taus == pytest.approx(want_taus)
    assert res.lookahead.side_tokens > 0 and (want_labels == 2).any()
    # the loss, written out
    with torch.no_grad():
        logp = model(ids, attention_mask=mask).logits.reshape(B * T, -1)
    nll = -float(logp[sup].gather(1, target[sup][:, None]).sum())
    dec = full.decider_logits.reshape(B * T, M - 1)
    bce = 0.0
    for d in range(1, M):
        act = [t for t in range(B * T) if sup[t] and run[t] >= d]
        pos = sum(int(want_labels[t] > d) for t in act)
        neg = len(act) - pos
        pw = min(max(neg / pos, 0.02), 50.0) if pos and neg else 1.0
        assert float(res.pos_weight[d - 1]) == pytest.approx(pw)
        for t in act:
            z, y, c = float(dec[t, d - 1]), float(want_labels[t] > d), float(want_costs[t, d - 1])
            bce += c * -(pw * y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z))))
    assert res.nll_sum == pytest.approx(nll, rel=1e-9)
    assert res.bce_sum == pytest.approx(bce, rel=1e-6)
    assert float(res.loss_sum) == pytest.approx(nll + 0.05 * bce, rel=1e-6)
    assert res.supervised == int(sup.sum())
    assert res.run_counts.sum() == res.label_counts.sum() == int(sup.sum())


def test_joint_step_scales_by_global_count_and_every_weight_gets_a_gradient():
    model = make_tah2(2, dtype=torch.float32).train()
    ids, mask = batch(B=2, T=10, padding="right", seed=23)
    b = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    step = JointStep(model, Tah2Objective(), scale=6.0)
    n = step.begin([b, b])
    assert n == 2 * int((next_token_targets(ids, mask.bool()) != -100).sum())
    model.threshold = 1.0  # nobody continues: the updater runs on no token
    loss = step.micro(model, b)
    res = joint_loss(model, model, b, Tah2Objective())
    assert float(loss) == pytest.approx(float(res.loss_sum) * 6.0 / n, rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    m = step.metrics()
    assert m["share_depth1"] == 1.0 and m["share_depth2"] == 0.0 and m["tau_d1_spread"] == 0.0
    assert m["loss"] == pytest.approx(m["ntp"] + 0.05 * m["bce"])


# ------------------------------------------------------------------ two real workers (gloo)
def _worker_batches():
    """Rank 0's and rank 1's micro-batches (different lengths and padding), and both in one batch."""
    a_ids, a_mask = batch(B=2, T=12, padding="right", seed=31)
    b_ids, b_mask = batch(B=3, T=9, padding="right", seed=32)
    both_ids = torch.cat([a_ids, F.pad(b_ids, (0, 3))])
    both_mask = torch.cat([a_mask, F.pad(b_mask, (0, 3))])
    return [(a_ids, a_mask), (b_ids, b_mask)], (both_ids, both_mask)


def _gloo_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from tah.train.loop import all_gather_varlen, all_reduce_sum

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # 1. the threshold alone, sizes 5 and 3, then 4 and 0 (a worker without candidates)
        g = torch.Generator().manual_seed(7)
        parts = [torch.randn(5, generator=g), torch.randn(3, generator=g)]
        res = {"tau_a": coverage_threshold(parts[rank], 0.9, all_gather_varlen)}
        res["tau_b"] = coverage_threshold(parts[0][:4] if rank == 0 else torch.zeros(0), 0.9, all_gather_varlen)
        # 2. joint_loss on different micro-batches (M = 3)
        model = make_tah2(3)
        (ids, mask) = _worker_batches()[0][rank]
        out = joint_loss(model, model, {"input_ids": ids, "attention_mask": mask, "labels": ids},
                         Tah2Objective(coverage=0.9), all_gather_varlen, all_reduce_sum)
        res.update(taus=out.lookahead.taus, pos_weight=out.pos_weight.tolist(), loss=float(out.loss_sum),
                   labels=out.lookahead.labels.tolist())
        # 3. a worker whose tokens all stop at depth 1 still fires every collective, and gets every gradient
        model = make_tah2(3, dtype=torch.float32).train()
        model.threshold = 1.0 if rank == 1 else 0.5
        step = JointStep(model, Tah2Objective(), all_gather_varlen, all_reduce_sum, scale=2.0)
        b = {"input_ids": ids, "attention_mask": mask, "labels": ids}
        step.begin([b])
        step.micro(model, b).backward()
        res["all_grads"] = all(p.grad is not None for p in model.parameters())
        res["metrics"] = step.metrics()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def test_two_workers_pool_the_threshold_like_one_worker(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_gloo_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    r = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in range(2)]
    g = torch.Generator().manual_seed(7)
    parts = [torch.randn(5, generator=g), torch.randn(3, generator=g)]
    assert r[0]["tau_a"] == r[1]["tau_a"] == coverage_threshold(torch.cat(parts), 0.9)
    assert r[0]["tau_b"] == r[1]["tau_b"] == coverage_threshold(parts[0][:4], 0.9)
    # one worker holding both micro-batches gives the same thresholds, pos_weights, labels and loss
    (a, b), (ids, mask) = _worker_batches()
    model = make_tah2(3)
    one = joint_loss(model, model, {"input_ids": ids, "attention_mask": mask, "labels": ids}, Tah2Objective(coverage=0.9))
    assert r[0]["taus"] == r[1]["taus"] == pytest.approx(one.lookahead.taus, rel=1e-9)
    assert r[0]["pos_weight"] == r[1]["pos_weight"] == pytest.approx(one.pos_weight.tolist())
    lab = one.lookahead.labels.view(5, 12)
    assert r[0]["labels"] == lab[:2].reshape(-1).tolist()
    assert r[1]["labels"] == lab[2:, :9].reshape(-1).tolist()
    assert r[0]["loss"] + r[1]["loss"] == pytest.approx(float(one.loss_sum), rel=1e-6)  # (the BCE sums in fp32)
    assert all(x["all_grads"] for x in r)
    assert r[0]["metrics"]["tau_d1"] == r[1]["metrics"]["tau_d1"] and r[0]["metrics"]["tau_d1_spread"] == 0.0
    assert r[0]["metrics"]["share_depth1"] == r[1]["metrics"]["share_depth1"] < 1.0


# ------------------------------------------------------------------ the job: Ray Train + DeepSpeed, 2 workers
def _write_rows(out: Path, n_train: int = 32, n_val: int = 4) -> int:
    """A label-shaped Parquet shard of the shipped task (its tokens and assistant masks; tah2 reads
    nothing else, so the oracle columns are zeros). Returns the tokenizer's vocabulary size."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tah.assets import shipped_task, shipped_tokenizer
    from tah.data.labeling import SHARD_SCHEMA
    from tah.tokenizer import load_tokenizer, tokenize_chat

    tok = load_tokenizer(shipped_tokenizer())
    lines = (Path(shipped_task()) / "math/train-00000-of-00001.jsonl").read_text().splitlines()[:n_train + n_val]
    rows = []
    for i, line in enumerate(lines):
        ids, am = tokenize_chat(tok, json.loads(line)["messages"])
        T = len(ids)
        rows.append({"sample_id": f"s{i:03d}", "domain": "math", "is_validation": i >= n_train, "input_ids": ids,
                     "assistant_mask": am, "depth": [1] * T, "ref_mismatch": [0] * T, "ref_ce": [0.0] * T,
                     "ref_entropy": [0.0] * T, "num_tokens": T, "num_labelled": sum(am), "num_hard": 0, "extra": "{}"})
    out.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), out / "shard-00000-of-00001.parquet")
    return len(tok)


def _job_cfg(root: Path, name: str):
    from jobs.train import TrainConfig
    from tah.config import load_config

    return load_config(TrainConfig, Path(__file__).resolve().parents[1] / "jobs/configs/train/tah2-tiny.yaml", [
        f"base_model={root / 'base'}", f"labels={root / 'labels'}", f"storage_path={root / 'runs'}", f"name={name}",
        "optim.global_batch=8", "optim.micro_batch=2", "optim.max_steps=6", "optim.lr=3e-3",
        "optim.eval_every=3", "optim.checkpoint_every=3"])


@pytest.fixture(scope="module")
def tah2_job(tmp_path_factory):
    """One local Ray (2 CPUs) for the job tests, the data, a base model, and one uninterrupted run."""
    import ray

    from jobs.common import init_ray
    from jobs.train import run

    root = tmp_path_factory.mktemp("tah2job")
    vocab = _write_rows(root / "labels")
    tiny_qwen3(vocab_size=vocab, seed=1, initializer_range=0.02).save_pretrained(root / "base")
    init_ray(num_cpus=2)
    try:
        yield root, vocab, run(_job_cfg(root, "tah2"))
    finally:
        ray.shutdown()


def _job_metrics(root: Path, name: str) -> list[dict]:
    path = root / "runs" / name / "tensorboard/joint/metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_tah2_job_trains_on_two_ray_workers(tah2_job):
    """jobs/train.py method tah2 on 2 CPU workers (ZeRO-2 over gloo): the loss falls, both workers use the
    same thresholds every step, the metrics reach TensorBoard, the best checkpoint loads as TaH2 and has
    the val_loss it was picked by."""
    root, vocab, out = tah2_job
    lines = _job_metrics(root, "tah2")
    assert [m["step"] for m in lines] == list(range(1, 7))
    losses = [m["loss"] for m in lines]
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    for m in lines:
        assert m["loss"] == pytest.approx(m["ntp"] + 0.05 * m["bce"])
        assert m["tau_d1"] > 0 and m["tau_d1_spread"] == 0.0  # the workers pooled the same threshold
        assert m["share_depth1"] + m["share_depth2"] == pytest.approx(1.0)
        assert m["label_share_d1"] + m["label_share_d2"] == pytest.approx(1.0)
        assert 0.02 <= m["pos_weight_d1"] <= 50 and 0 < m["side_share"] <= 1
    assert any((root / "runs/tah2/tensorboard/joint").glob("events.out.tfevents*"))
    best = json.loads((root / "runs/tah2/joint/result.json").read_text())
    assert best["val_loss"] == min(m["val_loss"] for m in lines if "val_loss" in m)
    model = TaHForCausalLM.from_pretrained(out["joint"]).eval()
    assert model.config.decider_kind == "tah2" and model.updater is not None
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == vocab
    # The checkpoint picked by val_loss has that val_loss: the exported model, run alone over the same
    # validation rows and micro-batches, gives the loss the run logged at its step.
    from tah.data.labeling import read_validation_rows
    from tah.train.batching import collate

    rows = read_validation_rows(str(root / "labels"), 1024)
    with torch.no_grad():
        per = [float(model(**{k: b[k] for k in ("input_ids", "attention_mask", "labels")}).loss)
               for b in (collate(rows[i:i + 2], "standard", 2) for i in range(0, len(rows), 2))]
    assert sum(per) / len(per) == pytest.approx(best["val_loss"], rel=1e-5)


def test_tah2_job_resumes_exactly_after_a_crash(tah2_job):
    """The same run with a worker killed after the step-3 checkpoint: the same weights and losses."""
    from safetensors.torch import load_file

    from jobs.train import run
    from tah.testing import FailAfterStep

    root, _, out = tah2_job
    crashed = run(_job_cfg(root, "tah2-crash"), after_checkpoint=FailAfterStep(3, str(root / "crashed-once")))
    assert (root / "crashed-once").exists()
    for name in ("model.safetensors", "updater.safetensors", "decider.safetensors"):
        a, b = load_file(Path(out["joint"], name)), load_file(Path(crashed["joint"], name))
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6), (name, k)
    want = _job_metrics(root, "tah2")
    got = {m["step"]: m for m in _job_metrics(root, "tah2-crash")}  # (steps after 3 logged once more)
    assert got[6]["loss"] == pytest.approx(want[-1]["loss"], abs=1e-6)
    assert got[6]["tau_d1"] == pytest.approx(want[-1]["tau_d1"], abs=1e-9)
