"""TaH2 as a configuration of TaHForCausalLM (TaHConfig.tah2): the parallel forward with forced depths,
token-by-token decoding with per-depth caches and a brute-force (position, depth) grid written here
from the spec's formulas (updater input, decider, mixture weights R_d / w_d, log-space mixture,
visibility rule) all agree; decider-driven == forced with the decider's depths; checkpoints round-trip."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tah import TaHConfig, TaHForCausalLM
from tah.testing import random_depths

from . import helpers
from .bruteforce import grid_forward
from .helpers import batch

TOL = 1e-5


def assert_logp_close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    """Log-probabilities agree to `tol` relative to their size (|log p| reaches ~10 here, where one fp32
    ulp is ~1e-6; single-token vs batched matmuls alone differ by a few ulps), and the probabilities
    to `tol` absolute."""
    a, b = a.double(), b.double()
    assert float(((a - b).abs() / b.abs().clamp_min(1)).max()) <= tol
    assert float((a.exp() - b.exp()).abs().max()) <= tol


def make_tah2(max_depth: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32, **fields) -> TaHForCausalLM:
    model = helpers.make_tah2(max_depth, seed, dtype, **fields)
    return model.eval()


# ------------------------------------------------------------------ the spec's formulas, written out
def _rms(x, w, eps=1e-6):
    return w * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _swiglu(mlp, x):
    a = x @ mlp.gate_proj.weight.T
    return (a * torch.sigmoid(a) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T


def _updater(u, e, h):
    """x = norm_out(MLP(norm_pre_mlp(W_p [norm_prev(e); norm_last(h)])))"""
    x = torch.cat([_rms(e, u.norm_prev.weight), _rms(h, u.norm_last.weight)], -1) @ u.projection.weight.T
    return _rms(_swiglu(u.mlp, _rms(x, u.norm_pre_mlp.weight)), u.norm_out.weight)


def _decider(dm, e, h, z):
    """f = norm_first(e), h = norm_last(h), l = norm_l(top-k softmax(z), zero-padded); logit = score(...)"""
    k = dm.topk
    p = torch.softmax(z, -1).sort(descending=True).values[:k]
    p = torch.cat([p, p.new_zeros(k - p.numel())])
    x = torch.cat([_rms(e, dm.norm_first.weight), _rms(h, dm.norm_last.weight), _rms(p, dm.norm_l.weight)])
    x = _rms(_swiglu(dm.mlp, x @ dm.input_proj.weight.T), dm.norm_out.weight)
    return float(x @ dm.score.weight[0])


@torch.no_grad()
def bruteforce_tah2(model, ids: torch.Tensor, depths: torch.Tensor):
    """One unpadded row: ids (T,), forced depths (T,) -> (mixture log-probs (T, V), decider logits (T, M-1)).

    Depth d is recomputed from scratch over the explicit grid of nodes (i, k), k <= d, with the
    visibility rule of the config: duo_causal k <= d'; first_self (TaH2 causal) k == 1 or (j == i and k <= d')."""
    cfg = model.config
    M, T = cfg.max_depth, ids.shape[0]
    emb = model.backbone.get_input_embeddings().weight
    hid, own, dec = {}, {}, {}  # (i, d) -> last hidden after the final norm / own logits / decider logit
    for d in range(1, int(depths.max()) + 1):
        nodes = [(i, k) for k in range(1, d + 1) for i in range(T) if depths[i] >= k]
        pos = torch.tensor([i for i, _ in nodes])
        nd = torch.tensor([k for _, k in nodes])
        x = torch.stack([emb[ids[i]] if k == 1 else _updater(model.updater, emb[ids[i]], hid[(i, k - 1)])
                         for i, k in nodes])
        qi, qd, kj, kd = pos[:, None], nd[:, None], pos[None, :], nd[None, :]
        if cfg.depth_attention == "duo_causal":
            mask = (kj <= qi) & (kd <= qd)
        else:
            assert cfg.depth_attention == "first_self"
            mask = (kj <= qi) & ((kd == 1) | ((kj == qi) & (kd <= qd)))
        out = grid_forward(model, x, pos, nd, mask)
        for a, (i, k) in enumerate(nodes):
            if k == d:
                hid[(i, d)] = out[a]
                own[(i, d)] = model.backbone.lm_head(out[a])
                if d < M:
                    dec[(i, d)] = _decider(model.decider, emb[ids[i]], out[a], own[(i, d)])
    logp = []
    for i in range(T):
        n = int(depths[i])
        terms, R = [], 1.0
        for d in range(1, n + 1):
            if cfg.combine == "even_mix":
                w = 1.0 / n
            else:
                c = 1 / (1 + math.exp(-dec[(i, d)])) if d < M else None
                w = R * (1 - c) if d < n else R  # continues past d, or stops at d (also at the cap M)
                R = R * c if d < n else R
            terms.append(math.log(w) + torch.log_softmax(own[(i, d)], -1))
        logp.append(torch.logsumexp(torch.stack(terms), 0))
    dl = torch.zeros(T, M - 1, dtype=torch.float64)
    for (i, d), v in dec.items():
        dl[i, d - 1] = v
    return torch.stack(logp), dl


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("max_depth,depth_attention,combine", [
    (2, "duo_causal", "stop_prob_mix"), (4, "duo_causal", "stop_prob_mix"),
    (2, "first_self", "stop_prob_mix"), (4, "first_self", "even_mix"), (3, "duo_causal", "even_mix")])
def test_parallel_equals_bruteforce_and_stepwise(max_depth, depth_attention, combine, dtype):
    """Against the brute force evaluated in fp64. fp32 model: <= 1e-5 (see assert_logp_close); fp64
    model: <= 1e-9 absolute, so no mistake hides in fp32 noise."""
    tol = TOL if dtype == torch.float32 else 1e-9
    model = make_tah2(max_depth, dtype=dtype, depth_attention=depth_attention, combine=combine)
    ids, mask = batch(B=3, T=11, padding="left", seed=3)
    depths = random_depths(3, 11, max_depth, hard_fraction=0.6, seed=4)
    v = mask.bool()
    with torch.no_grad():
        par = model(ids, attention_mask=mask, depths=depths)
        cache = model.new_cache(3, chunk=4)
        steps = [model(ids[:, t:t + 1], attention_mask=mask[:, t:t + 1], depths=depths[:, t:t + 1],
                       past_key_values=cache) for t in range(11)]
    seq = torch.cat([s.logits for s in steps], 1)
    seq_dec = torch.cat([s.decider_logits for s in steps], 1)
    assert par.logits.dtype == torch.float32 or dtype == torch.float64
    if dtype == torch.float64:
        assert float((par.logits - seq)[v].abs().max()) <= tol
    assert_logp_close(seq[v], par.logits[v], tol)
    exact = copy.deepcopy(model).double()  # the brute force runs in fp64: the exact values
    for b in range(3):
        ref, ref_dec = bruteforce_tah2(exact, ids[b][v[b]], depths[b][v[b]])
        assert_logp_close(par.logits[b][v[b]], ref, tol)
        assert_logp_close(seq[b][v[b]], ref, tol)
        if dtype == torch.float64:
            assert float((par.logits[b][v[b]] - ref).abs().max()) <= tol
        assert torch.equal(par.depths[b][v[b]], depths[b][v[b]])
        ran = torch.arange(1, max_depth)[None, :] <= depths[b][v[b]][:, None]  # decider ran after d
        # Decider logits (|z| up to ~10, a 64-term dot product after four RMSNorms) carry ~1e-5 of fp32
        # noise on their own (fp32 vs fp64 of one model: 8e-6), hence 5e-5 for them in fp32.
        dec_tol = 5e-5 if dtype == torch.float32 else tol
        for got in (par.decider_logits[b][v[b]], seq_dec[b][v[b]]):
            assert float(((got - ref_dec).abs() / ref_dec.abs().clamp_min(1))[ran].max()) <= dec_tol
    # log-probs: each real position is a distribution; padding is zeros
    assert (par.logits[v].exp().sum(-1) - 1).abs().max() <= 1e-5
    assert (par.logits[~v] == 0).all()
    for d in range(2, max_depth + 1):
        assert torch.equal(cache.lengths[:, d - 1], ((depths >= d) & v).sum(1))


@pytest.mark.parametrize("max_depth", [2, 4])
def test_decider_driven_equals_forced(max_depth):
    model = make_tah2(max_depth)
    ids, mask = batch(B=3, T=12, padding="left", seed=5)
    v = mask.bool()
    with torch.no_grad():
        full = model(ids, attention_mask=mask, depths=torch.full_like(ids, max_depth))
        probs = torch.sigmoid(full.decider_logits[..., 0])[v].sort().values
        mid = probs.numel() // 2
        thr = float(probs[mid - 1] + probs[mid]) / 2  # between two tokens' probabilities: no ties
        free = model(ids, attention_mask=mask, threshold=thr)
        forced = model(ids, attention_mask=mask, depths=free.depths.clamp_min(1))
    assert (free.depths[v] == 1).any() and (free.depths[v] >= 2).any()
    if max_depth == 4:
        assert (free.depths[v] >= 3).any()
    assert (free.logits - forced.logits)[v].abs().max() <= TOL
    assert (free.decider_logits - forced.decider_logits).abs().max() <= TOL
    # the decider runs after every depth < M; a token goes deeper while it says continue
    p = torch.sigmoid(free.decider_logits)
    for d in range(1, max_depth):
        ran = v & (free.depths >= d) & ((p[..., d - 1] - thr).abs() > 1e-6)  # (ties: an ulp of sigmoid)
        assert torch.equal((free.depths > d)[ran], (p[..., d - 1] > thr)[ran])


def test_loss_is_mixture_nll_and_gradients_reach_updater_and_decider():
    model = make_tah2(3)
    ids, mask = batch(B=3, T=10, padding="left", seed=6)
    depths = random_depths(3, 10, 3, hard_fraction=0.6, seed=7)
    labels = ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.2, -100)
    out = model(ids, attention_mask=mask, depths=depths, labels=labels)
    lean = model(ids, attention_mask=mask, depths=depths, labels=labels, return_logits=False)
    assert lean.logits is None
    lab = labels.masked_fill(mask == 0, -100)[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    keep = lab != -100
    manual = -out.logits[:, :-1][keep].gather(1, lab[keep][:, None]).mean()
    assert torch.allclose(out.loss, manual, atol=1e-6)
    assert torch.allclose(out.loss, lean.loss, atol=1e-6)
    lean.loss.backward()
    for mod in (model.updater, model.decider, model.backbone):
        assert all(p.grad is not None for p in mod.parameters() if p.requires_grad)
    assert float(model.decider.score.weight.grad.abs().max()) > 0  # through the mixture weights
    assert float(model.updater.projection.weight.grad.abs().max()) > 0


def test_tah2_config_has_no_lora_and_its_own_components():
    model = make_tah2(2)
    c = model.config
    assert (c.input_rule, c.combine, c.decider_kind, c.depth_lora, c.threshold) == (
        "updater", "stop_prob_mix", "tah2", False, 0.5)
    assert model._peft is None and not any("lora" in n for n, _ in model.named_parameters())
    assert set(model.components()) == {"backbone", "lora", "decider", "updater"}
    assert model.parameter_report()["lora"]["total"] == 0
    sd = set(model.updater.state_dict())
    assert sd == {"projection.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                  "norm_prev.weight", "norm_last.weight", "norm_pre_mlp.weight", "norm_out.weight"}
    assert set(model.decider.state_dict()) == {
        "norm_first.weight", "norm_last.weight", "norm_l.weight", "norm_out.weight", "input_proj.weight",
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "score.weight"}
    H = 64
    assert model.updater.projection.weight.shape == (H, 2 * H)
    assert model.decider.input_proj.weight.shape == (H, 3 * H)
    sized = make_tah2(2, tah2_decider={"intermediate_size": 32, "topk": 100}, updater={"intermediate_size": 48})
    assert sized.decider.input_proj.weight.shape == (H, 2 * H + 100)
    assert sized.decider.mlp.gate_proj.weight.shape == (32, H)
    assert sized.updater.mlp.up_proj.weight.shape == (48, H)
    with pytest.raises(ValueError, match="combine"):
        TaHConfig(combine="sum")
    with pytest.raises(ValueError, match="depth_attention"):
        TaHConfig.tah2(depth_attention="causal")


def test_decider_pads_topk_when_vocab_is_small():
    from tah.decider import Tah2Decider

    torch.manual_seed(0)
    dm = Tah2Decider(8, 16, topk=12)
    e, h, z = torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 5)  # 5 < topk = 12
    got = dm(e, h, z)
    for n in range(3):
        assert abs(float(got[n]) - _decider(dm, e[n], h[n], z[n])) <= 1e-6


@pytest.mark.parametrize("n,v,k", [(18, 8192, 256), (4, 32768, 1024), (2, 151936, 2048), (1, 8192, 256),
                                   (40, 4096, 64)])
def test_decider_topk_values_are_torch_topk(n, v, k):
    """TaH2's decider takes its sorted top-k probabilities (k = hidden, e.g. 256 of 8192) from the grouped
    top-k (tah.decider.topk_logits) at TaH2's shapes: values equal torch.topk's on peaked, flat and tied
    rows, rows of -inf, and NaN (which torch.topk ranks first)."""
    from tah.decider import topk_logits

    g = torch.Generator().manual_seed(n + v)
    cases = [torch.softmax(torch.randn(n, v, generator=g) * s, -1) for s in (0.05, 2.0, 30.0)]
    cases.append(torch.randint(0, 4, (n, v), generator=g).float())  # heavy ties at the boundary
    odd = torch.randn(n, v, generator=g)
    odd[0, 7] = float("nan")
    odd[-1, :] = float("-inf")
    odd[-1, v // 3] = 1.0  # a row with one finite value: its top k is mostly -inf
    cases.append(odd)
    for x in cases:
        got, want = topk_logits(x, k).values, x.topk(k, dim=-1).values
        assert got.shape == want.shape
        assert torch.equal(got.nan_to_num(9.0), want.nan_to_num(9.0))


def test_single_depth_and_logits_at():
    model = make_tah2(2)
    ids, mask = batch(B=3, T=9, padding="left", seed=8)
    v = mask.bool()
    with torch.no_grad():
        ones = model(ids, attention_mask=mask, depths=torch.ones_like(ids))
        hf = torch.log_softmax(model.backbone(input_ids=ids, attention_mask=mask,
                                              position_ids=(mask.cumsum(1) - 1).clamp_min(0)).logits, -1)
        depths = random_depths(3, 9, 2, hard_fraction=0.5, seed=9)
        full = model(ids, attention_mask=mask, depths=depths).logits
        last = model(ids, attention_mask=mask, depths=depths, logits_at=torch.full((3,), 8)).logits
    assert (ones.logits - hf)[v].abs().max() <= TOL  # a stopped token at depth 1 gives p1
    assert torch.equal(last, full[:, 8])


def test_generate_matches_parallel_forward():
    model = make_tah2(2)
    ids, mask = batch(B=2, T=6, padding="left", seed=10)
    forced = torch.tensor([[2, 1, 2, 1, 1], [1, 2, 2, 1, 2]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, forced_depths=forced,
                             prompt_depths=torch.where(mask.bool(), 2, 1))
        seq = out.sequences
        full_mask = torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], 1)
        depths = torch.cat([torch.where(mask.bool(), 2, 1), forced, torch.ones(2, 1, dtype=torch.long)], 1)
        par = model(seq, attention_mask=full_mask, depths=depths).logits
    for s, lg in enumerate(out.step_logits):
        assert (lg - par[:, 5 + s]).abs().max() <= TOL
        assert torch.equal(seq[:, 6 + s], lg.argmax(-1))


def test_save_and_load_round_trip(tmp_path):
    model = make_tah2(3, depth_attention="first_self")
    model.save_pretrained(tmp_path / "ck")
    names = {p.name for p in (tmp_path / "ck").iterdir()}
    assert {"updater.safetensors", "decider.safetensors", "model.safetensors", "tah_config.json"} <= names
    assert "lora" not in names
    loaded = TaHForCausalLM.from_pretrained(tmp_path / "ck").eval()
    assert loaded.config == model.config
    ids, mask = batch(B=2, T=8, padding="left", seed=11)
    depths = random_depths(2, 8, 3, hard_fraction=0.6, seed=12)
    with torch.no_grad():
        a = model(ids, attention_mask=mask, depths=depths)
        b = loaded(ids, attention_mask=mask, depths=depths)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.decider_logits, b.decider_logits)
    with torch.no_grad():
        free_a, free_b = model(ids, attention_mask=mask), loaded(ids, attention_mask=mask)
    assert torch.equal(free_a.depths, free_b.depths)


def test_v1_default_config_unchanged():
    c = TaHConfig()
    assert (c.input_rule, c.combine, c.decider_kind, c.depth_lora, c.depth_attention) == (
        "soft_topk", "logit_residual", "v1", True, "duo_causal")


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_first_self_backends_agree_with_reference(backend):
    ids, mask = batch(B=3, T=10, padding="left", seed=13)
    depths = random_depths(3, 10, 3, hard_fraction=0.6, seed=14)
    v = mask.bool()
    outs = {}
    if backend == "flex":
        # Fresh compile caches: recompiling flex for new shapes after other tests' compilations hit an
        # Inductor CPU codegen error (undeclared `cur_kvSplitSize9`) in this torch; alone it compiles.
        torch._dynamo.reset()
    for b in ("reference", backend):
        model = make_tah2(3, depth_attention="first_self", attn_backend=b)
        with torch.no_grad():
            outs[b] = model(ids, attention_mask=mask, depths=depths).logits
        assert any(k.startswith(b) for k in model.attention_paths), model.attention_paths
    assert_logp_close(outs[backend][v], outs["reference"][v])


def test_max_depth_1_forward_is_the_backbone():
    """A TaH2 model of max_depth 1 runs no decider: its mixture is depth 1's log-softmax (the serving
    engine prefills a request capped at depth 1 this way)."""
    model = make_tah2(2)
    ids, mask = batch(B=2, T=7, padding="left", seed=17)
    v = mask.bool()
    with torch.no_grad():
        with model.depth_capped(1):
            one = model(ids, attention_mask=mask)
        ones = model(ids, attention_mask=mask, depths=torch.ones_like(ids))
    assert model.config.max_depth == 2  # restored
    assert torch.equal(one.depths[v], torch.ones_like(ids)[v])
    assert (one.logits - ones.logits)[v].abs().max() <= TOL


def test_v1_with_first_self_attention_forward_stepwise_and_engine():
    """The first_self visibility rule on the v1 configuration: parallel forward == brute-force grid ==
    token-by-token decoding, and the engine's mixed-depth decode (its own mask path) == the forward."""
    from tah.engine import Engine, EngineConfig, SamplingParams

    from .bruteforce import bruteforce_logits
    from .helpers import make

    model, _ = make(max_depth=3, depth_attention="first_self", soft_input_topk=50)
    ids, mask = batch(B=3, T=11, padding="left", seed=15)
    depths = random_depths(3, 11, 3, hard_fraction=0.6, seed=16)
    v = mask.bool()
    with torch.no_grad():
        par = model(ids, attention_mask=mask, depths=depths).logits
        cache = model.new_cache(3, chunk=4)
        seq = torch.cat([model(ids[:, t:t + 1], attention_mask=mask[:, t:t + 1], depths=depths[:, t:t + 1],
                               past_key_values=cache).logits for t in range(11)], 1)
    assert (par - seq)[v].abs().max() <= 1e-4  # v1's own tolerance (tests/test_model.py)
    for b in range(3):
        ref = bruteforce_logits(model, ids[b][v[b]], depths[b][v[b]], "first_self")
        assert (par[b][v[b]] - ref).abs().max() <= 1e-4
    eng = Engine(model, EngineConfig(max_num_seqs=4, max_model_len=64, depth_policy="always_think"))
    prompts = [[5, 17, 99, 3, 250], [7, 8, 9]]
    outs = eng.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0))
    for p, o in zip(prompts, outs):
        s = torch.tensor([p + o.token_ids])
        with torch.no_grad():
            full = model(s, depths=torch.full_like(s, 3)).logits
        assert full[0, len(p) - 1:-1].argmax(-1).tolist() == o.token_ids
