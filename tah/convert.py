"""The authors' released TaH checkpoints (v1 and TaH2) -> this project's format, without unpickling code.

The authors (thu-nics/TaH) save the decider (and TaH2's updater) with `torch.save`, a pickle: loading
one the ordinary way runs whatever the file says. Here every `.bin` is read with
`torch.load(weights_only=True)` (tensors, plain containers, strings, numbers, dtypes only) and then
checked for the exact shape their code writes; anything else is refused with `UnsafeCheckpointError`
naming the file and what it held.

v1 (tah_config.json with `max_iter`, iter_decider.bin, lora/, the HF backbone files) converts exactly:
their `MLPIterDecider` weights are renamed onto `tah.decider.IterationDecider` and their config onto
`TaHConfig`; what our model cannot represent (input LayerNorm, unequal block widths, a separate
decider top-k, ...) is refused by name rather than approximated.

TaH2 (thu-nics/TaH `tah2/`: tah_config.json, iter_decider.bin, input_updater.bin, model.safetensors
with the tied head dropped) converts exactly onto `TaHConfig.tah2` (tah/convert_tah2.py, which
describes the mapping), through the same safe reader.

    python -m tah.convert SRC DST        # SRC, DST: local directories or s3:// prefixes
    TaHForCausalLM.from_pretrained(SRC)  # the same, converted once into $TAH_CACHE/converted/
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from . import storage
from .config import DeciderSettings, LoraSettings, TaHConfig

log = logging.getLogger(__name__)

TAH_CONFIG = "tah_config.json"
V1_DECIDER = "iter_decider.bin"
TAH2_UPDATER = "input_updater.bin"

# Their MLPIterDecider's constructor defaults (thu-nics/TaH tah/model/iter_decider.py): their loader
# builds the decider from tah_config.json's iter_decider_kwargs alone, so a key absent there takes these.
V1_DECIDER_DEFAULTS: dict[str, Any] = {
    "topk": 100, "hidden_states_size": 1024, "hidden_states_layer_nums": [16, 20, 24, 28],
    "hidden_dims": [256, 512, 256], "expansion_factor": 4, "dropout_rate": 0.3, "normalize_input": False,
    "threshold": 0.5, "max_iter": 3,
}

# Their state_dict keys -> tah.decider.IterationDecider's (same modules, same order, same math).
_V1_RENAMES = [
    (re.compile(r"logits_projection\.(weight|bias)"), r"logit_proj.\1"),
    (re.compile(r"combined_projection\.(weight|bias)"), r"inp.\1"),
    (re.compile(r"backbone\.input_projection\.(weight|bias)"), r"mid.\1"),
    (re.compile(r"backbone\.blocks\.(\d+)\.layer_norm\.(weight|bias)"), r"blocks.\1.norm.\2"),
    (re.compile(r"backbone\.blocks\.(\d+)\.mlp\.0\.(weight|bias)"), r"blocks.\1.fc1.\2"),
    (re.compile(r"backbone\.blocks\.(\d+)\.mlp\.3\.(weight|bias)"), r"blocks.\1.fc2.\2"),
    (re.compile(r"backbone\.output_layer\.0\.(weight|bias)"), r"norm.\1"),
    (re.compile(r"backbone\.output_layer\.1\.(weight|bias)"), r"head.\1"),
]
# Keys that exist only for settings our decider does not have: refused with the reason.
_V1_UNREPRESENTABLE = [
    (re.compile(r"layer_norm_hidden_states\..*"),
     "normalize_input=true (a LayerNorm over the hidden states and a softmax over the top-k logits)"),
    (re.compile(r"backbone\.blocks\.\d+\.dim_change\..*"), "blocks of unequal width (hidden_dims not all equal)"),
]


class UnsafeCheckpointError(ValueError):
    """A pickled checkpoint file holds something other than tensors and plain data."""


class UnsupportedCheckpointError(ValueError):
    """A checkpoint this project cannot represent exactly (converted approximately it would mislead)."""


# --------------------------------------------------------------------------------- safe reading


def load_pickled(path: str | Path) -> Any:
    """A `torch.save` file read with weights_only=True: no global outside torch's tensor/container
    allowlist is ever called, so a hostile file is refused before it can run anything."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError, EOFError) as e:
        # torch's message advises weights_only=False / add_safe_globals: the opposite of what to do here.
        found = re.findall(r"GLOBAL ([\w.]+)", str(e))
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(\n\n|$)", str(e))
        what = (f"the global {found[0]!r}" if found else
                f"content the safe loader rejects ({detail.group(1) if detail else type(e).__name__})")
        raise UnsafeCheckpointError(
            f"{path}: refused to unpickle {what}; only tensors, plain containers, strings, numbers and "
            "dtypes are read from .bin files (it was not loaded, nothing in it ran)") from None


