"""The authors' TaH2 checkpoints: converted exactly (CLI and direct load), their pickles read safely,
what our model cannot reproduce refused by name with nothing written.

The checkpoints here are written by the test in the authors' layout (thu-nics/TaH 8541421e
`tah2/model/tah_model.py:save_pretrained`, `utils/component_io.py:save_registered_component`): the HF
Qwen3 files in bf16 with tie_word_embeddings (model.safetensors without lm_head.weight),
`iter_decider.bin` / `input_updater.bin` = torch.save({"class", "state_dict": bf16 tensors under their
key names, the decider's `threshold` buffer included, "init_args"}), `tah_config.json` = their
TaHConfig with {"__dtype__": true, "__str__": ...} / {"__type__": true, ...} encodings. The reference
forward is written out here on those source tensors (their updater, decider, mixture) over a
brute-force (position, depth) grid of the backbone loaded by HF from the source files.

    PYTHONPATH=. python -m pytest -x -q tests/test_convert_tah2.py
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from tah import TaHForCausalLM
from tah.assets import shipped_tokenizer
from tah.convert import (
    UnsafeCheckpointError,
    UnsupportedCheckpointError,
    convert,
    main,
    resolve_checkpoint,
)
from tah.testing import random_depths, tiny_qwen3

from .bruteforce import grid_forward
from .helpers import batch

H, I_DEC, I_UPD, SEED = 64, 48, 40, 3  # tiny_qwen3's hidden size; distinct widths catch a swap
TOL = 1e-5
BF16 = torch.bfloat16
CASES = {
    "m2_duo": dict(max_iter=2, mode="duo", method="stop_prob_mix", threshold=0.6),
    "m4_duo": dict(max_iter=4, mode="duo", method="stop_prob_mix", threshold=None),  # the buffer's 0.7
    "m4_causal_even": dict(max_iter=4, mode="causal", method="even_mix", threshold=0.5),
    "fixed3_causal": dict(max_iter=3, mode="causal", method="even_mix", decider="AlwaysIterDecider"),
    "fixed2_same_iter": dict(max_iter=2, mode="same_iter", method="even_mix", decider="AlwaysIterDecider"),
}


# ------------------------------------------------------------------ the authors' layout, written out
def _rand(g: torch.Generator, *shape: int, scale: float, base: float = 0.0, dtype=BF16) -> torch.Tensor:
    return (base + scale * torch.randn(*shape, generator=g)).to(dtype)


def their_decider_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Qwen3MLPIterDecider(H, I_DEC, topk=H).state_dict() after `self.to(bf16)`: weights + threshold buffer."""
    g = torch.Generator().manual_seed(seed)
    sd = {f"norm_{n}.weight": _rand(g, H, scale=0.2, base=1.0) for n in ("first", "last", "l", "out")}
    return sd | {"input_proj.weight": _rand(g, H, 3 * H, scale=0.1),
                 "mlp.gate_proj.weight": _rand(g, I_DEC, H, scale=0.15),
                 "mlp.up_proj.weight": _rand(g, I_DEC, H, scale=0.15),
                 "mlp.down_proj.weight": _rand(g, H, I_DEC, scale=0.15),
                 "score.weight": _rand(g, 1, H, scale=0.5), "threshold": torch.tensor(0.7, dtype=BF16)}


def their_updater_state(seed: int = 1, dtype=BF16) -> dict[str, torch.Tensor]:
    """Qwen3MLPUpdater(H, I_UPD).state_dict()."""
    g = torch.Generator().manual_seed(seed)
    sd = {f"norm_{n}.weight": _rand(g, H, scale=0.2, base=1.0, dtype=dtype) for n in ("prev", "last", "pre_mlp", "out")}
    return sd | {"projection.weight": _rand(g, H, 2 * H, scale=0.1, dtype=dtype),
                 "mlp.gate_proj.weight": _rand(g, I_UPD, H, scale=0.15, dtype=dtype),
                 "mlp.up_proj.weight": _rand(g, I_UPD, H, scale=0.15, dtype=dtype),
                 "mlp.down_proj.weight": _rand(g, H, I_UPD, scale=0.15, dtype=dtype)}


