"""Fast duo-causal backends against the reference mask path: outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from tah import TaHConfig, TaHForCausalLM
from tah.attention import DuoCausalSpec, tah_attention
from tah.testing import random_depths

from .helpers import batch, make


class _Mod(torch.nn.Module):
    pass


def _random_spec(B=2, Tq=9, Tk=23, backend="reference", seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    q_pos = torch.sort(torch.randint(0, 30, (B, Tq), generator=g), dim=1).values
    k_pos = torch.randint(0, 30, (B, Tk), generator=g)
    k_valid = torch.rand(B, Tk, generator=g) > 0.2
    k_valid[:, 0], k_pos[:, 0] = True, 0  # every query sees at least one key
    return DuoCausalSpec(q_pos=q_pos, k_pos=k_pos, k_valid=k_valid, backend=backend, **kw)


def _qkv(B=2, H=4, Hkv=2, Tq=9, Tk=23, D=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, t, D, generator=g, requires_grad=True) for h, t in [(H, Tq), (Hkv, Tk), (Hkv, Tk)]]


def test_reference_matches_explicit_loop():
    """The reference path itself against a per-(b, h, q) loop over the rule, written independently."""
    spec = _random_spec()
    q, k, v = _qkv()
    out = tah_attention(_Mod(), q, k, v, spec, scaling=0.5)[0]  # (B, Tq, H, D)
    for b in range(2):
        for h in range(4):
            for i in range(9):
                keys = [j for j in range(23) if spec.k_valid[b, j] and spec.k_pos[b, j] <= spec.q_pos[b, i]]
                s = torch.stack([q[b, h, i] @ k[b, h // 2, j] * 0.5 for j in keys])
                expect = (torch.softmax(s, 0)[:, None] * v[b, h // 2, keys]).sum(0)
                assert torch.allclose(out[b, i, h], expect, atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "causal", "single_step", "segments"])
def test_sdpa_equals_reference_outputs_and_grads(kind):
    kw, Tq, Tk = {}, 9, 23
    if kind == "causal":
        Tq = Tk = 11
    if kind == "single_step":
        Tq = 1
    spec_r = _random_spec(Tq=Tq, Tk=Tk)
    if kind == "causal":  # keys are the queries themselves, packed left, valid prefix
        pos = torch.arange(Tq).expand(2, Tq)
        spec_r = DuoCausalSpec(q_pos=pos, k_pos=pos, k_valid=torch.ones(2, Tk, dtype=torch.bool), causal=True)
    if kind == "single_step":
        spec_r.all_keys_precede = True
        spec_r.q_pos = torch.full((2, 1), 10**6)
    if kind == "segments":
        g = torch.Generator().manual_seed(3)
        kw = dict(q_segment=torch.randint(0, 2, (2, Tq), generator=g), k_segment=torch.randint(0, 2, (2, Tk), generator=g))
        spec_r.q_segment, spec_r.k_segment = kw["q_segment"], kw["k_segment"]
    spec_s = DuoCausalSpec(**{**spec_r.__dict__, "backend": "sdpa", "counts": spec_r.counts.__class__()})
    outs, grads = [], []
    for spec in (spec_r, spec_s):
        q, k, v = _qkv(Tq=Tq, Tk=Tk)
        o = tah_attention(_Mod(), q, k, v, spec, scaling=0.3)[0]
        outs.append(o)
        grads.append(torch.autograd.grad((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum(), (q, k, v)))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)
    path = next(iter(spec_s.counts))
    assert path == {"dense": "sdpa:dense_mask", "causal": "sdpa:is_causal", "single_step": "sdpa:key_valid",
                    "segments": "sdpa:dense_mask"}[kind]


@pytest.mark.parametrize("max_depth", [2, 3])
def test_model_backends_agree_with_gradients(max_depth):
    """Whole-model forward + backward: sdpa (and auto) equal the reference backend."""
    ids, mask = batch(B=2, T=12, padding="left", seed=8)
    depths = random_depths(2, 12, max_depth, hard_fraction=0.4, seed=9)
    results = {}
    for backend in ("reference", "sdpa", "auto"):
        model, _ = make(max_depth=max_depth, attn_backend=backend)
        out = model(ids, attention_mask=mask, depths=depths, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[backend] = (out.logits.detach(), grads, dict(model.attention_paths))
    ref_logits, ref_grads, ref_paths = results["reference"]
    assert set(ref_paths) == {"reference:dense_mask"}
    v = mask.bool()
    for backend in ("sdpa", "auto"):
        logits, grads, paths = results[backend]
        assert (logits - ref_logits)[v].abs().max() <= 1e-5
        assert set(grads) == set(ref_grads) and len(grads) > 0
        for n in grads:
            assert torch.allclose(grads[n], ref_grads[n], atol=1e-5, rtol=1e-4), n
        assert "sdpa:dense_mask" in paths  # left padding + deeper depths take the masked path
    assert "reference:dense_mask" not in results["auto"][2]


def test_right_padded_depth1_takes_is_causal_path():
    model, _ = make(max_depth=2, attn_backend="auto")
    ids, mask = batch(B=2, T=10, padding="right")
    model(ids, attention_mask=mask, depths=torch.ones_like(ids))
    assert set(model.attention_paths) == {"sdpa:is_causal"}


def test_flex_forward_equals_reference_on_cpu():
    """FlexAttention (compiled) forward on CPU; its backward needs a GPU (see test_gpu.py)."""
    ids, mask = batch(B=2, T=12, padding="left", seed=10)
    depths = random_depths(2, 12, 3, hard_fraction=0.4, seed=11)
    logits = {}
    for backend in ("reference", "flex"):
        model, _ = make(max_depth=3, attn_backend=backend)
        with torch.no_grad():
            logits[backend] = model(ids, attention_mask=mask, depths=depths).logits
        if backend == "flex":
            assert "flex:block_mask" in model.attention_paths
    assert (logits["flex"] - logits["reference"])[mask.bool()].abs().max() <= 1e-5


def test_flex_on_cpu_at_head_dim_64_across_shapes():
    """The shapes that broke the CPU flex path: a 4-layer Qwen3 with head_dim 64 at T = 48, reached after
    other shapes had compiled (Dynamo then compiled it with dynamic shapes, and Inductor's CPU flex
    template failed with `CppCompileError: 'cur_qSplitSize4' was not declared`). Each shape, including
    depth 2's short query sets and left padding, equals the reference path."""
    from tah.testing import tiny_qwen3

    for i, (heads, kv, hidden, B, T) in enumerate([(4, 2, 256, 2, 48), (8, 4, 512, 1, 40), (16, 8, 1024, 2, 48)]):
        hf = tiny_qwen3(vocab_size=300, hidden_size=hidden, num_layers=4, num_heads=heads, num_kv_heads=kv,
                        head_dim=64, intermediate_size=256, initializer_range=0.02, seed=i)
        ids, mask = batch(B=B, T=T, padding="left", seed=20 + i)
        depths = random_depths(B, T, 2, hard_fraction=0.3, seed=30 + i)
        logits = {}
        for backend in ("reference", "flex"):
            model = TaHForCausalLM.from_backbone(hf, TaHConfig(max_depth=2, attn_backend=backend)).eval()
            with torch.no_grad():
                logits[backend] = model(ids, attention_mask=mask, depths=depths).logits[mask.bool()]
            assert set(model.attention_paths) == {f"{backend}:{'dense_mask' if backend == 'reference' else 'block_mask'}"}
        ref = logits["reference"]
        assert float((logits["flex"] - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))


