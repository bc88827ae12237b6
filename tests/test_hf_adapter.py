"""One test per assumption tah/hf_adapter.py makes about transformers' and peft's internals.

Each test checks the assumption directly against transformers/peft with tiny random models (no TaH
code besides the adapter), so a new release that breaks one fails the test named after it.

    .venv/bin/python -m pytest -q tests/test_hf_adapter.py
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from transformers import AutoModelForCausalLM

from tah import hf_adapter as hf
from tah.config import LoraSettings
from tah.testing import randomize_lora, tiny_llama, tiny_qwen3

BUILDERS = {"qwen3": tiny_qwen3, "llama": tiny_llama}


def _ids(B: int = 2, T: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 300, (B, T), generator=torch.Generator().manual_seed(seed))


def _padded_mask(B: int = 2, T: int = 7) -> torch.Tensor:
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :3] = 0  # left padding on row 1
    return mask


class _RecordingCache:
    """A duck-typed cache: records each update call and returns what `reply` makes of the keys."""

    def __init__(self, reply=None) -> None:
        self.calls: list[tuple[tuple, dict]] = []
        self.returned: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.reply = reply or (lambda k, v: (k, v))

    def update(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        out = self.reply(args[0], args[1])
        self.returned.append(out)
        return out


class _Recorder:
    """An attention function that records what HF hands it, then runs HF's sdpa (or `compute`)."""

    def __init__(self, compute=None) -> None:
        self.calls: list[dict] = []
        self.compute = compute

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        self.calls.append(dict(module=module, query=query, key=key, value=value, mask=attention_mask, kwargs=kwargs))
        if self.compute is not None:
            return self.compute(query, key, value), None
        return hf.sdpa_forward(module, query, key, value, attention_mask, **kwargs)


def _register(name: str, fn) -> None:
    hf.register_attention(f"test_hf_adapter_{name}", fn)


def _use(model: torch.nn.Module, name: str) -> None:
    hf.set_attn_implementation(model, f"test_hf_adapter_{name}")


def _run_parts(model, ids: torch.Tensor, attention_mask=None, cache=None) -> torch.Tensor:
    """The decoder by hand, as TaH runs it: (B, T) ids -> (B, T, V) logits."""
    parts = hf.decoder_parts(model)
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    h = parts.embed(ids)  # (B, T, H)
    pe = hf.rotary_embeddings(parts.rotary, h, pos)
    cache = cache if cache is not None else _RecordingCache()
    for layer in parts.layers:
        h = hf.run_layer(layer, h, attention_mask, pos, cache, pe)
    return parts.lm_head(parts.norm(h))


# ------------------------------------------------------------------ attention registration
def test_attention_interface_routes_registered_function():
    model, ids = tiny_qwen3(), _ids()
    ref = model(ids).logits
    rec = _Recorder()
    _register("route", rec)
    _use(model, "route")
    out = model(ids).logits
    assert len(rec.calls) == model.config.num_hidden_layers  # every layer, once
    assert [c["module"] for c in rec.calls] == [layer.self_attn for layer in model.model.layers]
    assert torch.equal(out, ref)


def test_mask_interface_gives_registered_name_sdpa_masks():
    # Without the mask registration HF hands the function no mask and padding is silently ignored.
    model, ids, mask = tiny_qwen3(), _ids(), _padded_mask()
    ref = model(ids, attention_mask=mask).logits
    rec = _Recorder()
    _register("mask", rec)
    _use(model, "mask")
    out = model(ids, attention_mask=mask).logits
    m = rec.calls[0]["mask"]
    assert isinstance(m, torch.Tensor) and m.dtype == torch.bool and m.shape == (2, 1, 7, 7)
    assert not m[1, 0, :, :3].any() and m[1, 0, 6, 3:].all()  # padding keys hidden, real keys seen
    assert torch.equal(out, ref)