def write_tah2(path: Path, max_iter: int = 2, mode: str = "duo", method: str = "stop_prob_mix",
               decider: str = "Qwen3MLPIterDecider", threshold: float | None = 0.6, dec_kwargs: dict | None = None,
               upd_dtype=BF16, raw_changes: dict | None = None) -> tuple[dict, dict]:
    """An authors' TaH2 checkpoint at `path`; returns the (decider, updater) state_dicts written."""
    hf = tiny_qwen3(seed=SEED, dtype=BF16)
    hf.save_pretrained(path)  # config.json (dtype bfloat16, tied), generation_config.json, model.safetensors
    for f in Path(shipped_tokenizer()).iterdir():  # their releases ship the tokenizer beside the model
        shutil.copy(f, path / f.name)
    upd_sd, ukw = their_updater_state(dtype=upd_dtype), {"hidden_size": H, "intermediate_size": I_UPD}
    if decider == "AlwaysIterDecider":
        dkw: dict = {}
        dec_sd = {"threshold": torch.tensor(0.5)}  # its only tensor: the base class's buffer
    else:
        dkw = {"hidden_size": H, "intermediate_size": I_DEC, "topk": H, "threshold": threshold, "dtype": BF16}
        if threshold is None:
            del dkw["threshold"]
        dec_sd = their_decider_state()
    dkw |= dec_kwargs or {}
    # _build_iter_decider passes max_iter and memory_lean_fp32_reductions; capture_init_args records them.
    torch.save({"class": decider, "state_dict": dec_sd,
                "init_args": {**dkw, "max_iter": max_iter, "memory_lean_fp32_reductions": True}},
               path / "iter_decider.bin")
    torch.save({"class": "Qwen3MLPUpdater", "state_dict": upd_sd, "init_args": dict(ukw)}, path / "input_updater.bin")
    enc = lambda d: {k: {"__dtype__": True, "__str__": str(v)} if isinstance(v, torch.dtype) else v
                     for k, v in d.items()}
    raw = {"embedding_key": "model.embed_tokens", "max_iter": max_iter, "iter_decider": decider,
           "input_updater": "Qwen3MLPUpdater", "train_loss": "CombinedLoss", "eval_loss": None,
           "eval_iter_decider": None,
           "iter_label_generator": "PosteriorIterLabelGenerator", "iter_attention_mode": mode,
           "attn_implementation": "sdpa", "iter_attention_impl": "triton", "weighted_hidden_method": method,
           "memory_lean_fp32_reductions": True, "iter_decider_kwargs": enc(dkw), "input_updater_kwargs": ukw,
           "train_loss_kwargs": {"ntp_weight": 1.0, "decider_weight": 0.05,
                                 "loss_cls": {"__type__": True, "__module__": "tah2.model.loss",
                                              "__name__": "BCELoss"}},
           "eval_loss_kwargs": {}, "eval_iter_decider_kwargs": {},
           "iter_label_generator_kwargs": {"abs_improv_coverage": 0.99}}
    raw |= raw_changes or {}
    (path / "tah_config.json").write_text(json.dumps(raw, indent=2))
    return dec_sd, upd_sd


# ------------------------------------------------------------------ their forward on those tensors
def _rms(x, w, eps=1e-6):
    return w * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _swiglu(sd, x):
    a = x @ sd["mlp.gate_proj.weight"].T
    return (a * torch.sigmoid(a) * (x @ sd["mlp.up_proj.weight"].T)) @ sd["mlp.down_proj.weight"].T


def their_updater(sd, e, h):
    """norm_out(MLP(norm_pre_mlp(projection([norm_prev(e); norm_last(h)]))))"""
    x = torch.cat([_rms(e, sd["norm_prev.weight"]), _rms(h, sd["norm_last.weight"])]) @ sd["projection.weight"].T
    return _rms(_swiglu(sd, _rms(x, sd["norm_pre_mlp.weight"])), sd["norm_out.weight"])


