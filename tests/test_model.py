"""TaH model core against independent references: HF logits, step-by-step decoding, a brute-force grid."""

from __future__ import annotations

import pytest
import torch

from tah.model import soft_embedding
from tah.testing import randomize_lora, random_depths

from .bruteforce import bruteforce_logits
from .helpers import batch, make


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_depth1_equals_hf(arch, padding):
    model, ref = make(arch, max_depth=2)
    ids, mask = batch(padding=padding)
    out = model(ids, attention_mask=mask, depths=torch.ones_like(ids))
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    hf = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    valid = mask.bool()
    assert (out.logits - hf)[valid].abs().max() <= 1e-5
    assert (out.depths[valid] == 1).all() and (out.depths[~valid] == 0).all()
    # Each row alone, unpadded, through plain HF: padding changes nothing.
    for b in range(ids.shape[0]):
        row = ids[b][valid[b]][None]
        alone = ref(input_ids=row).logits[0]
        assert (out.logits[b][valid[b]] - alone).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("max_depth,depth_attention", [(2, "duo_causal"), (3, "duo_causal"), (2, "current"),
                                                       (2, "first")])
def test_parallel_forward_equals_bruteforce_grid(arch, max_depth, depth_attention):
    model, _ = make(arch, max_depth=max_depth, depth_attention=depth_attention, soft_input_topk=50)
    ids, mask = batch(B=2, T=11, padding="left")
    depths = random_depths(2, 11, max_depth, hard_fraction=0.5, seed=1)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, depths=depths)
    for b in range(2):
        v = mask[b].bool()
        ref = bruteforce_logits(model, ids[b][v], depths[b][v], depth_attention)
        assert (out.logits[b][v] - ref).abs().max() <= 1e-4
        assert torch.equal(out.depths[b][v], depths[b][v])


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("max_depth", [2, 3])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_parallel_forward_equals_stepwise_decoding(arch, max_depth, padding):
    model, _ = make(arch, max_depth=max_depth)
    ids, mask = batch(B=3, T=13, padding=padding, seed=2)
    depths = random_depths(3, 13, max_depth, hard_fraction=0.4, seed=3)
    with torch.no_grad():
        par = model(ids, attention_mask=mask, depths=depths).logits
        cache = model.new_cache(3, chunk=4)  # tiny chunks: the cache grows several times
        steps = [model(ids[:, t:t + 1], attention_mask=mask[:, t:t + 1], depths=depths[:, t:t + 1],
                       past_key_values=cache).logits[:, 0] for t in range(13)]
    seq = torch.stack(steps, 1)
    v = mask.bool()
    assert (par - seq)[v].abs().max() <= 1e-4
    assert cache.grow_events >= 2
    assert torch.equal(cache.lengths[:, 0], mask.sum(1))
    for d in range(2, max_depth + 1):
        assert torch.equal(cache.lengths[:, d - 1], ((depths >= d) & v).sum(1))


def test_chunked_prefill_equals_parallel():
    model, _ = make(max_depth=3)
    ids, mask = batch(B=2, T=16, padding="left", seed=4)
    depths = random_depths(2, 16, 3, hard_fraction=0.4, seed=5)
    with torch.no_grad():
        par = model(ids, attention_mask=mask, depths=depths).logits
        cache = model.new_cache(2, chunk=8)
        parts = [model(ids[:, a:b], attention_mask=mask[:, a:b], depths=depths[:, a:b], past_key_values=cache).logits
                 for a, b in [(0, 7), (7, 12), (12, 16)]]
    assert (par - torch.cat(parts, 1))[mask.bool()].abs().max() <= 1e-4


def test_lora_only_changes_deeper_depths():
    model, _ = make(max_depth=2, lora=False)
    ids, mask = batch(B=2, T=10)
    depths = torch.ones_like(ids)
    depths[:, 5:] = 2
    with torch.no_grad():
        before = model(ids, attention_mask=mask, depths=depths).logits
        randomize_lora(model, scale=0.3, seed=7)
        after = model(ids, attention_mask=mask, depths=depths).logits
    shallow, deep = (depths == 1) & mask.bool(), (depths == 2) & mask.bool()
    assert (before - after)[shallow].abs().max() == 0  # positions < 5 see no depth-2 keys
    assert (before - after)[deep].abs().amax(-1).min() > 1e-4