def _check_plain(value: Any, where: str, depth: int = 0) -> None:
    """Raise unless `value` is None/bool/int/float/str/torch.dtype or lists/tuples/dicts of those."""
    if depth > 8:
        raise UnsafeCheckpointError(f"{where}: nested too deeply")
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise UnsafeCheckpointError(f"{where}: key {k!r} is not a string")
            _check_plain(v, f"{where}.{k}", depth + 1)
        return
    raise UnsafeCheckpointError(f"{where}: a {type(value).__name__}, not plain data")


def _check_tensors(sd: Any, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(sd, dict):
        raise UnsafeCheckpointError(f"{where}: expected a dict of tensors, got a {type(sd).__name__}")
    for k, v in sd.items():
        if not isinstance(k, str) or type(v) not in (torch.Tensor, torch.nn.Parameter):
            raise UnsafeCheckpointError(f"{where}: entry {k!r} is a {type(v).__name__}, not a tensor")
    return dict(sd)


def load_pickled_state(path: str | Path) -> dict[str, Any]:
    """An authors' component file: {"state_dict": {str: tensor}, "class": str, "init_args": {plain}}
    ("class" and "init_args" optional), read safely and checked; anything else is refused."""
    obj = load_pickled(path)
    if not isinstance(obj, dict):
        raise UnsafeCheckpointError(f"{path}: expected a dict with 'state_dict', got a {type(obj).__name__}")
    extra = sorted(set(map(str, obj)) - {"class", "state_dict", "init_args"})
    if extra or "state_dict" not in obj:
        raise UnsafeCheckpointError(f"{path}: expected keys state_dict (+ class, init_args), got {sorted(map(str, obj))}")
    if not isinstance(obj.get("class", ""), str):
        raise UnsafeCheckpointError(f"{path}: 'class' is a {type(obj['class']).__name__}, not a string")
    init_args = obj.get("init_args", {})
    if not isinstance(init_args, dict):
        raise UnsafeCheckpointError(f"{path}: 'init_args' is a {type(init_args).__name__}, not a dict")
    _check_plain(init_args, f"{path}: init_args")
    return {"class": obj.get("class"), "state_dict": _check_tensors(obj["state_dict"], f"{path}: state_dict"),
            "init_args": dict(init_args)}


_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


def decode_config(obj: Any) -> Any:
    """Their tah_config.json with its encodings undone as plain values: {"__dtype__": true, "__str__":
    "torch.bfloat16"} -> torch.bfloat16 (from a fixed table), {"__type__": true, ...} -> the string
    "module.name". Nothing is evaluated or imported."""
    if isinstance(obj, dict):
        if obj.get("__dtype__") is True:
            return _DTYPES.get(str(obj.get("__str__")), str(obj.get("__str__")))
        if obj.get("__type__") is True:
            return f"{obj.get('__module__')}.{obj.get('__name__')}"
        return {k: decode_config(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_config(v) for v in obj]
    return obj


def detect_format(path: str | Path) -> str:
    """'tah' (this project's), 'v1' or 'tah2' (the authors'), or 'unknown', from a local directory."""
    path = Path(path)
    if (path / TAH2_UPDATER).is_file():
        return "tah2"
    if not (path / TAH_CONFIG).is_file():
        return "unknown"
    raw = json.loads((path / TAH_CONFIG).read_text())
    if "max_depth" in raw:
        return "tah"
    if "max_iter" in raw and (path / V1_DECIDER).is_file():
        return "v1"
    return "unknown"


# --------------------------------------------------------------------------------- v1 mapping


def _refuse(src: Path, why: str) -> UnsupportedCheckpointError:
    return UnsupportedCheckpointError(f"{src}: cannot convert exactly: {why}")


def _name_is(value: Any, *allowed: str | None) -> bool:
    return value in allowed or (isinstance(value, str) and value.lower() in {a.lower() for a in allowed if a})


def map_v1_decider_state(sd: dict[str, torch.Tensor], src: Path) -> dict[str, torch.Tensor]:
    """Their MLPIterDecider state_dict -> IterationDecider's keys (the `threshold` parameter is a
    setting, read into TaHConfig.threshold, not a weight)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key == "threshold":
            continue
        for pattern, why in _V1_UNREPRESENTABLE:
            if pattern.fullmatch(key):
                raise _refuse(src, f"the decider uses {why} ({key})")
        new = next((p.sub(r, key) for p, r in _V1_RENAMES if p.fullmatch(key)), None)
        if new is None:
            raise _refuse(src, f"unknown decider weight {key!r}")
        if not value.is_floating_point():
            raise _refuse(src, f"decider weight {key!r} has dtype {value.dtype}")
        out[new] = value
    return out


def v1_config(raw: dict[str, Any], decider_sd: dict[str, torch.Tensor], num_layers: int, hidden_size: int,
              vocab_size: int, adapter_config: dict[str, Any], src: Path) -> TaHConfig:
    """TaHConfig equal in behaviour to their TaHForCausalLM.from_pretrained over this checkpoint."""
    for key, allowed in (("iter_decider", ("MLPIterDecider",)), ("eval_iter_decider", (None, "", "iter_decider")),
                         ("adapter", (None, "lora")), ("input_updater", (None, "TrivialUpdater")),
                         ("output_updater", (None, "AdditiveLogitsUpdater")), ("iter_attention_mode", (None, "duo")),
                         ("embedding_key", (None, "model.embed_tokens"))):
        if not _name_is(raw.get(key), *allowed):
            hint = " (a step-1 checkpoint: depths came from oracle labels, no decider was trained)" \
                if _name_is(raw.get(key), "IterLabelDecider") else ""
            raise _refuse(src, f"{key}={raw.get(key)!r}{hint}; supported: {[a for a in allowed if a]}")
    given = dict(raw.get("iter_decider_kwargs") or {})
    kw = {**V1_DECIDER_DEFAULTS, **given}
    if kw["normalize_input"]:
        raise _refuse(src, "iter_decider_kwargs.normalize_input=true (LayerNorm + softmax on the decider's inputs)")
    upd = dict(raw.get("input_updater_kwargs") or {})
    if upd.get("use_hidden_states"):
        raise _refuse(src, "input_updater_kwargs.use_hidden_states=true (deeper inputs from hidden states)")
    # The release code defaults the soft-input top-k to 100; the paper-era TrivialUpdater without a
    # top-k mixed the whole vocabulary.
    soft_topk = upd.get("topk", None if "input_updater" in raw else 100)
    if soft_topk is None:
        raise _refuse(src, "the deeper-depth input mixes the whole vocabulary (input_updater_kwargs.topk unset)")
    if int(soft_topk) != int(kw["topk"]) or int(kw["topk"]) > vocab_size:
        raise _refuse(src, f"decider top-k {kw['topk']} and soft-input top-k {soft_topk} must be equal and "
                           f"<= the vocabulary ({vocab_size}): one setting here drives both")
    if int(kw["hidden_states_size"]) != hidden_size:
        raise _refuse(src, f"iter_decider_kwargs.hidden_states_size={kw['hidden_states_size']} but the "
                           f"backbone's hidden size is {hidden_size}")
    dims = list(kw["hidden_dims"])
    if not dims or len(set(dims)) != 1:
        raise _refuse(src, f"hidden_dims={dims}: our decider's blocks all have one width")
    # Their decider with no layer list reads the last hidden state (HF index L, after the final norm).
    layers = [int(i) for i in kw["hidden_states_layer_nums"]] or [num_layers]
    if any(not 0 <= i <= num_layers for i in layers):
        raise _refuse(src, f"hidden_states_layer_nums={layers} outside 0..{num_layers}")
    # The decider stops every token at its own max_iter (constructor default 3), the loop at max_iter.
    max_depth = min(int(raw["max_iter"]), int(kw["max_iter"]))
    # Their loader skips state_dict keys that are also init args: a configured threshold wins. (Their
    # module stores it as a bf16 parameter, 0.9 -> 0.8984375, compared with a bf16 sigmoid; the nominal
    # value is kept, which is as close to that comparison as an fp32 sigmoid gets.)
    if "threshold" in given:
        threshold = float(given["threshold"])
    elif "threshold" in decider_sd:
        threshold = float(decider_sd["threshold"].float())
    else:
        threshold = float(V1_DECIDER_DEFAULTS["threshold"])
    ak = dict(raw.get("adapter_kwargs") or {})
    for where, cfg in (("adapter_kwargs", ak), ("lora/adapter_config.json", adapter_config)):
        if cfg.get("bias", "none") != "none" or cfg.get("use_dora") or cfg.get("modules_to_save"):
            raise _refuse(src, f"{where}: LoRA bias / DoRA / modules_to_save are not supported "
                               f"(bias={cfg.get('bias')!r}, use_dora={cfg.get('use_dora')!r}, "
                               f"modules_to_save={cfg.get('modules_to_save')!r})")
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise _refuse(src, f"lora/ holds a {adapter_config.get('peft_type')} adapter, not LoRA")
    # peft loads lora/adapter_config.json, so its values are the ones that act.
    alpha = adapter_config.get("lora_alpha", ak.get("lora_alpha", 32))
    if alpha != int(alpha):
        raise _refuse(src, f"lora_alpha={alpha} is not an integer")
    lora = LoraSettings(r=int(adapter_config.get("r", ak.get("r", 16))), alpha=int(alpha),
                        dropout=float(adapter_config.get("lora_dropout", ak.get("lora_dropout", 0.0))),
                        target_modules=ak.get("target_modules", adapter_config.get("target_modules", "all-linear")))
    decider = DeciderSettings(layers=layers, width=int(dims[0]), blocks=len(dims),
                              mlp_ratio=int(kw["expansion_factor"]), dropout=float(kw["dropout_rate"]))
    return TaHConfig(max_depth=max_depth, soft_input_topk=int(soft_topk), threshold=threshold, lora=lora,
                     decider=decider, depth_attention="duo_causal")


def _safe_lora_dir(lora: Path, tmp: Path) -> Path:
    """lora/ as peft should read it: a pickled adapter_model.bin is re-read safely and written as
    safetensors into a copy, so no pickle reaches peft."""
    if (lora / "adapter_model.safetensors").is_file() or not (lora / "adapter_model.bin").is_file():
        return lora
    from safetensors.torch import save_file

    out = tmp / "lora"
    out.mkdir()
    shutil.copy(lora / "adapter_config.json", out / "adapter_config.json")
    sd = _check_tensors(load_pickled(lora / "adapter_model.bin"), str(lora / "adapter_model.bin"))
    save_file({k: v.contiguous() for k, v in sd.items()}, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


def _tokenizer(src: Path) -> Any:
    """The checkpoint's tokenizer (saved beside the converted model, which then serves as it is), or None."""
    if not (src / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(src)


def _convert_v1(src: Path, dst: str) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM

    from .model import TaHForCausalLM

    raw = decode_config(json.loads((src / TAH_CONFIG).read_text()))
    state = load_pickled_state(src / V1_DECIDER)
    if state["class"] and not _name_is(state["class"], "MLPIterDecider"):
        raise _refuse(src, f"{V1_DECIDER} holds a {state['class']}, not an MLPIterDecider")
    if not (src / "lora" / "adapter_config.json").is_file():
        raise _refuse(src, "no lora/adapter_config.json (the depth-2 adapter)")
    adapter_config = json.loads((src / "lora" / "adapter_config.json").read_text())
    hf_cfg = AutoConfig.from_pretrained(src)
    try:
        config = v1_config(raw, state["state_dict"], hf_cfg.num_hidden_layers, hf_cfg.hidden_size,
                           int(hf_cfg.vocab_size), adapter_config, src)
    except (TypeError, ValueError, KeyError) as e:
        if isinstance(e, UnsupportedCheckpointError):
            raise
        raise _refuse(src, f"malformed {TAH_CONFIG} or lora/adapter_config.json: {e!r}") from None
    weights = map_v1_decider_state(state["state_dict"], src)  # refuses before the backbone is loaded
    tokenizer = _tokenizer(src)
    with tempfile.TemporaryDirectory() as tmp:
        backbone = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
        model = TaHForCausalLM(backbone, config, lora_path=_safe_lora_dir(src / "lora", Path(tmp))
                               if config.max_depth >= 2 else None)
        if model.decider is not None:
            try:
                model.decider.load_state_dict(weights, strict=True)
            except RuntimeError as e:  # missing / unexpected keys, shapes that disagree with the config
                raise _refuse(src, f"{V1_DECIDER} does not fit the decider its config describes: {e}") from None
        model.save_pretrained(dst, tokenizer=tokenizer)
    d = config.decider
    return (f"converted authors' v1 checkpoint {src} -> {dst}: max_depth={config.max_depth}, "
            f"threshold={config.threshold:g}, soft_input_topk={config.soft_input_topk}, decider layers={d.layers} "
            f"width={d.width} blocks={d.blocks} mlp_ratio={d.mlp_ratio}, LoRA r={config.lora.r} "
            f"alpha={config.lora.alpha}, {len(weights)} decider tensors")


# --------------------------------------------------------------------------------- entry points


def convert(src: str | Path, dst: str | Path) -> str:
    """Convert the checkpoint at `src` (local dir or s3:// prefix) into this project's format at `dst`
    (written atomically by TaHForCausalLM.save_pretrained); returns a one-line summary."""
    local = Path(storage.local_copy(str(src)))
    if not storage.is_s3(dst) and Path(dst).resolve() == local.resolve():
        raise ValueError(f"{dst}: the destination must differ from the source")
    fmt = detect_format(local)
    if fmt == "v1":
        return _convert_v1(local, str(dst))
    if fmt == "tah2":
        from .convert_tah2 import convert_tah2

        return convert_tah2(local, str(dst))
    if fmt == "tah":
        from .model import TaHForCausalLM

        TaHForCausalLM.from_pretrained(local).save_pretrained(dst, tokenizer=_tokenizer(local))
        return f"copied this project's checkpoint {src} -> {dst}"
    raise FileNotFoundError(f"{src}: not a checkpoint this project reads (needs {TAH_CONFIG} with max_depth, or "
                            f"the authors' v1 {TAH_CONFIG} with max_iter + {V1_DECIDER} + lora/, or their "
                            f"TaH2 {TAH_CONFIG} + {V1_DECIDER} + {TAH2_UPDATER})")


def _cache_key(path: Path) -> str:
    """The source's identity: its path, its config, decider and updater bytes, and every file's size and
    mtime (hashing multi-GB backbones on every load would cost more than the conversion)."""
    h = hashlib.sha256(str(path.resolve()).encode())
    for name in (TAH_CONFIG, V1_DECIDER, TAH2_UPDATER):
        if (path / name).is_file():
            h.update((path / name).read_bytes())
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        st = p.stat()
        h.update(f"{p.relative_to(path).as_posix()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def resolve_checkpoint(path: str | Path) -> str:
    """`path` itself for this project's checkpoints (and anything not an authors' one, for the caller
    to judge); an authors' v1 or TaH2 checkpoint is converted once into $TAH_CACHE/converted/<key> and
    that directory returned."""
    local = Path(storage.local_copy(str(path)))
    fmt = detect_format(local)
    if fmt not in ("v1", "tah2"):
        return str(path)
    root = Path(os.environ.get("TAH_CACHE", Path.home() / ".cache" / "tah")) / "converted"
    dest = root / _cache_key(local)
    if not (dest / TAH_CONFIG).is_file():
        log.warning("converting the authors' %s checkpoint %s into %s (once)", fmt, path, dest)
        if fmt == "v1":
            _convert_v1(local, str(dest))
        else:
            from .convert_tah2 import convert_tah2

            convert_tah2(local, str(dest))
    return str(dest)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tah.convert", description=__doc__.splitlines()[0])
    ap.add_argument("src", help="the authors' checkpoint: a local directory or an s3:// prefix")
    ap.add_argument("dst", help="where to write this project's checkpoint (local directory or s3:// prefix)")
    args = ap.parse_args(argv)
    try:
        print(convert(args.src, args.dst))
    except (UnsafeCheckpointError, UnsupportedCheckpointError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
