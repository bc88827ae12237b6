"""Training switches, save/load round trips (HF- and peft-loadable, no pickle) and layer pruning."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tah import TaHForCausalLM
from tah.model import backbone_state_dict
from tah.prune import perplexity, prune_layer
from tah.testing import random_depths, tiny_qwen3

from .helpers import batch, make


@pytest.mark.parametrize("stage,expect", [
    ("stage1", {"backbone", "lora"}), ("stage2", {"decider"}), ("standard", {"backbone"}),
    ("all", {"backbone", "lora", "decider"}), ("frozen", set()),
])
def test_stage_switches_route_gradients(stage, expect):
    model, _ = make(max_depth=2)
    model.train()
    model.set_trainable(stage)
    ids, mask = batch(B=2, T=10)
    depths = random_depths(2, 10, 2, hard_fraction=0.5, seed=1)
    out = model(ids, attention_mask=mask, depths=depths, labels=ids)
    # Stage-2 objective: BCE on the decider; otherwise the LM loss. Sum both so any path can show up.
    loss = out.loss + out.decider_logits.float().sigmoid().mean()
    if not expect:
        assert not loss.requires_grad
        return
    loss.backward()
    got = set()
    for comp, params in model.components().items():
        with_grad = [p for p in params if p.grad is not None and p.grad.abs().sum() > 0]
        if with_grad:
            got.add(comp)
        if comp in expect:  # every trainable tensor of an enabled component receives a gradient
            assert all(p.requires_grad for p in params)
        else:
            assert all(p.grad is None for p in params), comp
    assert got == expect
    rep = model.parameter_report()
    assert rep["all"]["trainable"] == sum(rep[c]["total"] for c in expect)


def test_parameter_report_counts():
    model, _ = make(max_depth=2)
    rep = model.parameter_report()
    hf = tiny_qwen3()
    assert rep["backbone"]["total"] == sum(p.numel() for p in hf.parameters())
    assert rep["lora"]["total"] > 0 and rep["decider"]["total"] > 0


def test_save_load_roundtrip(tmp_path):
    model, _ = make(max_depth=3, threshold=0.7)
    ids, mask = batch(B=2, T=12)
    depths = random_depths(2, 12, 3, hard_fraction=0.4, seed=2)
    with torch.no_grad():
        before = model(ids, attention_mask=mask, depths=depths)
        free_before = model(ids, attention_mask=mask)
    model.save_pretrained(tmp_path / "ckpt")
    files = sorted(p.relative_to(tmp_path / "ckpt").as_posix() for p in (tmp_path / "ckpt").rglob("*") if p.is_file())
    assert "model.safetensors" in files and "lora/adapter_model.safetensors" in files
    assert "decider.safetensors" in files and "tah_config.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert json.loads((tmp_path / "ckpt" / "tah_config.json").read_text())["threshold"] == 0.7
    assert not list(tmp_path.glob(".ckpt.tmp-*"))

    loaded = TaHForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        after = loaded(ids, attention_mask=mask, depths=depths)
        free_after = loaded(ids, attention_mask=mask)
    v = mask.bool()
    assert torch.equal(before.logits[v], after.logits[v])
    assert torch.equal(before.decider_logits[v], after.decider_logits[v])
    assert torch.equal(free_before.depths, free_after.depths)

    # The backbone is a plain HF checkpoint, and the adapter a plain peft one.
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        plain = hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0)).logits
        d1 = model(ids, attention_mask=mask, depths=torch.ones_like(ids)).logits
    assert (plain - d1)[v].abs().max() <= 1e-5
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt"), tmp_path / "ckpt/lora")
    lora_b = {n: p for n, p in peft_model.named_parameters() if "lora_B" in n}
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b.values())


def test_overwrite_is_atomic_and_load_errors(tmp_path):
    model, _ = make(max_depth=2)
    model.save_pretrained(tmp_path / "c")
    model.save_pretrained(tmp_path / "c")  # replacing an existing checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    with pytest.raises(FileNotFoundError, match="not a TaH checkpoint"):
        TaHForCausalLM.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown TaHConfig field"):
        TaHForCausalLM.from_pretrained(tmp_path / "c", bogus=1)
    assert TaHForCausalLM.from_pretrained(tmp_path / "c", threshold=0.5).threshold == 0.5


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    model, _ = make(max_depth=2)
    model.save_pretrained(tmp_path / "c")
    good = (tmp_path / "c" / "decider.safetensors").read_bytes()
    from tah import storage

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(storage, "replace_dir", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "c")
    assert (tmp_path / "c" / "decider.safetensors").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_standard_model_has_no_lora_or_decider(tmp_path):
    model, ref = make(max_depth=1, lora=False)
    assert model.decider is None and not model._lora_layers
    ids, mask = batch(B=2, T=8)
    out = model(ids, attention_mask=mask)
    assert out.decider_logits is None and (out.depths[mask.bool()] == 1).all()
    model.save_pretrained(tmp_path / "s")
    assert not (tmp_path / "s" / "lora").exists()
    TaHForCausalLM.from_pretrained(tmp_path / "s")


def test_prune_layer_equals_skipping_it():
    hf = tiny_qwen3(num_layers=4)
    pruned = prune_layer(hf, 1)
    assert pruned.config.num_hidden_layers == 3 and len(pruned.model.layers) == 3
    assert [l.self_attn.layer_idx for l in pruned.model.layers] == [0, 1, 2]
    assert len(hf.model.layers) == 4  # not in place by default
    ids, mask = batch(B=2, T=9)
    # Reference: run the original model's layers by hand, skipping layer 1.
    with torch.no_grad():
        h = hf.model.embed_tokens(ids)
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        pe = hf.model.rotary_emb(h, pos)
        m4 = (mask[:, None, None, :].bool() & torch.tril(torch.ones(9, 9, dtype=torch.bool)))
        for i, layer in enumerate(hf.model.layers):
            if i != 1:
                h = layer(h, attention_mask=m4, position_ids=pos, position_embeddings=pe)
        expect = hf.lm_head(hf.model.norm(h))
        got = pruned(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert (expect - got)[mask.bool()].abs().max() <= 1e-5
    with pytest.raises(IndexError):
        prune_layer(hf, 4)
    assert perplexity(pruned, ids, mask) > 1.0


def test_pruned_backbone_saves_and_wraps(tmp_path):
    pruned = prune_layer(tiny_qwen3(num_layers=4), 2)
    model = TaHForCausalLM.from_backbone(pruned)
    model.save_pretrained(tmp_path / "p")
    loaded = TaHForCausalLM.from_pretrained(tmp_path / "p")
    assert loaded.backbone.config.num_hidden_layers == 3
    assert set(backbone_state_dict(loaded.backbone)) == set(backbone_state_dict(model.backbone))


def test_save_and_load_through_s3(s3_server, tmp_path, monkeypatch):
    """Checkpoint to an S3-compatible server on 127.0.0.1, then from_pretrained from the s3:// URI;
    saved again under the same URI, the next from_pretrained loads the new weights."""
    from tah import storage

    monkeypatch.setenv("TAH_CACHE", str(tmp_path / "cache"))
    storage.s3_client().create_bucket(Bucket="ckpt")
    model, _ = make(max_depth=2)
    model.save_pretrained("s3://ckpt/runs/a")
    version = storage.resolve("s3://ckpt/runs/a")  # s3://ckpt/runs/a/.versions/<version>
    assert storage.is_published("s3://ckpt/runs/a", "tah_config.json")
    assert storage.exists(f"{version}/tah_config.json") and storage.exists(f"{version}/lora/adapter_model.safetensors")
    loaded = TaHForCausalLM.from_pretrained("s3://ckpt/runs/a")
    ids, mask = batch(B=2, T=9)
    depths = random_depths(2, 9, 2, hard_fraction=0.4, seed=3)
    with torch.no_grad():
        a = model(ids, attention_mask=mask, depths=depths).logits
        b = loaded(ids, attention_mask=mask, depths=depths).logits
    assert torch.equal(a[mask.bool()], b[mask.bool()])
    with torch.no_grad():
        for p in model.decider.parameters():
            p.add_(1.0)
    model.save_pretrained("s3://ckpt/runs/a")
    assert storage.resolve("s3://ckpt/runs/a") != version
    again = TaHForCausalLM.from_pretrained("s3://ckpt/runs/a")
    assert all(torch.equal(p, q) for p, q in zip(model.decider.parameters(), again.decider.parameters()))
    with pytest.raises(FileNotFoundError, match="not a TaH checkpoint"):
        TaHForCausalLM.from_pretrained("s3://ckpt/runs/missing")


def test_staged_dir_uploads_only_a_finished_block(s3_server, tmp_path):
    """Job outputs a person reads (tables, plots) are staged locally: uploaded when the block ends,
    nothing when it fails; a local target is written in place."""
    from tah import storage

    storage.s3_client().create_bucket(Bucket="res")
    with pytest.raises(RuntimeError), storage.staged_dir("s3://res/failed") as out:
        (out / "results.md").write_text("half")
        raise RuntimeError("the job broke")
    assert storage.list_files("s3://res/failed") == [] and not out.exists()
    with storage.staged_dir("s3://res/done") as out:
        (out / "sub").mkdir()
        (out / "sub" / "results.md").write_text("table")
    assert storage.read_bytes("s3://res/done/sub/results.md") == b"table" and not out.exists()
    with storage.staged_dir(tmp_path / "local" / "run") as out:
        (out / "results.md").write_text("table")
    assert out == tmp_path / "local" / "run" and (out / "results.md").read_text() == "table"


def test_pruning_picks_the_layer_that_contributes_nothing():
    """Train a tiny model to memorise text while layer 2 writes nothing to the residual stream; then
    removing layer 2 costs exactly 0 perplexity and removing any other layer costs some."""
    from tah.prune import layer_ppl_deltas

    model = tiny_qwen3(num_layers=4, seed=5).train()
    dead = model.model.layers[2]
    for lin in (dead.self_attn.o_proj, dead.mlp.down_proj):
        torch.nn.init.zeros_(lin.weight)
        lin.weight.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 60, (4, 24), generator=g)
    mask = torch.ones_like(ids)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(60):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    deltas = layer_ppl_deltas(model, [(ids, mask)])
    assert abs(deltas[2]) < 1e-4
    assert min(v for k, v in deltas.items() if k != 2) > 0.01
    assert min(deltas, key=deltas.get) == 2
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4  # restored


def test_perplexity_counts_only_the_loss_masked_targets():
    """perplexity(..., loss_mask) is exp of the mean cross-entropy over the targets the mask selects
    (what pruning scores: a chat's assistant tokens), written out here from the logits; an all-ones mask
    is the default; a mask that selects nothing is an error, not nan."""
    model = tiny_qwen3(num_layers=2, seed=3).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 60, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # padding at the end of row 1
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, 6:] = 1  # "the response": tokens 6.. (row 1's padding stays out)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.double(), -1)
    nll = [-float(logp[b, t - 1, ids[b, t]]) for b in range(2) for t in range(1, 12)
           if loss_mask[b, t] and mask[b, t]]
    assert len(nll) == 6 + 4
    expect = math.exp(sum(nll) / len(nll))
    assert perplexity(model, ids, mask, loss_mask) == pytest.approx(expect, rel=1e-5)
    assert perplexity(model, ids, mask, torch.ones_like(ids)) == pytest.approx(perplexity(model, ids, mask), rel=1e-6)
    assert perplexity(model, ids, mask, loss_mask) != pytest.approx(perplexity(model, ids, mask), rel=1e-3)
    with pytest.raises(ValueError, match="no token to score"):
        perplexity(model, ids, mask, torch.zeros_like(ids))


def test_a_plain_hf_directory_loads_as_the_standard_model(tmp_path):
    """A model path may be a plain HF causal LM (what tah.real_model writes): loaded at depth 1, no
    decider, and its logits are the HF model's own."""
    from tah.testing import tiny_llama

    hf = tiny_llama()
    hf.save_pretrained(tmp_path / "plain")
    model = TaHForCausalLM.from_pretrained(tmp_path / "plain")
    assert model.config.max_depth == 1 and model.decider is None
    ids, mask = batch(B=2, T=9)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        ref = hf(ids, attention_mask=mask).logits
    assert float((ours - ref)[mask.bool()].abs().max()) <= 1e-5