def test_fresh_lora_is_identity():
    """peft init (B = 0): depth-2 of a fresh model is the backbone applied to the soft embedding."""
    model, _ = make(max_depth=2, lora=False)
    assert all(float(p.abs().max()) == 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_soft_embedding_matches_naive_with_grads():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 8, generator=g, requires_grad=True)
    logits = torch.randn(6, 50, generator=g, requires_grad=True)
    vals, idx = logits.topk(7)
    a = soft_embedding(vals, idx, w)
    b = (torch.softmax(vals, -1)[..., None] * w[idx]).sum(1)
    assert torch.allclose(a, b, atol=1e-6)
    ga = torch.autograd.grad(a.square().sum(), (w, logits), retain_graph=True)
    gb = torch.autograd.grad(b.square().sum(), (w, logits))
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, atol=1e-5)


def test_decider_drives_depths_consistently():
    model, _ = make(max_depth=3)
    ids, mask = batch(B=2, T=12)
    with torch.no_grad():
        probs = torch.sigmoid(model(ids, attention_mask=mask, depths=torch.full_like(ids, 3)).decider_logits)
        thr = float(probs[..., 0][mask.bool()].median())
        free = model(ids, attention_mask=mask, threshold=thr)
        forced = model(ids, attention_mask=mask, depths=free.depths.clamp_min(1))
    v = mask.bool()
    assert (free.depths[v] >= 2).any() and (free.depths[v] == 1).any()
    # Tokens that continued past depth 1 are exactly those whose depth-1 decider prob > threshold.
    assert torch.equal((free.depths >= 2)[v], (probs[..., 0] > thr)[v])
    assert (free.logits - forced.logits)[v].abs().max() <= 1e-5
    assert torch.equal(model(ids, attention_mask=mask, threshold=1.0).depths[v], torch.ones_like(ids)[v])
    assert (model(ids, attention_mask=mask, threshold=0.0).depths[v] == 3).all()


@pytest.mark.parametrize("max_depth", [1, 2, 3])
def test_logits_at_equals_the_full_forward(max_depth):
    """Serving prefill asks for one position per row; the deepest depth's head then runs on those tokens
    only. Whatever depth each asked-for token reached, its logits are the full forward's."""
    model, _ = make(max_depth=max_depth)
    ids, mask = batch(B=4, T=12, padding="right", seed=3)
    at = mask.sum(1) - 1  # each row's last real token (right padding: they differ)
    at[0] = 5  # and one from the middle
    with torch.no_grad():
        if max_depth > 1:
            probs = torch.sigmoid(model(ids, attention_mask=mask, depths=torch.full_like(ids, max_depth)).decider_logits)
            thr = float(probs[..., 0][mask.bool()].median())
        else:
            thr = 0.5
        for depths in (None, torch.full_like(ids, max_depth), torch.randint(1, max_depth + 1, ids.shape,
                                                                            generator=torch.Generator().manual_seed(4))):
            full = model(ids, attention_mask=mask, depths=depths, threshold=thr)
            last = model(ids, attention_mask=mask, depths=depths, threshold=thr, logits_at=at)
            rows = torch.arange(4)
            reached = full.depths[rows, at]
            if depths is None and max_depth > 1:  # the decider sent some asked-for tokens deeper, not all
                assert (reached >= 2).any() and (reached == 1).any(), reached
            assert torch.equal(last.depths, full.depths)
            assert (last.logits - full.logits[rows, at]).abs().max() <= 1e-6


def test_bad_depths_raise():
    model, _ = make(max_depth=2)
    ids, mask = batch(B=1, T=5)
    with pytest.raises(ValueError, match="1..2"):
        model(ids, attention_mask=mask, depths=torch.full_like(ids, 3))
    with pytest.raises(ValueError, match="shape"):
        model(ids, depths=torch.ones(1, 4, dtype=torch.long))