def test_flex_backward_on_cpu_is_a_clear_error():
    model, _ = make(max_depth=2, attn_backend="flex")
    ids, mask = batch(B=1, T=6)
    with pytest.raises(RuntimeError, match="FlexAttention does not"):
        model(ids, attention_mask=mask, depths=torch.full_like(ids, 2), labels=ids)


def _fake_flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                       softmax_scale=None, causal=False, **_):
    """flash_attn_varlen_func's documented semantics, naively: per sequence, GQA, bottom-right causal."""
    assert dropout_p == 0.0 and q.dim() == 3 and cu_seqlens_q.dtype == torch.int32
    rep = q.shape[1] // k.shape[1]
    outs = []
    for s in range(len(cu_seqlens_q) - 1):
        qs = q[cu_seqlens_q[s]:cu_seqlens_q[s + 1]].transpose(0, 1)  # (H, Lq, D)
        ks = k[cu_seqlens_k[s]:cu_seqlens_k[s + 1]].transpose(0, 1).repeat_interleave(rep, 0)
        vs = v[cu_seqlens_k[s]:cu_seqlens_k[s + 1]].transpose(0, 1).repeat_interleave(rep, 0)
        scores = qs @ ks.transpose(-1, -2) * (softmax_scale or qs.shape[-1] ** -0.5)
        if causal:
            lq, lk = qs.shape[1], ks.shape[1]
            allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
            scores = scores.masked_fill(~allowed, float("-inf"))
        outs.append((torch.softmax(scores, -1) @ vs).transpose(0, 1))
    return torch.cat(outs)


