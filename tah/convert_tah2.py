"""The authors' TaH2 checkpoints (thu-nics/TaH `tah2/`) -> this project's `TaHConfig.tah2` model, exactly.

Their layout: the HF Qwen3 files (`model.safetensors` with the tied `lm_head.weight` dropped),
`tah_config.json` (their TaHConfig; dtypes encoded as {"__dtype__": true, "__str__": ...}),
`iter_decider.bin` and `input_updater.bin` (torch.save({"class", "state_dict", "init_args"}), read
here only through tah/convert.py's safe loader). The mapping, following their from_pretrained:

- `max_iter` -> max_depth (the decider's own max_iter, when set, caps it too); `iter_attention_mode`
  duo / causal / same_iter -> depth_attention duo_causal / first_self / current;
  `weighted_hidden_method` stop_prob_mix / even_mix -> combine.
- `Qwen3MLPIterDecider` kwargs (hidden_size, intermediate_size, topk == hidden size, rms_norm_eps) ->
  tah2_decider; `Qwen3MLPUpdater` kwargs -> updater. Their state_dict keys are ours
  (tah/decider.py:Tah2Decider, tah/updater.py:InputUpdater); keys named like an init arg are skipped as
  their loader does, and what remains must be exactly our module's weights.
- The threshold is theirs as their decider compares it: a float32 buffer cast to the decider's dtype
  (bf16: 0.6 -> 0.6015625), from the kwargs or else the state_dict's `threshold` buffer.
- A fixed-depth `AlwaysIterDecider` with `even_mix` becomes a decider that always says continue
  (zero weights: logit 0, p = 0.5 > threshold 0; a threshold override >= 0.5 would undo that).
- dtype: weight values are kept bit for bit. The converted checkpoint stores the backbone's dtype
  (config.json's: bf16 for their releases) unless a decider/updater tensor would round in it, then
  float32. Load with `dtype=torch.float32` for exact fp32 values (bf16 -> fp32 is exact). Their
  decider computes in bf16 and their updater in fp32; ours compute in the model's dtype.
- Not converted, because the forward's values do not depend on them (listed in the summary):
  attention kernels, memory_lean_fp32_reductions, losses, label generator, the decider's init and
  warm-up. Settings that do and that our model cannot reproduce (stochastic decisions, another
  eval_iter_decider, updater norms switched off, other activations, AlwaysIterDecider with
  stop_prob_mix, ...) are refused by name with `UnsupportedCheckpointError`.

    python -m tah.convert SRC DST    # (tah/convert.py's entry point dispatches here)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .config import Tah2DeciderSettings, TaHConfig, UpdaterSettings
from .convert import (
    TAH2_UPDATER,
    TAH_CONFIG,
    V1_DECIDER,
    UnsupportedCheckpointError,
    _name_is,
    _refuse,
    _tokenizer,
    decode_config,
    load_pickled_state,
)

# Their Qwen3MLPIterDecider's constructor defaults (thu-nics/TaH tah2/model/iter_decider.py): their
# loader builds it from tah_config.json's iter_decider_kwargs (+ max_iter), so an absent key takes these.
TAH2_DECIDER_DEFAULTS: dict[str, Any] = {
    "hidden_size": 2048, "intermediate_size": 2048, "topk": 2048, "hidden_act": "silu", "rms_norm_eps": 1e-6,
    "threshold": 0.5, "dtype": torch.bfloat16, "uniform_init": False, "stochastic_sampling": False,
    "base_warmup_steps": 0, "memory_lean_fp32_reductions": False}
# Their Qwen3MLPUpdater's (tah2/model/input_updater.py); hidden_size and intermediate_size have none.
TAH2_UPDATER_DEFAULTS: dict[str, Any] = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "enable_norm_pre_mlp": True,
                                         "enable_norm_out": True}
_MLP_KEYS = {"mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"}
TAH2_DECIDER_KEYS = {"norm_first.weight", "norm_last.weight", "norm_l.weight", "norm_out.weight", "input_proj.weight",
                     "score.weight"} | _MLP_KEYS
TAH2_UPDATER_KEYS = {"projection.weight", "norm_prev.weight", "norm_last.weight", "norm_pre_mlp.weight",
                     "norm_out.weight"} | _MLP_KEYS
TAH2_ATTENTION = {"duo": "duo_causal", "causal": "first_self", "same_iter": "current"}
# Fields of their TaHConfig that leave the forward's values unchanged: attention kernels, an fp32
# reduction of the same sums, what only training reads (losses, labels, the decider's init and warm-up).
_TAH2_NOT_FORWARD = {"attn_implementation", "iter_attention_impl", "memory_lean_fp32_reductions", "train_loss",
                     "train_loss_kwargs", "eval_loss", "eval_loss_kwargs", "iter_label_generator",
                     "iter_label_generator_kwargs", "eval_iter_decider_kwargs"}
_TAH2_FIELDS = {"embedding_key", "max_iter", "iter_decider", "input_updater", "eval_iter_decider",
                "iter_attention_mode", "weighted_hidden_method", "iter_decider_kwargs", "input_updater_kwargs"}
_TAH2_DECIDER_NOT_FORWARD = {"uniform_init", "base_warmup_steps", "memory_lean_fp32_reductions"}


def _int(value: Any, what: str, src: Path) -> int:
    if type(value) is not int:
        raise _refuse(src, f"{what}={value!r} is not an integer")
    return value


def _tah2_weights(sd: dict[str, torch.Tensor], expected: set[str], skipped: set[str], name: str,
                  src: Path) -> dict[str, torch.Tensor]:
    """A component's state_dict as their loader applies it (keys named like one of its init args are
    skipped; the decider's `threshold` buffer is a setting, read elsewhere), which must then be exactly
    our module's weights: a missing one would stay at its random init, an extra one be lost."""
    kept = {k: v for k, v in sd.items() if k not in skipped}
    missing, extra = sorted(expected - set(kept)), sorted(set(kept) - expected)
    if missing or extra:
        raise _refuse(src, f"{name}: missing weights {missing}, unexpected weights {extra}")
    for k, v in kept.items():
        if not v.is_floating_point():
            raise _refuse(src, f"{name}: weight {k!r} has dtype {v.dtype}")
    return kept