def their_decider(sd, e, h, z):
    """score(norm_out(MLP(input_proj([norm_first(e); norm_last(h); norm_l(top-H softmax(z))]))))"""
    p = torch.softmax(z, -1).sort(descending=True).values[:H]
    x = torch.cat([_rms(e, sd["norm_first.weight"]), _rms(h, sd["norm_last.weight"]), _rms(p, sd["norm_l.weight"])])
    return float(_rms(_swiglu(sd, x @ sd["input_proj.weight"].T), sd["norm_out.weight"]) @ sd["score.weight"][0])


@torch.no_grad()
def reference(hf, dec_sd, upd_sd, ids, depths, M: int, mode: str, method: str):
    """One unpadded row: (mixture log-probs (T, V), decider logits {(i, d): z}) from scratch, every depth
    over the explicit grid of nodes (i, k) with their visibility rule (tah2/utils/sparse_ops.py)."""
    T, emb, net = ids.shape[0], hf.model.embed_tokens.weight, SimpleNamespace(backbone=hf)
    hid, own, dec = {}, {}, {}
    for d in range(1, int(depths.max()) + 1):
        nodes = [(i, k) for k in range(1, d + 1) for i in range(T) if depths[i] >= k]
        pos, nd = torch.tensor([i for i, _ in nodes]), torch.tensor([k for _, k in nodes])
        x = torch.stack([emb[ids[i]] if k == 1 else their_updater(upd_sd, emb[ids[i]], hid[(i, k - 1)])
                         for i, k in nodes])
        qi, qd, kj, kd = pos[:, None], nd[:, None], pos[None, :], nd[None, :]
        seen = {"duo": kd <= qd, "causal": (kd == 1) | ((kj == qi) & (kd <= qd)), "same_iter": kd == qd}[mode]
        out = grid_forward(net, x, pos, nd, (kj <= qi) & seen)
        for a, (i, k) in enumerate(nodes):
            if k == d:
                hid[(i, d)], own[(i, d)] = out[a], hf.lm_head(out[a])
                if d < M and dec_sd is not None:
                    dec[(i, d)] = their_decider(dec_sd, emb[ids[i]], out[a], own[(i, d)])
    logp = []
    for i in range(T):
        n, R, terms = int(depths[i]), 1.0, []
        for d in range(1, n + 1):
            if method == "even_mix":
                w = 1.0 / n
            else:  # w_d = R_d (1 - c_d) if the token continues past d, R_d where it stops
                c = 1 / (1 + math.exp(-dec[(i, d)])) if d < n else 0.0
                w, R = R * (1 - c), R * c
            terms.append(math.log(w) + torch.log_softmax(own[(i, d)], -1))
        logp.append(torch.logsumexp(torch.stack(terms), 0))
    return torch.stack(logp), dec


def assert_logp_close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    """Log-probs to `tol` relative to their size (|log p| ~ 10, one fp32 ulp ~ 1e-6), probs absolute."""
    a, b = a.double(), b.double()
    assert float(((a - b).abs() / b.abs().clamp_min(1)).max()) <= tol
    assert float((a.exp() - b.exp()).abs().max()) <= tol


def _f64(sd: dict | None) -> dict | None:
    return None if sd is None else {k: v.double() for k, v in sd.items()}