def test_flash_backend_logic_with_standin(monkeypatch):
    """The flash path's unpad / re-pad and routing, run against a stand-in of flash-attn's API on CPU."""
    import sys
    import types

    import tah.attention as A

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=_fake_flash_varlen))
    ids, mask = batch(B=3, T=12, padding="left", seed=14)
    depths = random_depths(3, 12, 2, hard_fraction=0.4, seed=15)
    res = {}
    for backend in ("reference", "flash"):
        model, _ = make(max_depth=2, attn_backend=backend)
        out = model(ids, attention_mask=mask, depths=depths, labels=ids)
        out.loss.backward()
        res[backend] = (out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                        dict(model.attention_paths))
    v = mask.bool()
    assert (res["flash"][0] - res["reference"][0])[v].abs().max() <= 1e-5
    for n, g in res["reference"][1].items():
        assert torch.allclose(res["flash"][1][n], g, atol=1e-5, rtol=1e-4), n
    # Depth 1 went through flash-attn; depth 2 (cross-depth) cannot, and says where it went instead.
    assert set(res["flash"][2]) == {"flash:varlen_causal", "sdpa:dense_mask"}
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # now "not installed"
    assert not A.flash_attn_available()
    model, _ = make(max_depth=2, attn_backend="flash")
    with pytest.raises(RuntimeError, match="needs the flash-attn package"):
        model(ids, attention_mask=mask)


def _loop_decode(q, keys, values, valid, scaling):
    """Per row and head: softmax over that row's visible keys, written out. q (B, H, D); keys/values per
    row a list of (n_r, Hkv, D); valid per row (n_r,) bool."""
    B, H, D = q.shape
    out = torch.zeros(B, H, D, dtype=torch.float64)
    for b in range(B):
        k, v = keys[b][valid[b]].double(), values[b][valid[b]].double()
        g = H // k.shape[1]
        for h in range(H):
            p = torch.softmax(k[:, h // g] @ q[b, h].double() * scaling, 0)
            out[b, h] = p @ v[:, h // g]
    return out


@pytest.mark.parametrize("split", [False, True])
def test_mixed_decode_on_gathered_blocks_equals_a_per_row_loop(split):
    """The engine's decode attention, keys as a window (the reference cache) and as gathered paged blocks
    (B, Dv, nb, Hkv, u, D), against softmax over each row's visible keys written out per row and head
    (GQA 2 query heads per KV head; two depths, several blocks, rows of different lengths)."""
    from tah.attention import MixedDecodeSpec, _mixed_decode, _mixed_decode_split

    g = torch.Generator().manual_seed(3)
    B, H, Hkv, D, Dv, nb, u = 5, 4, 2, 8, 2, 3, 4
    q = torch.randn(B, H, 1, D, generator=g)
    kb, vb = torch.randn(2, B, Dv, nb, Hkv, u, D, generator=g)  # gathered blocks
    valid = torch.rand(B, Dv, nb * u, generator=g) > 0.3
    valid[:, 0, 0] = True
    def dense(x):  # the cache's window (B, Hkv, Dv, W, D)
        return x.permute(0, 3, 1, 2, 4, 5).reshape(B, Hkv, x.shape[1], nb * u, D)

    def flat(x):  # each row's keys in order (B, Dv * W, Hkv, D)
        return x.permute(0, 1, 2, 4, 3, 5).reshape(B, -1, Hkv, D)

    if not split:
        want = _loop_decode(q[:, :, 0], flat(kb), flat(vb), valid.reshape(B, -1), 0.3)
        for blocked, k, v in [(False, dense(kb), dense(vb)), (True, kb, vb)]:
            got = _mixed_decode(q, k, v, MixedDecodeSpec(k_valid=valid, blocked=blocked), 0.3)
            torch.testing.assert_close(got[:, :, 0].double(), want, atol=1e-5, rtol=1e-5)
        return
    # Split form: depth-1 keys for every row (depth index 0 of the blocks), deeper keys for rows 1 and 3.
    rows = torch.tensor([1, 3])
    kd, vd = torch.randn(2, 2, Hkv, 2, 3, D, generator=g)  # (B_deep, Hkv, D_deep, W2, D) windows
    dvalid = torch.rand(2, 2, 3, generator=g) > 0.4
    k1, v1, val1 = kb[:, :1], vb[:, :1], valid[:, :1]
    keys, values, vis = list(flat(k1)), list(flat(v1)), list(val1.reshape(B, -1))
    for j, r in enumerate(rows.tolist()):
        keys[r] = torch.cat([keys[r], kd[j].permute(1, 2, 0, 3).reshape(-1, Hkv, D)])
        values[r] = torch.cat([values[r], vd[j].permute(1, 2, 0, 3).reshape(-1, Hkv, D)])
        vis[r] = torch.cat([vis[r], dvalid[j].reshape(-1)])
    want = _loop_decode(q[:, :, 0], keys, values, vis, 0.3)
    for blocked, k, v in [(False, dense(k1), dense(v1)), (True, k1, v1)]:
        spec = MixedDecodeSpec(k_valid=val1, deep_rows=rows, deep_valid=dvalid, blocked=blocked)
        got = _mixed_decode_split(q, (k, kd), (v, vd), spec, 0.3)
        torch.testing.assert_close(got[:, :, 0].double(), want, atol=1e-5, rtol=1e-5)