def test_loss_is_normalised_once_over_targets():
    model, _ = make(max_depth=2)
    ids, mask = batch(B=2, T=9, padding="left")
    labels = ids.clone()
    labels[:, :3] = -100
    out = model(ids, attention_mask=mask, depths=random_depths(2, 9, 2, seed=2), labels=labels)
    lab = labels.masked_fill(mask == 0, -100)[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
    keep = lab != -100
    manual = -logp[keep].gather(1, lab[keep][:, None]).mean()
    assert torch.allclose(out.loss, manual, atol=1e-6)


@pytest.mark.parametrize("max_depth", [1, 2, 3])
def test_depthwise_loss_equals_loss_on_assembled_logits(max_depth):
    ids, mask = batch(B=3, T=12, padding="left", seed=12)
    depths = random_depths(3, 12, max_depth, hard_fraction=0.4, seed=13)
    labels = ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.2, -100)
    res = []
    for return_logits in (True, False):
        model, _ = make(max_depth=max_depth, lora=max_depth > 1)
        out = model(ids, attention_mask=mask, depths=depths, labels=labels, return_logits=return_logits)
        assert (out.logits is None) == (not return_logits)
        out.loss.backward()
        res.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert torch.allclose(res[0][0], res[1][0], atol=1e-6)
    assert set(res[0][1]) == set(res[1][1])
    for n in res[0][1]:
        assert torch.allclose(res[0][1][n], res[1][1][n], atol=1e-6), n


@pytest.mark.parametrize("max_depth,backend", [(2, "sdpa"), (3, "sdpa"), (2, "reference")])
def test_packed_samples_equal_unpacked(max_depth, backend):
    """Three samples packed in one row (plus padding) give each sample's own logits, loss and gradients."""
    g = torch.Generator().manual_seed(21)
    lens = [5, 7, 4]
    samples = [torch.randint(3, 300, (n,), generator=g) for n in lens]
    depths = [random_depths(1, n, max_depth, 0.4, seed=30 + i)[0] for i, n in enumerate(lens)]
    T = sum(lens) + 2
    ids = torch.zeros(1, T, dtype=torch.long)
    dep = torch.ones(1, T, dtype=torch.long)
    seg = torch.full((1, T), 99, dtype=torch.long)
    mask = torch.zeros(1, T, dtype=torch.long)
    a = 0
    for i, (s, d) in enumerate(zip(samples, depths)):
        ids[0, a:a + len(s)], dep[0, a:a + len(s)], seg[0, a:a + len(s)], mask[0, a:a + len(s)] = s, d, i, 1
        a += len(s)
    model, _ = make(max_depth=max_depth, attn_backend=backend)
    packed = model(ids, attention_mask=mask, depths=dep, segment_ids=seg, labels=ids, return_logits=True)
    packed_paths = dict(model.attention_paths)
    packed.loss.backward()
    g_packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    a, total, n_tgt = 0, 0.0, 0
    for s, d in zip(samples, depths):
        alone = model(s[None], depths=d[None], labels=s[None])
        assert (packed.logits[0, a:a + len(s)] - alone.logits[0]).abs().max() <= 1e-5
        total = total + alone.loss * (len(s) - 1)
        n_tgt += len(s) - 1
        a += len(s)
    mean = total / n_tgt
    assert torch.allclose(packed.loss, mean, atol=1e-6)
    mean.backward()
    for n, gp in g_packed.items():
        p = dict(model.named_parameters())[n]
        assert torch.allclose(gp, p.grad, atol=1e-5, rtol=1e-4), n
    assert "sdpa:is_causal" not in packed_paths  # packed rows never take the plain-causal path


def test_state_dict_holds_each_tensor_once():
    model, _ = make(max_depth=2)
    keys = list(model.state_dict())
    assert not any(k.startswith("_peft") for k in keys)
    assert len(keys) == len(set(keys))
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(r["total"] for c, r in model.parameter_report().items() if c != "all")