# ------------------------------------------------------------------ conversions
@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each case written in their layout and converted with the CLI's main()."""
    root = tmp_path_factory.mktemp("tah2")
    out = {}
    for name, case in CASES.items():
        sd = write_tah2(root / name, **case)
        main([str(root / name), str(root / f"{name}-ours")])
        out[name] = (root / name, root / f"{name}-ours", *sd)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_forward_equals_their_formulas_on_the_source_weights(converted, name):
    case = CASES[name]
    src, dst, dec_sd, upd_sd = converted[name]
    M, always = case["max_iter"], case.get("decider") == "AlwaysIterDecider"
    model = TaHForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()  # bf16 -> fp32 is exact
    cfg = model.config
    assert (cfg.max_depth, cfg.combine, cfg.decider_kind, cfg.input_rule, cfg.depth_lora) == (
        M, case["method"], "tah2", "updater", False)
    assert cfg.depth_attention == {"duo": "duo_causal", "causal": "first_self", "same_iter": "current"}[case["mode"]]
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float64).eval()  # HF reads their files itself
    ids, mask = batch(B=3, T=10, padding="left", seed=21)
    v = mask.bool()
    depths = torch.full_like(ids, M) if always else random_depths(3, 10, M, hard_fraction=0.7, seed=22)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, depths=None if always else depths)  # fixed depth: its decider's
    assert torch.equal(out.depths[v], depths[v])
    for b in range(3):
        ref, ref_dec = reference(hf, None if always else _f64(dec_sd), _f64(upd_sd), ids[b][v[b]], depths[b][v[b]],
                                 M, case["mode"], case["method"])
        assert_logp_close(out.logits[b][v[b]], ref)
        got = out.decider_logits[b][v[b]]
        for (i, d), z in ref_dec.items():  # decider logits: ~1e-5 of fp32 noise alone (tests/test_tah2.py)
            assert abs(float(got[i, d - 1]) - z) / max(1.0, abs(z)) <= 5e-5
    if always:
        assert (out.decider_logits[v] == 0).all() and cfg.threshold == 0.0


def test_weights_land_bit_for_bit_and_the_head_stays_tied(converted):
    for name, (src, dst, dec_sd, upd_sd) in converted.items():
        upd = load_file(dst / "updater.safetensors")
        assert upd.keys() == upd_sd.keys() and all(upd[k].dtype == BF16 and torch.equal(upd[k], upd_sd[k]) for k in upd)
        dec = load_file(dst / "decider.safetensors")
        if CASES[name].get("decider") == "AlwaysIterDecider":
            assert all(bool((v == (1 if k.startswith("norm") else 0)).all()) for k, v in dec.items())
        else:  # the threshold buffer is a setting, not a weight
            assert dec.keys() == dec_sd.keys() - {"threshold"} and all(torch.equal(dec[k], dec_sd[k]) for k in dec)
        theirs, ours = load_file(src / "model.safetensors"), load_file(dst / "model.safetensors")
        assert "lm_head.weight" not in theirs and "lm_head.weight" not in ours
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
        assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in dst.rglob("*"))
        assert (dst / "tokenizer_config.json").is_file() and (dst / "generation_config.json").is_file()
    src, dst, dec_sd, upd_sd = converted["m2_duo"]
    model = TaHForCausalLM.from_pretrained(dst).eval()
    assert model.backbone.get_input_embeddings().weight.dtype == BF16  # config.json's dtype kept
    head, embed = model.backbone.lm_head.weight, model.backbone.get_input_embeddings().weight
    assert torch.equal(head, embed)
    assert torch.equal(embed, load_file(src / "model.safetensors")["model.embed_tokens.weight"])
    assert all(torch.equal(model.updater.state_dict()[k], upd_sd[k]) for k in upd_sd)
    assert all(torch.equal(model.decider.state_dict()[k], dec_sd[k]) for k in dec_sd if k != "threshold")


def test_threshold_is_theirs_as_their_bf16_decider_compares_it(converted):
    m2 = json.loads((converted["m2_duo"][1] / "tah_config.json").read_text())
    assert m2["threshold"] == 0.6015625 == float(torch.tensor(0.6).to(BF16))  # from the kwargs, cast by .to(bf16)
    m4 = json.loads((converted["m4_duo"][1] / "tah_config.json").read_text())
    assert m4["threshold"] == 0.69921875 == float(torch.tensor(0.7, dtype=BF16))  # no kwarg: the buffer's
    assert m2["tah2_decider"] == {"intermediate_size": I_DEC, "topk": H, "rms_norm_eps": 1e-6}
    assert m2["updater"] == {"intermediate_size": I_UPD, "rms_norm_eps": 1e-6}


