"""Training library: the decider loss by hand, batching/packing invariants, and short stage-1/2 runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tah import TaHConfig, TaHForCausalLM
from tah.config import DeciderSettings, LoraSettings
from tah.tokenizer import tokenize_chat
from tah.tokenizer import load_tokenizer
from tah.oracle import labelled_positions
from tah.testing import tiny_qwen3
from tah.oracle import row_depths, row_labels
from tah.train.batching import collate, length_buckets, pack
from tah.train.losses import decider_loss, pos_weight_from_depths
from tah.assets import shipped_task, shipped_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_decider_loss_by_hand():
    logits = torch.tensor([[[0.5, -1.0], [2.0, 0.3], [-0.2, 0.1], [1.0, 1.0]]])  # (1, 4, 2): max depth 3
    depths = torch.tensor([[1, 2, 3, 3]])
    positions = torch.tensor([[True, True, True, False]])
    loss, st = decider_loss(logits, depths, positions, pos_weight=3.0)
    # targets: t0 d1 -> 0 (d2 never reached); t1 d1 -> 1, d2 -> 0; t2 d1 -> 1, d2 -> 1; t3 not trained
    x = torch.tensor([0.5, 2.0, 0.3, -0.2, 0.1])
    y = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0])
    manual = -(3.0 * y * F.logsigmoid(x) + (1 - y) * F.logsigmoid(-x)).mean()
    assert torch.allclose(loss, manual, atol=1e-6)
    assert st["targets"] == 5
    assert pos_weight_from_depths(depths, positions, 3) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no continue"):
        pos_weight_from_depths(torch.ones(1, 4, dtype=torch.long), positions, 2)


def test_length_buckets_and_packing_cover_every_sample_once():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 120, (300,), generator=g).tolist()
    batches = length_buckets(lengths, max_batch_tokens=512, seed=1, window=64)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(300))
    assert all(len(b) * max(lengths[i] for i in b) <= 512 for b in batches)
    assert batches == length_buckets(lengths, 512, seed=1, window=64) != length_buckets(lengths, 512, seed=2, window=64)
    rows = pack(lengths, 256)
    assert sorted(i for r in rows for i in r) == list(range(300))
    assert all(sum(lengths[i] for i in r) <= 256 for r in rows)
    padded = len(lengths) * max(lengths)
    assert sum(lengths) / (len(rows) * 256) > 0.9 > sum(lengths) / padded  # packing wastes far less
    with pytest.raises(ValueError):
        pack([300], 256)


def _rows(n: int = 12, seed: int = 0):
    """Label-shaped rows from the shipped task, with synthetic reference statistics."""
    tok = load_tokenizer(shipped_tokenizer())
    lines = (Path(shipped_task()) / "math/train-00000-of-00001.jsonl").read_text().splitlines()[:n]
    g = torch.Generator().manual_seed(seed)
    rows = []
    for line in lines:
        ids, mask = tokenize_chat(tok, json.loads(line)["messages"])
        T = len(ids)
        rows.append({"input_ids": ids, "assistant_mask": mask, "ref_mismatch": (torch.rand(T, generator=g) < 0.2).int().tolist(),
                     "ref_ce": torch.rand(T, generator=g).tolist(), "ref_entropy": torch.rand(T, generator=g).tolist()})
    return tok, rows


def test_methods_and_collate():
    _, rows = _rows(3)
    r = rows[0]
    am = torch.tensor(r["assistant_mask"]).bool()
    assert (row_depths(r, "standard", 2) == 1).all()
    assert (row_depths(r, "always_think", 2) == 2).all() and (row_depths(r, "always_think", 3) == 3).all()
    tah = row_depths(r, "tah", 2)
    lab = labelled_positions(torch.tensor(r["assistant_mask"]))
    assert torch.equal(tah == 2, torch.tensor(r["ref_mismatch"]).bool() & lab)
    assert (row_labels(r)[~am] == -100).all()
    b = collate(rows, "tah", 2)
    assert b["input_ids"].shape == b["depths"].shape == (3, max(len(x["input_ids"]) for x in rows))
    p = collate(rows, "tah", 2, packed_rows=[[0, 1], [2]])
    assert p["input_ids"].shape[0] == 2 and set(p["segment_ids"][0].unique().tolist()) == {0, 1}
    assert int(p["attention_mask"].sum()) == int(b["attention_mask"].sum())


def _model(vocab: int) -> TaHForCausalLM:
    cfg = TaHConfig(max_depth=2, lora=LoraSettings(r=4, alpha=8, dropout=0.0),
                    decider=DeciderSettings(width=32, blocks=1, dropout=0.0))
    return TaHForCausalLM.from_backbone(tiny_qwen3(vocab_size=vocab, initializer_range=0.05), cfg)


def test_stage1_then_stage2_train_what_they_should():
    tok, rows = _rows(8)
    model = _model(len(tok)).train()
    batch = collate(rows, "tah", 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    model.set_trainable("stage1")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"], depths=batch["depths"],
                    labels=batch["labels"], return_decider_logits=False, return_logits=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.2)
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any("lora_" in n for n in changed) and any("lora_" not in n and not n.startswith("decider") for n in changed)
    assert not any(n.startswith("decider") for n in changed)

    mid = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.set_trainable("stage2")
    pw = pos_weight_from_depths(batch["depths"], batch["positions"], 2)
    opt = torch.optim.AdamW(model.decider.parameters(), lr=3e-3)
    dl = []
    for _ in range(8):
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"], depths=batch["depths"],
                    return_logits=False)
        loss, _ = decider_loss(out.decider_logits, batch["depths"], batch["positions"], pw)
        loss.backward()
        opt.step()
        opt.zero_grad()
        dl.append(loss.item())
    assert dl[-1] < dl[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, mid[n])}
    assert changed and all(n.startswith("decider") for n in changed)


def test_always_think_trains_at_the_depths_it_is_served():
    """AlwaysThink's training forward (collate's depths for the method) gives each answer token the
    log-probability the engine's always_think policy gave it while generating it (prefill + cached
    decode, an independent path). With the prompt left at depth 1 in training, the deeper pass of the
    answer never saw the question (within-depth causal attention) and the two disagreed."""
    from tah.engine import Engine, EngineConfig, SamplingParams

    from .helpers import make

    model, _ = make(max_depth=2, depth_attention="current")
    eng = Engine(model, EngineConfig(max_num_seqs=2, max_model_len=64, depth_policy="always_think"))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (9, 14)]
    outs = eng.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, logprobs=0))
    rows = [{"input_ids": p + o.token_ids, "assistant_mask": [0] * len(p) + [1] * len(o.token_ids)}
            for p, o in zip(prompts, outs)]
    b = collate(rows, "always_think", 2)
    with torch.no_grad():
        logits = model(b["input_ids"], attention_mask=b["attention_mask"], depths=b["depths"]).logits
    logp = torch.log_softmax(logits.float(), -1)
    for i, (p, o) in enumerate(zip(prompts, outs)):
        assert set(o.depths) == {2}
        pos = torch.arange(len(p) - 1, len(p) - 1 + len(o.token_ids))  # position t predicts token t + 1
        train = logp[i, pos, torch.tensor(o.token_ids)]
        assert torch.allclose(train, torch.tensor(o.logprobs), atol=1e-5), (train, o.logprobs)