def test_attention_fn_takes_heads_first_and_returns_sequence_first():
    model, ids = tiny_llama(), _ids()
    ref = model(ids).logits
    cfg = model.config
    kv_heads, head_dim = hf.kv_shape(cfg)

    def naive(q, k, v):  # (B, H, T, D) in; returns (B, T, H, D), the layout HF reshapes to (B, T, H*D)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        s = (q @ k.transpose(-1, -2)) * head_dim ** -0.5
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        return (torch.softmax(s, -1) @ v).transpose(1, 2)

    rec = _Recorder(compute=naive)
    _register("layout", rec)
    _use(model, "layout")
    out = model(ids).logits
    c = rec.calls[0]
    assert c["query"].shape == (2, cfg.num_attention_heads, 7, head_dim)
    assert c["key"].shape == c["value"].shape == (2, kv_heads, 7, head_dim)
    assert (out - ref).abs().max() < 1e-5


def test_attention_fn_receives_scaling_and_sliding_window():
    model = tiny_qwen3(head_dim=32)
    rec = _Recorder()
    _register("kwargs", rec)
    _use(model, "kwargs")
    model(_ids())
    kw = rec.calls[0]["kwargs"]
    assert kw["scaling"] == 32 ** -0.5  # TaH's attention takes the module's scale, not D ** -0.5 of its own
    assert kw["dropout"] == 0.0
    assert "sliding_window" in kw and kw["sliding_window"] is None  # full-attention layers say so explicitly