def tah2_config(raw: dict[str, Any], decider: dict[str, Any], updater: dict[str, Any], hidden_size: int,
                src: Path) -> tuple[TaHConfig, dict[str, torch.Tensor] | None, dict[str, torch.Tensor], list[str]]:
    """TaHConfig equal in behaviour to their TaHForCausalLM.from_pretrained (eval mode) over this
    checkpoint; the decider's weights (None: the always-continue decider, built from the model), the
    updater's weights, and what was read but does not act on the forward (named in the summary)."""
    ignored = [k for k in sorted(set(raw) & _TAH2_NOT_FORWARD) if raw[k] not in (None, "", {}, [], False)]
    # Their loader keeps only their TaHConfig's fields: anything else in the file has no effect there either.
    ignored += [f"{k} (not a field of their TaHConfig)" for k in sorted(set(raw) - _TAH2_FIELDS - _TAH2_NOT_FORWARD)]
    for key, allowed in (("embedding_key", (None, "model.embed_tokens")), ("input_updater", ("Qwen3MLPUpdater",)),
                         ("iter_decider", ("Qwen3MLPIterDecider", "AlwaysIterDecider"))):
        if not _name_is(raw.get(key), *allowed):
            raise _refuse(src, f"{key}={raw.get(key)!r}; supported: {[a for a in allowed if a]}")
    for state, key, name in ((decider, "iter_decider", V1_DECIDER), (updater, "input_updater", TAH2_UPDATER)):
        if state["class"] and not _name_is(state["class"], raw[key]):  # their loader would build the config's
            raise _refuse(src, f"{name} holds a {state['class']} but {TAH_CONFIG} says {key}={raw[key]!r}")
    # At inference their model runs eval_iter_decider when it names another decider (a list: its first).
    ev = raw.get("eval_iter_decider")
    ev = (ev[0] if ev else None) if isinstance(ev, list) else ev
    if ev not in (None, "iter_decider", "self.iter_decider"):
        raise _refuse(src, f"eval_iter_decider={raw.get('eval_iter_decider')!r}: inference would use another "
                           "decider than the trained one")
    mode = raw.get("iter_attention_mode", "causal")  # their TaHConfig's defaults
    method = raw.get("weighted_hidden_method", "stop_prob_mix")
    if mode not in TAH2_ATTENTION:
        raise _refuse(src, f"iter_attention_mode={mode!r}; supported: {sorted(TAH2_ATTENTION)}")
    if method not in ("stop_prob_mix", "even_mix"):
        raise _refuse(src, f"weighted_hidden_method={method!r}; supported: stop_prob_mix, even_mix")
    max_iter = _int(raw.get("max_iter"), "max_iter", src)
    dkw = dict(raw.get("iter_decider_kwargs") or {})
    if "load_path" in dkw:
        raise _refuse(src, f"iter_decider_kwargs.load_path={dkw['load_path']!r}: their loader reads the decider "
                           "from there, not from this checkpoint")
    dkw.setdefault("max_iter", max_iter)  # their loader's init args; the decider stops every token at its max_iter
    max_depth = min(max_iter, _int(dkw["max_iter"], "iter_decider_kwargs.max_iter", src))
    if max_depth < 2:
        raise _refuse(src, f"max_iter={max_iter} (decider {dkw['max_iter']}): a depth-1 model; load its "
                           "model.safetensors as a plain HF model")
    dsd = decider["state_dict"]
    if _name_is(raw["iter_decider"], "AlwaysIterDecider"):  # fixed depth: every token runs max_depth
        unknown = sorted(set(dkw) - {"max_iter", "threshold", "memory_lean_fp32_reductions"})
        if unknown:
            raise _refuse(src, f"iter_decider_kwargs {unknown}: AlwaysIterDecider takes no such argument")
        if method != "even_mix":
            raise _refuse(src, "AlwaysIterDecider with stop_prob_mix: its fixed logit +10 weights the depths by "
                               "sigmoid(10), which our decider (no bias) cannot output")
        _tah2_weights(dsd, set(), set(dkw) | {"threshold"}, V1_DECIDER, src)
        # A decider with zero weights says logit 0, p = 0.5 > threshold 0: continue, every token, every depth.
        dec_settings, threshold, dec_w = Tah2DeciderSettings(intermediate_size=1, topk=1), 0.0, None
    else:
        kw = {**TAH2_DECIDER_DEFAULTS, **dkw}
        ignored += [f"iter_decider_kwargs.{k}" for k in sorted(set(dkw) & _TAH2_DECIDER_NOT_FORWARD)]
        # Their constructor takes **kwargs: a name it does not know changes nothing there.
        ignored += [f"iter_decider_kwargs.{k} (unused by their decider)"
                    for k in sorted(set(dkw) - set(TAH2_DECIDER_DEFAULTS) - {"max_iter"})]
        if kw["hidden_act"] != "silu":
            raise _refuse(src, f"iter_decider_kwargs.hidden_act={kw['hidden_act']!r}; supported: silu")
        if kw["stochastic_sampling"]:
            raise _refuse(src, "iter_decider_kwargs.stochastic_sampling=true (decisions drawn from Bernoulli(p); "
                               "ours compare p with the threshold)")
        if _int(kw["hidden_size"], "iter_decider_kwargs.hidden_size", src) != hidden_size:
            raise _refuse(src, f"iter_decider_kwargs.hidden_size={kw['hidden_size']} but the backbone's hidden "
                               f"size is {hidden_size}")
        if _int(kw["topk"], "iter_decider_kwargs.topk", src) != hidden_size:
            raise _refuse(src, f"iter_decider_kwargs.topk={kw['topk']} must equal the hidden size {hidden_size} "
                               "(their norm_l and input_proj are sized by the hidden size)")
        dtype = kw["dtype"]
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise _refuse(src, f"iter_decider_kwargs.dtype={dtype!r} is not a floating dtype")
        # Their threshold is a float32 buffer cast by `self.to(dtype)` and compared with an fp32 sigmoid;
        # a threshold among the init args wins over the state_dict's (their loader skips that key).
        if "threshold" in dkw or "threshold" not in dsd:
            threshold = float(torch.tensor(float(kw["threshold"]), dtype=torch.float32).to(dtype))
        else:
            threshold = float(dsd["threshold"].to(dtype))
        dec_w = _tah2_weights(dsd, TAH2_DECIDER_KEYS, set(dkw) | {"threshold"}, V1_DECIDER, src)
        dec_settings = Tah2DeciderSettings(intermediate_size=_int(kw["intermediate_size"], "intermediate_size", src),
                                           topk=kw["topk"], rms_norm_eps=float(kw["rms_norm_eps"]))
    # Their updater's init args: tah_config.json's input_updater_kwargs, or the file's own when empty.
    ukw = dict(raw.get("input_updater_kwargs") or updater["init_args"])
    unknown = sorted(set(ukw) - set(TAH2_UPDATER_DEFAULTS) - {"hidden_size", "intermediate_size"})
    if unknown or not {"hidden_size", "intermediate_size"} <= set(ukw):
        raise _refuse(src, f"input_updater_kwargs {sorted(ukw)}: Qwen3MLPUpdater needs hidden_size and "
                           f"intermediate_size and takes no {unknown}")
    ukw = {**TAH2_UPDATER_DEFAULTS, **ukw}
    if ukw["hidden_act"] != "silu" or not ukw["enable_norm_pre_mlp"] or not ukw["enable_norm_out"]:
        raise _refuse(src, f"input_updater_kwargs hidden_act={ukw['hidden_act']!r} enable_norm_pre_mlp="
                           f"{ukw['enable_norm_pre_mlp']} enable_norm_out={ukw['enable_norm_out']}; supported: "
                           "silu with both norms")
    if _int(ukw["hidden_size"], "input_updater_kwargs.hidden_size", src) != hidden_size:
        raise _refuse(src, f"input_updater_kwargs.hidden_size={ukw['hidden_size']} but the backbone's hidden "
                           f"size is {hidden_size}")
    upd_w = _tah2_weights(updater["state_dict"], TAH2_UPDATER_KEYS, set(ukw), TAH2_UPDATER, src)
    upd_settings = UpdaterSettings(intermediate_size=_int(ukw["intermediate_size"], "intermediate_size", src),
                                   rms_norm_eps=float(ukw["rms_norm_eps"]))
    config = TaHConfig.tah2(max_depth=max_depth, threshold=threshold, combine=method,
                            depth_attention=TAH2_ATTENTION[mode], tah2_decider=dec_settings, updater=upd_settings)
    return config, dec_w, upd_w, ignored


