"""Reference generate() against HF generate and against the parallel forward; sampling filters; configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tah.config import TaHConfig, load_config
from tah.sampling import filter_logits, sample
from tah.testing import random_depths

from .helpers import batch, make


def test_greedy_depth1_equals_hf_generate():
    model, ref = make(max_depth=1, lora=False)
    ids, mask = batch(B=1, T=6)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=12)
    hf = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                      pad_token_id=0, min_new_tokens=12)
    assert torch.equal(got.sequences, hf)


@pytest.mark.parametrize("max_depth", [2, 3])
def test_generate_forced_depths_matches_parallel_forward(max_depth):
    """Every generated token is the argmax of the parallel forward over the final sequence."""
    model, _ = make(max_depth=max_depth)
    ids, mask = batch(B=3, T=7, padding="left", seed=5)
    n = 9
    forced = random_depths(3, n, max_depth, hard_fraction=0.5, seed=6)
    prompt_d = random_depths(3, 7, max_depth, hard_fraction=0.5, seed=7)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, forced_depths=forced, prompt_depths=prompt_d)
    seq = out.sequences
    full_mask = torch.cat([mask, torch.ones(3, n, dtype=torch.long)], 1)
    depths = torch.cat([prompt_d, forced], 1)
    with torch.no_grad():
        par = model(seq, attention_mask=full_mask, depths=depths).logits
    pred = par[:, 6:-1].argmax(-1)  # logits at the last prompt token .. second-to-last generated
    assert torch.equal(pred, seq[:, 7:])
    assert torch.equal(out.depths[:, :n - 1], forced[:, :n - 1])
    for s, step in enumerate(out.step_logits):
        assert (step - par[:, 6 + s]).abs().max() <= 1e-4


def test_batched_generation_equals_one_row_at_a_time():
    model, _ = make(max_depth=2)
    ids, mask = batch(B=3, T=8, padding="left", seed=9)
    with torch.no_grad():  # a threshold inside the random decider's range, so both depths occur
        probs = torch.sigmoid(model(ids, attention_mask=mask, depths=torch.full_like(ids, 2)).decider_logits)
    thr = float(probs[mask.bool()].median())
    both = model.generate(ids, attention_mask=mask, max_new_tokens=8, threshold=thr)
    for b in range(3):
        row = ids[b][mask[b].bool()][None]
        alone = model.generate(row, max_new_tokens=8, threshold=thr)
        assert torch.equal(alone.sequences[0, row.shape[1]:], both.sequences[b, 8:])
        assert torch.equal(alone.depths[0], both.depths[b])
    assert both.tokens_per_depth().get(2, 0) > 0  # the decider sent some tokens to depth 2


def test_eos_stops_rows_and_seeded_sampling_is_reproducible():
    model, _ = make(max_depth=2)
    ids, mask = batch(B=2, T=5)
    first = model.generate(ids, attention_mask=mask, max_new_tokens=1).sequences[:, -1]
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=int(first[0]), pad_token_id=0)
    assert (out.sequences[0, 6:] == 0).all() and (out.depths[0] == 0).all()
    a = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, temperature=1.0, seed=3)
    b = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, temperature=1.0, seed=3)
    assert torch.equal(a.sequences, b.sequences)


def test_filters_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    keep = lambda **kw: torch.isfinite(filter_logits(logits, **kw))[0].tolist()  # noqa: E731
    assert keep(top_k=2) == [True, True, False, False, False]
    assert keep(top_p=0.7) == [True, True, False, False, False]  # 0.5 + 0.2 reaches 0.7
    assert keep(top_p=0.71) == [True, True, True, False, False]
    assert keep(min_p=0.25) == [True, True, True, False, False]  # >= 0.125
    assert keep(top_p=0.0) == [True, False, False, False, False]
    assert keep() == [True] * 5
    assert sample(logits, temperature=0.0).item() == 0
    g = [torch.Generator().manual_seed(0)]
    draws = {sample(logits, temperature=1.0, top_k=2, generators=g).item() for _ in range(50)}
    assert draws == {0, 1}


def test_config_yaml_overrides_and_errors(tmp_path: Path):
    p = tmp_path / "r.yaml"
    p.write_text("max_depth: 3\nlora:\n  r: 8\ndecider:\n  layers: [0, 2]\n")
    cfg = load_config(TaHConfig, p, ["lora.alpha=4", "threshold=0.5", "decider.width=16"])
    assert (cfg.max_depth, cfg.lora.r, cfg.lora.alpha, cfg.threshold) == (3, 8, 4, 0.5)
    assert cfg.decider.layers == [0, 2] and cfg.decider.width == 16
    assert load_config(TaHConfig, None, []) == TaHConfig()
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(TaHConfig, None, ["lora.rank=4"])
    with pytest.raises(ValueError, match="expected an integer"):
        load_config(TaHConfig, None, ["max_depth=two"])
    with pytest.raises(ValueError, match="max_depth must be"):
        load_config(TaHConfig, None, ["max_depth=0"])
    with pytest.raises(ValueError, match="attn_backend"):
        load_config(TaHConfig, None, ["attn_backend=magic"])
    with pytest.raises(ValueError, match="key.sub=value"):
        load_config(TaHConfig, None, ["threshold"])
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(TaHConfig, p)
    back = TaHConfig.load_json(tmp_path / "x.json") if cfg.save_json(tmp_path / "x.json") is None else None
    assert back == cfg


@pytest.mark.parametrize("top_k", [0, 5, 40])
def test_sampling_candidates_are_the_filtered_distribution(top_k):
    """The fast sampler's candidate distribution equals softmax(filter_logits) over the full vocabulary,
    and its draws follow it."""
    from tah.sampling import candidates

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 200, generator=g) * 3
    kw = dict(temperature=torch.tensor([0.6, 1.0, 1.3, 0.8]), top_k=top_k, top_p=torch.tensor([0.95, 1.0, 0.7, 0.9]),
              min_p=torch.tensor([0.0, 0.05, 0.0, 0.1]))
    probs, ids = candidates(logits, **kw)
    full = torch.zeros_like(logits).scatter_add(1, ids, probs)
    ref = torch.softmax(filter_logits(logits, **kw), dim=-1)
    assert torch.allclose(full, ref, atol=1e-6)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    draws = torch.stack([sample(logits, **kw, generators=gens) for _ in range(4000)])  # (N, 4)
    for b in range(4):
        freq = torch.bincount(draws[:, b], minlength=200).float() / len(draws)
        assert (freq - ref[b]).abs().max() < 0.03
        assert bool((ref[b][draws[:, b]] > 0).all())  # never a filtered-out token


def _rows_of(*specs):
    """Engine-shaped rows for sample_rows: (temperature, top_k, seed) each."""
    from types import SimpleNamespace

    from tah.sampling import SamplingParams

    return [SimpleNamespace(params=SamplingParams(temperature=t, top_k=k, top_p=1.0),
                            generator=torch.Generator().manual_seed(s)) for t, k, s in specs]


def test_a_seeded_row_draws_the_same_token_whatever_its_neighbours_top_k():
    """Ties (bf16 logits tie often) are ordered by token id in every path (topk of the batch's largest k,
    or the full sort when a row has no top-k): before, the tied candidates' order followed the path the
    neighbours chose, and the same seed picked another token (~7 % of draws here)."""
    from tah.engine.outputs import sample_rows

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(300, 2000, generator=g) * 2).to(torch.bfloat16)
    for s in range(300):
        lg = logits[s:s + 1].expand(2, -1)
        alone = sample_rows(lg[:1], _rows_of((1.0, 20, s)))[0]
        for k in (0, 50, 7):
            assert sample_rows(lg, _rows_of((1.0, 20, s), (1.0, k, 99)))[0] == alone, (s, k)


def test_a_broken_or_tiny_temperature_row_never_moves_a_seeded_neighbour():
    """A temperature below SAMPLING_EPS is greedy (1e-40 used to overflow to NaN and fail); a row whose
    logits break sampling after every row drew fails alone, and the others' generators are rewound
    before the row-by-row retry, so they draw what they would have drawn alone."""
    from tah.engine.outputs import sample_rows

    g = torch.Generator().manual_seed(1)
    lg = torch.randn(2, 64, generator=g)
    alone = sample_rows(lg[1:], _rows_of((1.0, 0, 7)))[0]
    got = sample_rows(lg, _rows_of((1e-40, 0, 1), (1.0, 0, 7)))
    assert got == [int(lg[0].argmax()), alone]
    bad = lg.clone()
    bad[0] = float("nan")
    got = sample_rows(bad, _rows_of((1.0, 0, 1), (1.0, 0, 7)))
    assert isinstance(got[0], BaseException) and got[1] == alone