def test_sdpa_forward_signature():
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, Tq, Tk, D = 2, 4, 2, 3, 5, 8
    q, k, v = torch.randn(B, H, Tq, D, generator=g), torch.randn(B, Hkv, Tk, D, generator=g), torch.randn(
        B, Hkv, Tk, D, generator=g)
    mask = torch.rand(B, 1, Tq, Tk, generator=g) > 0.3
    mask[..., 0] = True
    module = torch.nn.Module().eval()
    module.num_key_value_groups, module.is_causal = H // Hkv, True  # what HF's attention modules carry
    out, weights = hf.sdpa_forward(module, q, k, v, mask, scaling=0.3, dropout=0.0, sliding_window=None)
    kk, vv = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    s = (q @ kk.transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf"))
    want = (torch.softmax(s, -1) @ vv).transpose(1, 2)  # (B, Tq, H, D)
    assert weights is None and out.shape == (B, Tq, H, D)
    assert (out - want).abs().max() < 1e-5
    # No mask: causal (the module's is_causal), as for a backbone's own cache-less forward.
    out, _ = hf.sdpa_forward(module, q, kk[:, :Hkv, :Tq], vv[:, :Hkv, :Tq], None, scaling=0.3)
    s = (q @ kk[:, :Hkv, :Tq].repeat_interleave(H // Hkv, 1).transpose(-1, -2) * 0.3)
    s = s.masked_fill(torch.ones(Tq, Tq, dtype=torch.bool).triu(1), float("-inf"))
    want = (torch.softmax(s, -1) @ vv[:, :Hkv, :Tq].repeat_interleave(H // Hkv, 1)).transpose(1, 2)
    assert (out - want).abs().max() < 1e-5


# ------------------------------------------------------------------ the decoder, run by hand
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_decoder_parts_reproduce_hf_forward(arch):
    model, ids = BUILDERS[arch](), _ids()
    with torch.no_grad():
        assert (_run_parts(model, ids) - model(ids).logits).abs().max() < 1e-5


def test_decoder_layer_returns_tensor():
    model, ids = tiny_qwen3(), _ids()
    parts = hf.decoder_parts(model)
    h = parts.embed(ids)
    pe = hf.rotary_embeddings(parts.rotary, h, torch.arange(7)[None].expand(2, 7))
    out = hf.run_layer(parts.layers[0], h, None, torch.arange(7)[None], _RecordingCache(), pe)
    assert isinstance(out, torch.Tensor) and out.shape == h.shape  # (B, T, H), not 4.x's tuple


def test_layer_calls_cache_update_with_post_rope_keys():
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    model, ids = tiny_qwen3(), _ids()
    parts = hf.decoder_parts(model)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [10, 11, 12, 13, 14, 15, 16]])
    h = parts.embed(ids)
    pe = hf.rotary_embeddings(parts.rotary, h, pos)
    layer, cache = parts.layers[2], _RecordingCache()
    hf.run_layer(layer, h, None, pos, cache, pe)
    assert len(cache.calls) == 1  # the cache passed as past_key_values reaches the attention module
    args, kwargs = cache.calls[0]
    # The call binds to the protocol TaH's views implement (key_states, value_states, layer_idx, ...).
    bound = inspect.signature(hf.KVCacheView.update).bind(None, *args, **kwargs).arguments
    assert bound["layer_idx"] == 2
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    k = attn.k_norm(attn.k_proj(x).view(2, 7, -1, attn.head_dim)).transpose(1, 2)  # (B, Hkv, T, D)
    q = attn.q_norm(attn.q_proj(x).view(2, 7, -1, attn.head_dim)).transpose(1, 2)
    _, k_rope = apply_rotary_pos_emb(q, k, *pe)
    assert (bound["key_states"] - k_rope).abs().max() < 1e-6
    v = attn.v_proj(x).view(2, 7, -1, attn.head_dim).transpose(1, 2)
    assert torch.equal(bound["value_states"], v)


def test_cache_update_return_reaches_attention_unchanged():
    # TaH's views return the visible keys of every depth, and the mixed decode returns 5-D views:
    # whatever update returns must be what the attention function gets.
    model, ids = tiny_qwen3(), _ids()
    extra = torch.randn(2, 2, 3, 4, 16)  # (B, Hkv, D_vis, W, D): any shape goes through
    cache = _RecordingCache(reply=lambda k, v: (extra, extra + 1))
    rec = _Recorder(compute=lambda q, k, v: q.new_zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[3]))
    _register("cache_return", rec)
    _use(model, "cache_return")
    with torch.no_grad():
        _run_parts(model, ids, cache=cache)
    assert len(rec.calls) == len(cache.returned) == model.config.num_hidden_layers
    for call, (k, v) in zip(rec.calls, cache.returned):
        assert call["key"] is k and call["value"] is v


def test_layer_passes_attention_mask_through():
    model, ids = tiny_qwen3(), _ids()
    sentinel = object()  # TaH passes its DuoCausalSpec; HF must not look inside
    rec = _Recorder(compute=lambda q, k, v: q.transpose(1, 2))
    _register("mask_through", rec)
    _use(model, "mask_through")
    with torch.no_grad():
        _run_parts(model, ids, attention_mask=sentinel)
    assert [c["mask"] is sentinel for c in rec.calls] == [True] * model.config.num_hidden_layers


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_rotary_emb_returns_cos_sin(arch):
    model = BUILDERS[arch]()
    _, head_dim = hf.kv_shape(model.config)
    rotary = hf.decoder_parts(model).rotary
    x = torch.zeros(2, 10, model.config.hidden_size, dtype=torch.float32)
    pos = torch.arange(10)[None].expand(2, 10)
    cos, sin = hf.rotary_embeddings(rotary, x, pos)
    assert cos.shape == sin.shape == (2, 10, head_dim) and cos.dtype == x.dtype
    assert (cos ** 2 + sin ** 2 - 1).abs().max() < 1e-5 and (cos[:, 0] == 1).all()
    # Depends on the position id only: TaH packs a depth's tokens but keeps their position ids.
    c2, s2 = hf.rotary_embeddings(rotary, x[:1, :2], torch.tensor([[9, 3]]))
    assert torch.equal(c2[0], cos[0, [9, 3]]) and torch.equal(s2[0], sin[0, [9, 3]])


def test_layer_idx_attribute_indexes_cache():
    model, ids = tiny_qwen3(), _ids()
    parts = hf.decoder_parts(model)
    kept = [layer for i, layer in enumerate(parts.layers) if i != 1]
    hf.renumber_layers(kept)
    hf.set_decoder_layers(model, kept)
    cache = _RecordingCache()
    with torch.no_grad():
        _run_parts(model, ids, cache=cache)
    assert [args[2] for args, _ in cache.calls] == [0, 1, 2]  # read at call time, dense after removal


def test_kv_shape_matches_cache_keys():
    for model in (tiny_qwen3(head_dim=32), tiny_llama()):  # head_dim != H / heads; Llama: no head_dim
        cache = _RecordingCache()
        with torch.no_grad():
            _run_parts(model, _ids(), cache=cache)
        key = cache.calls[0][0][0]
        assert key.shape == (2, *hf.kv_shape(model.config)[:1], 7, hf.kv_shape(model.config)[1])


# ------------------------------------------------------------------ peft
def _wrapped(arch: str = "qwen3", **lora):
    base = BUILDERS[arch]()
    model = copy.deepcopy(base)
    settings = LoraSettings(**{"r": 4, "alpha": 8, "dropout": 0.0, **lora})
    peft_model = hf.wrap_with_lora(model, settings)
    return base, model, peft_model


def test_peft_fresh_lora_is_identity():
    base, model, _ = _wrapped()
    ids = _ids()
    assert torch.equal(model(ids).logits, base(ids).logits)  # B = 0 at init


def test_peft_injects_lora_in_place():
    base, model, peft_model = _wrapped()
    assert peft_model.get_base_model() is model
    layer = hf.decoder_parts(model).layers[0]
    assert isinstance(layer.self_attn.q_proj, hf.BaseTunerLayer)
    randomize_lora(model, scale=0.3)
    ids = _ids()
    assert (model(ids).logits - base(ids).logits).abs().max() > 1e-3  # the plain backbone runs the adapters


def test_lora_layers_finds_every_target_linear():
    _, model, _ = _wrapped()
    layers = hf.lora_layers(model)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m in layers}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(layers) == 7 * model.config.num_hidden_layers  # all-linear: not lm_head
    assert hf.lora_layers(tiny_qwen3()) == []


def test_peft_disable_flag_switches_lora_output():
    base, model, _ = _wrapped()
    randomize_lora(model, scale=0.3)
    layers, ids = hf.lora_layers(model), _ids()
    on = model(ids).logits
    hf.set_lora_enabled(layers, False)
    assert torch.equal(model(ids).logits, base(ids).logits)
    hf.set_lora_enabled(layers, True)
    assert torch.equal(model(ids).logits, on) and not torch.equal(on, base(ids).logits)


def test_peft_disable_flag_leaves_gradients():
    _, model, _ = _wrapped()
    randomize_lora(model, scale=0.3)
    layers = hf.lora_layers(model)
    hf.set_lora_enabled(layers, False)
    hf.set_lora_enabled(layers, True)
    model(_ids()).logits.sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if hf.is_lora_param(n)]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_lora_on_rows_adds_the_adapter_to_those_rows_only():
    """Per LoRA Linear, the formula written out: base(x) + B(A(x)) * alpha / r on the chosen rows, base(x)
    exactly elsewhere; the whole model: the rows equal the model with LoRA on everywhere (the 0/1
    per-row scaling this replaced gave exactly these values)."""
    base, model, _ = _wrapped()
    randomize_lora(model, scale=0.3)
    layers = hf.lora_layers(model)
    assert all(not m._disable_adapters for m in layers)
    q = hf.decoder_parts(model).layers[0].self_attn.q_proj
    x = torch.randn(4, 3, q.in_features, generator=torch.Generator().manual_seed(1))  # (B, T, in)
    rows = torch.tensor([0, 2, 3])
    a, b = q.lora_A["default"].weight, q.lora_B["default"].weight
    expect = q.base_layer(x) + (x @ a.T @ b.T) * (8 / 4)
    with hf.lora_on_rows(layers, rows):
        assert all(m._disable_adapters for m in layers)
        got = q(x.requires_grad_())  # (added out of place: autograd sees it)
        with torch.no_grad():
            got_inplace = q(x)  # (added into the base output in place)
    assert all(not m._disable_adapters for m in layers) and not q._forward_hooks  # flags restored, hooks gone
    assert torch.equal(q(x), q.base_layer(x) + q.lora_B["default"](q.lora_A["default"](x)) * 2.0)
    for out in (got, got_inplace):
        assert (out[rows] - expect[rows]).abs().max() < 1e-6
        assert torch.equal(out[1], q.base_layer(x)[1])
    got[1].sum().backward(retain_graph=True)  # a row without the adapter: no gradient reaches it
    assert q.lora_B["default"].weight.grad.abs().sum() == 0 and x.grad[1].abs().sum() > 0
    got[0].sum().backward()
    assert q.lora_B["default"].weight.grad.abs().sum() > 0
    ids = _ids(B=3)
    on, off = model(ids).logits, base(ids).logits
    with hf.lora_on_rows(layers, torch.tensor([0, 2])):
        mixed = model(ids).logits
    assert torch.equal(mixed[1], off[1])
    assert (mixed[[0, 2]] - on[[0, 2]]).abs().max() < 1e-6 and (on[0] - off[0]).abs().max() > 1e-2
    with hf.lora_on_rows(layers, torch.tensor([], dtype=torch.long)):
        assert torch.equal(model(ids).logits, off)
    with hf.lora_on_rows(layers, torch.tensor([0, 1, 2])):
        assert (model(ids).logits - on).abs().max() < 1e-6