def _check_tied_head(src: Path, tied: bool) -> None:
    """Their model.safetensors drops lm_head.weight when the head is tied (HF re-ties it on load). One
    that keeps a head under tie_word_embeddings must hold the embedding, or re-tying would lose it."""
    from safetensors import safe_open

    index = src / "model.safetensors.index.json"
    where = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    keys = set(where) if where is not None else set(safe_open(src / "model.safetensors", "pt").keys())
    if not tied or "lm_head.weight" not in keys:
        return

    def tensor(key: str) -> torch.Tensor:
        return safe_open(src / (where[key] if where else "model.safetensors"), "pt").get_tensor(key)

    if not torch.equal(tensor("lm_head.weight"), tensor("model.embed_tokens.weight")):
        raise _refuse(src, "tie_word_embeddings is set but model.safetensors holds an lm_head.weight that differs "
                           "from model.embed_tokens.weight")


def _exact_in(tensors: list[torch.Tensor], dtype: torch.dtype) -> bool:
    return all(torch.equal(t.to(dtype).to(t.dtype), t) for t in tensors)


def convert_tah2(src: Path, dst: str) -> str:
    """Convert the TaH2 checkpoint in local directory `src` into this project's at `dst` (written
    atomically by TaHForCausalLM.save_pretrained); returns a one-line summary."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .model import TaHForCausalLM

    for name in (TAH_CONFIG, V1_DECIDER, "config.json"):
        if not (src / name).is_file():
            raise _refuse(src, f"no {name}")
    raw = decode_config(json.loads((src / TAH_CONFIG).read_text()))
    if not isinstance(raw, dict):
        raise _refuse(src, f"{TAH_CONFIG} is not a mapping")
    decider, updater = load_pickled_state(src / V1_DECIDER), load_pickled_state(src / TAH2_UPDATER)
    if not any((src / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")):
        raise _refuse(src, "no model.safetensors: the backbone is read from safetensors only")
    hf_cfg = AutoConfig.from_pretrained(src)
    try:
        config, dec_w, upd_w, ignored = tah2_config(raw, decider, updater, int(hf_cfg.hidden_size), src)
    except (TypeError, ValueError, KeyError) as e:
        if isinstance(e, UnsupportedCheckpointError):
            raise
        raise _refuse(src, f"malformed {TAH_CONFIG} or component file: {e!r}") from None
    _check_tied_head(src, bool(getattr(hf_cfg, "tie_word_embeddings", False)))
    backbone, info = AutoModelForCausalLM.from_pretrained(src, dtype="auto", use_safetensors=True,
                                                          output_loading_info=True)
    bad = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(bad.values()):
        raise _refuse(src, f"model.safetensors does not fit config.json's {type(backbone).__name__}: {bad}")
    side = [*(dec_w or {}).values(), *upd_w.values()]
    if not _exact_in(side, backbone.get_input_embeddings().weight.dtype):
        # Weights keep their values: a backbone in bf16 with fp32 side modules is stored in fp32 (exact).
        if not _exact_in(side, torch.float32):
            raise _refuse(src, "decider/updater weights are not exactly representable in float32")
        backbone = backbone.to(torch.float32)
        backbone.config.dtype = torch.float32
    model = TaHForCausalLM(backbone, config)
    if dec_w is None:  # the always-continue decider: zero weights, unit norms
        dec_w = {k: torch.ones_like(v) if k.startswith("norm") else torch.zeros_like(v)
                 for k, v in model.decider.state_dict().items()}
    for module, weights, name in ((model.decider, dec_w, V1_DECIDER), (model.updater, upd_w, TAH2_UPDATER)):
        try:
            module.load_state_dict(weights, strict=True)
        except RuntimeError as e:  # shapes that disagree with the kwargs
            raise _refuse(src, f"{name} does not fit the module its config describes: {' '.join(str(e).split())}") \
                from None
    model.save_pretrained(dst, tokenizer=_tokenizer(src))
    d, u = config.tah2_decider, config.updater
    return (f"converted authors' TaH2 checkpoint {src} -> {dst}: max_depth={config.max_depth}, "
            f"depth_attention={config.depth_attention}, combine={config.combine}, decider={raw['iter_decider']} "
            f"threshold={config.threshold:g} (intermediate {d.intermediate_size}, top-k {d.topk}), updater "
            f"intermediate {u.intermediate_size}, weights {model.backbone.get_input_embeddings().weight.dtype}"
            + (f"; not converted (no effect on the forward): {', '.join(ignored)}" if ignored else ""))
