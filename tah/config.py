"""The config machinery (YAML recipes, dotted overrides, strict typed dataclasses) and the model's config.

Every config in the project is a dataclass with defaults and a docstring per field, validated on
construction; choice fields are `Literal`s, checked here once for all of them. Each component owns
its config beside its code (`EngineConfig` in tah/engine.py, `SamplingParams` in tah/sampling.py,
`OptimConfig` in tah/train/loop.py, `SandboxLimits` in tah/eval/sandbox.py) and each job's config
lives with its job (jobs/*.py, serve/tah.py) and nests them. `load_config` reads a recipe and merges
`key.sub=value` overrides on top; a config may declare `ALIASES` (flat names users already type,
e.g. `max_num_seqs` -> `engine.max_num_seqs`) that overrides accept as well:

    python -c "from tah.config import TaHConfig, load_config; \
               print(load_config(TaHConfig, None, ['max_depth=3', 'lora.r=8']))"

Pass plain dicts (`to_dict`) across process boundaries and rebuild the dataclass on the other side.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")

AttnBackend = Literal["auto", "reference", "sdpa", "flex", "flash"]
DepthAttention = Literal["duo_causal", "current", "first", "first_self"]
InputRule = Literal["soft_topk", "updater"]
Combine = Literal["logit_residual", "stop_prob_mix", "even_mix"]
DeciderKind = Literal["v1", "tah2"]
ATTN_BACKENDS = typing.get_args(AttnBackend)
DEPTH_ATTENTION = typing.get_args(DepthAttention)


@dataclass
class LoraSettings:
    """The depth-LoRA adapter: active only at depths >= 2 (peft's standard init, B = 0)."""

    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.1
    """Dropout on the LoRA input path (training only)."""
    target_modules: list[str] | str = "all-linear"
    """peft target modules; 'all-linear' = q, k, v, o, gate, up, down of every decoder layer."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class DeciderSettings:
    """The iteration decider MLP: hidden states of chosen layers + top-k logits -> continue prob."""

    layers: list[int] | None = None
    """HF `hidden_states` indices (0 = embeddings, i = after layer i, L = after final norm).
    None picks four spread over the depth, like the authors' [2, 10, 18, 26] for 28 layers."""
    width: int = 512
    """Width of the residual MLP (512 for 1.7B, 256 for 0.6B in the paper)."""
    blocks: int = 6
    """Number of pre-LayerNorm residual blocks."""
    mlp_ratio: int = 4
    """Inner width of each block = mlp_ratio * width."""
    dropout: float = 0.1
    """Dropout inside the residual blocks."""

    def __post_init__(self) -> None:
        if self.width < 1 or self.blocks < 0 or self.mlp_ratio < 1:
            raise ValueError(f"bad decider sizes: {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"decider.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class Tah2DeciderSettings:
    """TaH2's decider (decider_kind="tah2"): token embedding + last hidden state + top-k probabilities
    of the depth's own logits -> SwiGLU MLP -> continuation logit (tah/decider.py:Tah2Decider)."""

    intermediate_size: int | None = None
    """Inner width of its SwiGLU MLP (None = the backbone's hidden size; 2048 in the 1.7B recipe)."""
    topk: int | None = None
    """How many top probabilities it reads (None = the hidden size; the authors' norm_l has the
    hidden size, so their checkpoints need topk == hidden size)."""
    rms_norm_eps: float = 1e-6
    """Epsilon of its RMSNorms."""

    def __post_init__(self) -> None:
        if (self.intermediate_size is not None and self.intermediate_size < 1) or (
                self.topk is not None and self.topk < 1):
            raise ValueError(f"bad tah2_decider sizes: {self}")


@dataclass
class UpdaterSettings:
    """TaH2's input updater (input_rule="updater"): x = norm_out(SwiGLU(norm_pre_mlp(W_p [norm_prev(e);
    norm_last(h)]))) from the token embedding e and the last hidden state h of the previous depth."""

    intermediate_size: int | None = None
    """Inner width of the SwiGLU MLP (None = the backbone's hidden size; 2048 in the 1.7B recipe)."""
    rms_norm_eps: float = 1e-6
    """Epsilon of the updater's RMSNorms."""

    def __post_init__(self) -> None:
        if self.intermediate_size is not None and self.intermediate_size < 1:
            raise ValueError(f"updater.intermediate_size must be >= 1, got {self.intermediate_size}")


@dataclass
class TaHConfig:
    """What turns an HF causal LM into a TaH model (saved beside the checkpoint as tah_config.json)."""

    max_depth: int = 2
    """Maximum number of iterations per token (1 = Standard, the plain backbone)."""
    soft_input_topk: int = 100
    """Depth d >= 2 input = softmax over this many top cumulative logits, weighting embedding rows."""
    threshold: float = 0.9
    """A token continues to the next depth iff the decider's probability > threshold."""
    attn_backend: AttnBackend = "auto"
    """Duo-causal attention backend: auto | reference | sdpa | flex | flash (see tah/attention.py)."""
    depth_attention: DepthAttention = "duo_causal"
    """Which keys a query (i, d) sees (key (j, k) exists and j <= i, and): duo_causal k <= d (TaH's
    and TaH2's "duo"); current k == d (AlwaysThink); first k == 1; first_self k == 1 or (j == i and
    k <= d) (TaH2's "causal": depth-1 keys plus the token's own deeper keys)."""
    input_rule: InputRule = "soft_topk"
    """Input of depth d >= 2: soft_topk (v1: softmax of the top-k cumulative logits weighting embedding
    rows) | updater (TaH2: updater(token embedding, last hidden state of depth d - 1))."""
    combine: Combine = "logit_residual"
    """How depths combine into the output: logit_residual (v1: logits summed over depths) |
    stop_prob_mix (TaH2: probabilities mixed with weights from the decider's continue probabilities)
    | even_mix (equal weights over the executed depths). With a mixture, `logits` are log-probs."""
    decider_kind: DeciderKind = "v1"
    """v1: chosen layers' hidden states + top-k cumulative logits, residual MLP | tah2: token
    embedding + last hidden state + top-k probabilities of the depth's own logits, SwiGLU MLP."""
    depth_lora: bool = True
    """A LoRA adapter active at depths >= 2 (v1); False: no peft wrapping at all (TaH2)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    decider: DeciderSettings = field(default_factory=DeciderSettings)
    tah2_decider: Tah2DeciderSettings = field(default_factory=Tah2DeciderSettings)
    updater: UpdaterSettings = field(default_factory=UpdaterSettings)

    def __post_init__(self) -> None:
        if self.max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {self.max_depth}")
        if self.soft_input_topk < 1:
            raise ValueError(f"soft_input_topk must be >= 1, got {self.soft_input_topk}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        check_choices(self)

    @classmethod
    def tah2(cls, max_depth: int = 2, **fields: Any) -> "TaHConfig":
        """The TaH2 configuration (thu-nics/TaH `tah2/`, stop_prob_mix recipe): updater input, the TaH2
        decider (threshold 0.5), probability mixture, no LoRA, duo attention. Fields override it,
        e.g. the fixed-depth variant: depth_attention="first_self", combine="even_mix"."""
        base: dict[str, Any] = dict(max_depth=max_depth, input_rule="updater", combine="stop_prob_mix",
                                    decider_kind="tah2", depth_lora=False, threshold=0.5,
                                    depth_attention="duo_causal")
        base.update({k: to_dict(v) if dataclasses.is_dataclass(v) else v for k, v in fields.items()})
        return from_dict(cls, base)  # nested settings may be given as mappings, as in recipes

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load_json(cls, path: str | Path) -> "TaHConfig":
        return from_dict(cls, json.loads(Path(path).read_text()))


# ---------------------------------------------------------------------------------------------
# Generic dataclass <-> dict/YAML machinery, shared by every config in the project.
# ---------------------------------------------------------------------------------------------


def check_choices(obj: Any) -> None:
    """Raise a ValueError for any `Literal` field of dataclass `obj` holding a value outside its
    choices. Called from `__post_init__`, so configs built in Python are checked as recipes are."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        tp = hints[f.name]
        arms = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        lits = [a for a in arms if typing.get_origin(a) is Literal]
        value = getattr(obj, f.name)
        if lits and not any(value in typing.get_args(a) for a in lits) and not (value is None and type(None) in arms):
            choices = " | ".join(str(c) for a in lits for c in typing.get_args(a))
            raise ValueError(f"{type(obj).__name__}.{f.name} must be one of {choices}, got {value!r}")


def to_dict(obj: Any) -> dict[str, Any]:
    """A plain (JSON/YAML-safe) dict of a config dataclass, nested dataclasses included."""
    return dataclasses.asdict(obj)


def _check_type(tp: Any, value: Any, where: str) -> Any:
    """Coerce/validate `value` against the annotation `tp`; raise a ValueError naming the key."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = " | ".join(map(str, typing.get_args(tp)))
            raise ValueError(f"{where} must be one of {choices}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=where + ".")
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_type(arm, value, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{where}: {value!r} matches none of {tp}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (arg,) = typing.get_args(tp) or (Any,)
        return [_check_type(arg, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    if not prefix:  # a recipe's flat aliases (nested levels are rewritten with the top one)
        data = _alias_keys(cls, data)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {[prefix + u for u in unknown]}; known: {sorted(names)}")
    kwargs = {k: _check_type(hints[k], v, prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=3' -> (['a', 'b'], 3); the value is parsed as YAML so numbers, lists, null work."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {text!r} has an empty key")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each dotted override set (intermediate mappings created)."""
    out = json.loads(json.dumps(data))
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: {part!r} is not a mapping")
        node[path[-1]] = value
    return out


def _field_type(cls: type, name: str) -> Any:
    """The dataclass type of field `name` of `cls` (unwrapping `X | None`), or None."""
    if not dataclasses.is_dataclass(cls) or name not in {f.name for f in dataclasses.fields(cls)}:
        return None
    tp = typing.get_type_hints(cls)[name]
    arms = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return next((a for a in arms if dataclasses.is_dataclass(a)), None)


def alias_path(cls: type, parts: list[str]) -> list[str]:
    """A dotted key with every flat alias on its way replaced by its home: for an ExperimentConfig,
    ['train', 'lr'] -> ['train', 'optim', 'lr'] (TrainConfig.ALIASES maps lr -> optim.lr)."""
    out: list[str] = []
    i = 0
    while i < len(parts):
        aliases: dict[str, str] = getattr(cls, "ALIASES", {}) if cls is not None else {}
        if parts[i] in aliases:
            parts = parts[:i] + aliases[parts[i]].split(".") + parts[i + 1:]
        out.append(parts[i])
        cls = _field_type(cls, parts[i]) if cls is not None else None
        i += 1
    return out


def resolve_aliases(cls: type, overrides: list[str]) -> list[str]:
    """Rewrite flat override names that a config's `ALIASES` maps to their dotted home
    (`max_num_seqs=8` -> `engine.max_num_seqs=8`, also nested: `train.lr=...`); others unchanged."""
    out = []
    for text in overrides:
        key, sep, rest = text.partition("=")
        out.append(".".join(alias_path(cls, key.split("."))) + sep + rest if sep and key else text)
    return out


def _alias_keys(cls: type, data: Any) -> Any:
    """The same rewrite for a recipe's nested mappings."""
    if not isinstance(data, dict) or cls is None:
        return data
    out: dict[str, Any] = {}
    for k, v in data.items():
        path = alias_path(cls, [k]) if isinstance(k, str) else [k]
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        sub = cls
        for part in path:
            sub = _field_type(sub, part) if sub is not None else None
        node[path[-1]] = _alias_keys(sub, v) if sub is not None else v
    return out


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Load a YAML recipe into `cls` (defaults where absent) and apply dotted overrides (and the flat
    names in `cls.ALIASES`)."""
    overrides = resolve_aliases(cls, overrides or [])
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: a recipe must be a YAML mapping, got {type(loaded).__name__}")
        data = loaded or {}
    return from_dict(cls, apply_overrides(_alias_keys(cls, data), overrides))