def test_lora_on_rows_refuses_a_lora_variant():
    from peft import LoraConfig, get_peft_model

    model = BUILDERS["qwen3"]()  # DoRA (a peft variant; TaH's LoraSettings has no switch for it)
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True))
    layers = hf.lora_layers(model)
    with pytest.raises(NotImplementedError, match="vanilla LoRA"):
        with hf.lora_on_rows(layers, torch.tensor([0])):
            model(_ids())
    assert all(not m._disable_adapters for m in layers) and all(not m._forward_hooks for m in layers)


def test_peft_freezes_base_weights_by_default():
    _, model, _ = _wrapped()
    randomize_lora(model, scale=0.3)
    model(_ids()).logits.sum().backward()
    for n, p in model.named_parameters():
        if hf.is_lora_param(n):
            assert p.requires_grad and p.grad is not None
        else:  # TaHForCausalLM.set_trainable("stage1") has to undo this
            assert not p.requires_grad and p.grad is None, n


def test_peft_state_dict_names_base_layer_and_lora(tmp_path):
    for arch in ("qwen3", "llama"):  # tied and untied lm_head
        base, model, _ = _wrapped(arch)
        randomize_lora(model, scale=0.3)
        sd = hf.base_state_dict(model)
        plain = base.state_dict()
        if base.config.tie_word_embeddings:
            plain.pop("lm_head.weight")
        assert sd.keys() == plain.keys() and all(torch.equal(sd[k], plain[k]) for k in sd)
        n_lora = sum(p.numel() for n, p in model.named_parameters() if hf.is_lora_param(n))
        assert n_lora == sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in base.parameters())
        # HF loads it back as the plain model (re-tying lm_head where it was dropped).
        base.config.save_pretrained(tmp_path / arch)
        from safetensors.torch import save_file
        save_file(sd, tmp_path / arch / "model.safetensors", metadata={"format": "pt"})
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / arch, dtype=torch.float32).eval()
        assert torch.equal(loaded(_ids()).logits, base(_ids()).logits)


def test_peft_adapter_save_load_roundtrip(tmp_path):
    base, model, peft_model = _wrapped(target_modules=["q_proj", "v_proj"])
    randomize_lora(model, scale=0.3)
    hf.save_lora(peft_model, tmp_path / "lora")
    fresh = copy.deepcopy(base)
    hf.load_lora(fresh, tmp_path / "lora")
    ids = _ids()
    assert torch.equal(fresh(ids).logits, model(ids).logits)
    lora = [p for n, p in fresh.named_parameters() if hf.is_lora_param(n)]
    assert len(hf.lora_layers(fresh)) == 2 * fresh.config.num_hidden_layers
    assert lora and all(p.requires_grad for p in lora)  # is_trainable=True: stage 1 resumes training it