def test_decider_driven_depths_follow_their_threshold(converted):
    """M = 2: the decision after depth 1 depends on depth 1 alone, so the reference's decider logits give
    the depths: 2 iff sigmoid(z) > 0.6015625."""
    src, dst, dec_sd, upd_sd = converted["m2_duo"]
    model = TaHForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float64).eval()
    ids, mask = batch(B=3, T=12, padding="left", seed=23)
    v = mask.bool()
    with torch.no_grad():
        free = model(ids, attention_mask=mask)
    decided = []
    for b in range(3):
        row = ids[b][v[b]]
        _, z = reference(hf, _f64(dec_sd), _f64(upd_sd), row, torch.full_like(row, 2), 2, "duo", "stop_prob_mix")
        for i in range(row.numel()):
            p = 1 / (1 + math.exp(-z[(i, 1)]))
            if abs(p - 0.6015625) > 1e-4:
                decided.append(p > 0.6015625)
                assert int(free.depths[b][v[b]][i]) == 1 + (p > 0.6015625)
    assert any(decided) and not all(decided)


def test_from_pretrained_loads_their_checkpoint_directly(converted, tmp_path, monkeypatch):
    src, dst, _, _ = converted["m4_duo"]
    monkeypatch.setenv("TAH_CACHE", str(tmp_path / "cache"))
    direct, ours = TaHForCausalLM.from_pretrained(src).eval(), TaHForCausalLM.from_pretrained(dst).eval()
    assert direct.config == ours.config
    ids, mask = batch(B=2, T=9, padding="left", seed=24)
    with torch.no_grad():
        a, b = direct(ids, attention_mask=mask), ours(ids, attention_mask=mask)
    assert torch.equal(a.depths, b.depths) and torch.equal(a.logits, b.logits)
    cached = Path(resolve_checkpoint(src))
    assert cached.parent == tmp_path / "cache" / "converted" and len(list(cached.parent.iterdir())) == 1


def test_cli_summary_names_what_it_converted_and_what_it_left(tmp_path, capsys):
    write_tah2(tmp_path / "src", max_iter=2, threshold=0.6, dec_kwargs={"uniform_init": True})
    main([str(tmp_path / "src"), str(tmp_path / "dst")])
    said = capsys.readouterr().out
    assert "converted authors' TaH2 checkpoint" in said and "max_depth=2" in said and "threshold=0.601562" in said
    for name in ("attn_implementation", "iter_attention_impl", "memory_lean_fp32_reductions", "train_loss",
                 "iter_label_generator", "iter_decider_kwargs.uniform_init"):
        assert name in said.split("not converted")[1]
    assert "eval_loss," not in said  # null fields are not listed


def test_fp32_side_modules_keep_their_values(tmp_path):
    """A bf16 backbone with an fp32 updater (their updater's class default): stored in fp32, not rounded."""
    _, upd_sd = write_tah2(tmp_path / "src", upd_dtype=torch.float32)
    summary = convert(tmp_path / "src", tmp_path / "dst")
    assert "weights torch.float32" in summary
    model = TaHForCausalLM.from_pretrained(tmp_path / "dst")
    assert model.backbone.get_input_embeddings().weight.dtype == torch.float32
    assert all(torch.equal(model.updater.state_dict()[k], upd_sd[k]) for k in upd_sd)
    assert not torch.equal(upd_sd["projection.weight"], upd_sd["projection.weight"].to(BF16).float())


# ------------------------------------------------------------------ refusals: nothing written, nothing run
class _RunsShell:
    """Pickles as a call of os.system: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _edit_bin(path: Path, **changes) -> None:
    obj = torch.load(path, weights_only=True)
    for key, fn in changes.items():
        obj[key] = fn(obj[key])
    torch.save(obj, path)


def test_hostile_pickles_are_refused_before_anything_runs(tmp_path):
    marker = tmp_path / "pwned"
    for name in ("iter_decider.bin", "input_updater.bin"):
        src = tmp_path / name
        write_tah2(src)
        _edit_bin(src / name, state_dict=lambda sd: sd | {"norm_last.weight": _RunsShell(marker)})
        for load in (lambda s=src: convert(s, tmp_path / "out"), lambda s=src: TaHForCausalLM.from_pretrained(s)):
            with pytest.raises(UnsafeCheckpointError, match="posix.system") as err:
                load()
            assert name in str(err.value)
    assert not marker.exists() and not (tmp_path / "out").exists()


REFUSALS = {
    "extra key": (dict(), {"input_updater.bin": dict(state_dict=lambda sd: sd | {"gate.weight": torch.zeros(2)})},
                  r"input_updater.bin: missing weights \[\], unexpected weights \['gate.weight'\]"),
    "missing key": (dict(), {"iter_decider.bin": dict(state_dict=lambda sd: {k: v for k, v in sd.items()
                                                                             if k != "score.weight"})},
                    r"missing weights \['score.weight'\]"),
    "wrong shape": (dict(), {"iter_decider.bin": dict(state_dict=lambda sd: sd | {
        "input_proj.weight": torch.zeros(H, 2 * H, dtype=BF16)})}, "iter_decider.bin does not fit.*input_proj"),
    "class mismatch": (dict(), {"input_updater.bin": dict(**{"class": lambda c: "IdentityUpdater"})},
                       "holds a IdentityUpdater"),
    "topk": (dict(dec_kwargs={"topk": 32}), {}, "topk=32 must equal the hidden size 64"),
    "stochastic": (dict(dec_kwargs={"stochastic_sampling": True}), {}, "stochastic_sampling"),
    "activation": (dict(dec_kwargs={"hidden_act": "gelu"}), {}, "hidden_act='gelu'"),
    "load_path": (dict(dec_kwargs={"load_path": "/ckpt/dec"}), {}, "load_path"),
    "attention mode": (dict(mode="bidirectional"), {}, "iter_attention_mode='bidirectional'"),
    "mix method": (dict(method="max_prob"), {}, "weighted_hidden_method='max_prob'"),
    "unknown decider": (dict(decider="MLPIterDecider"), {}, "iter_decider='MLPIterDecider'"),
    "fixed with stop_prob_mix": (dict(decider="AlwaysIterDecider", method="stop_prob_mix"), {}, "sigmoid\\(10\\)"),
    "eval decider": (dict(raw_changes={"eval_iter_decider": "AlwaysIterDecider"}), {}, "eval_iter_decider"),
    "updater norm off": (dict(raw_changes={"input_updater_kwargs": {"hidden_size": H, "intermediate_size": I_UPD,
                                                                    "enable_norm_out": False}}), {}, "enable_norm_out"),
    "depth 1": (dict(max_iter=1), {}, "depth-1 model"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_what_we_cannot_reproduce_is_refused_by_name(tmp_path, name):
    writer, edits, match = REFUSALS[name]
    src = tmp_path / "src"
    write_tah2(src, **writer)
    for file, changes in edits.items():
        _edit_bin(src / file, **changes)
    with pytest.raises(UnsupportedCheckpointError, match=match):
        convert(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no temporary directory left beside it either


def test_backbone_must_be_whole_safetensors(tmp_path):
    src = tmp_path / "src"
    write_tah2(src)
    with safe_open(src / "model.safetensors", "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedCheckpointError, match="missing_keys.*layers.1.mlp.up_proj"):
        convert(src, tmp_path / "dst")
    sd |= {"model.layers.1.mlp.up_proj.weight": torch.zeros(128, H, dtype=BF16),
           "lm_head.weight": torch.zeros(512, H, dtype=BF16)}
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedCheckpointError, match="lm_head.weight that differs"):
        convert(src, tmp_path / "dst")
    (src / "model.safetensors").unlink()
    with pytest.raises(UnsupportedCheckpointError, match="safetensors only"):
        convert(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
