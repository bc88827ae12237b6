"""Typed configuration for TaH, loaded from YAML recipes with dotted command-line overrides.

Every config is a dataclass with defaults and is validated on construction. Recipes are YAML files
whose keys mirror the dataclass fields; `load_config` merges `key.sub=value` overrides on top:

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
from typing import Any, TypeVar

import yaml

from .eval.sandbox import SandboxLimits

T = TypeVar("T")

ATTN_BACKENDS = ("auto", "reference", "sdpa", "flex", "flash")
DEPTH_ATTENTION = ("duo_causal", "current", "first")


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
class TaHConfig:
    """What turns an HF causal LM into a TaH model (saved beside the checkpoint as tah_config.json)."""

    max_depth: int = 2
    """Maximum number of iterations per token (1 = Standard, the plain backbone)."""
    soft_input_topk: int = 100
    """Depth d >= 2 input = softmax over this many top cumulative logits, weighting embedding rows."""
    threshold: float = 0.9
    """A token continues to the next depth iff the decider's probability > threshold."""
    attn_backend: str = "auto"
    """Duo-causal attention backend: auto | reference | sdpa | flex | flash (see tah/attention.py)."""
    depth_attention: str = "duo_causal"
    """Which depths a query sees: duo_causal (all <= its own), current (AlwaysThink), first."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    decider: DeciderSettings = field(default_factory=DeciderSettings)

    def __post_init__(self) -> None:
        if self.max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {self.max_depth}")
        if self.soft_input_topk < 1:
            raise ValueError(f"soft_input_topk must be >= 1, got {self.soft_input_topk}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {self.attn_backend!r}")
        if self.depth_attention not in DEPTH_ATTENTION:
            raise ValueError(
                f"depth_attention must be one of {DEPTH_ATTENTION}, got {self.depth_attention!r}"
            )

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


def to_dict(obj: Any) -> dict[str, Any]:
    """A plain (JSON/YAML-safe) dict of a config dataclass, nested dataclasses included."""
    return dataclasses.asdict(obj)


def _check_type(tp: Any, value: Any, where: str) -> Any:
    """Coerce/validate `value` against the annotation `tp`; raise a ValueError naming the key."""
    origin = typing.get_origin(tp)
    if tp is Any:
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


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Load a YAML recipe into `cls` (defaults where absent) and apply dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: a recipe must be a YAML mapping, got {type(loaded).__name__}")
        data = loaded or {}
    return from_dict(cls, apply_overrides(data, overrides or []))


@dataclass
class LabelConfig:
    """jobs/label.py: oracle labels of a Mixture-of-Thoughts-format source with a reference model."""

    reference_model: str = ""
    """The reference SFT model: local dir, hub id or s3:// checkpoint (plain HF causal LM)."""
    source: str = "data/tinytask"
    """Hub id (open-r1/Mixture-of-Thoughts), local directory or s3:// prefix."""
    tokenizer: str = "data/tinytask/tokenizer"
    """Tokenizer with the chat template (usually the reference model's own)."""
    output: str = "runs/labels"
    """Local directory or s3:// prefix for the Parquet shards and manifest.json."""
    domains: list[str] = field(default_factory=lambda: ["math", "code", "science"])
    split: str = "train"
    samples_per_domain: int | None = None
    """Balanced sampling: this many per domain (seeded), or all."""
    seed: int = 0
    max_response_tokens: int = 8192
    validation_fraction: float = 0.01
    num_shards: int = 8
    """Deterministic shards (by hash of the sample id); the unit of exactly-once commit."""
    shards_per_wave: int = 8
    """Shards processed (and committed) per pass of the Ray Data pipeline."""
    num_actors: int = 1
    """Reference-model actors (one GPU each when use_gpu)."""
    actor_cpus: float = 1.0
    """CPUs each reference actor reserves (CPU runs): the actors together must leave at least one CPU
    for Ray Data's read and tokenize tasks, e.g. 2 actors x 0.5 on a 2-CPU machine."""
    batch_size: int = 16
    """Samples per actor call."""
    use_gpu: bool = False
    dtype: str = "float32"
    max_depth: int = 2
    """Depths written in the `depth` column (CE and entropy are stored for re-binning later)."""
    metric: str = "mismatch"
    """mismatch | entropy | ce (the latter two at the mismatch count's hard ratio per sample)."""

    def __post_init__(self) -> None:
        if self.num_shards < 1 or self.shards_per_wave < 1 or self.num_actors < 1 or self.batch_size < 1:
            raise ValueError("num_shards, shards_per_wave, num_actors and batch_size must be >= 1")
        if self.metric not in ("mismatch", "entropy", "ce"):
            raise ValueError(f"metric must be mismatch | entropy | ce, got {self.metric!r}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError("validation_fraction must be in [0, 1)")
        if self.max_depth < 1:
            raise ValueError("max_depth must be >= 1")

    def identity(self) -> dict[str, Any]:
        """The settings that determine the labels; a re-run into the same output must match them."""
        d = to_dict(self)
        for k in ("output", "shards_per_wave", "num_actors", "actor_cpus", "batch_size", "use_gpu"):
            d.pop(k)
        return d


@dataclass
class TrainConfig:
    """jobs/train.py: one training method on oracle-labelled data (Standard, AlwaysThink, TaH, TaH+)."""

    method: str = "tah"
    """standard | always_think | tah (stage 1 under oracle depths, then stage 2: the decider)."""
    prune: bool = False
    """TaH (one layer pruned first, chosen by the smallest perplexity increase) vs TaH+ (unpruned)."""
    prune_layer: int | None = None
    """With prune: remove this decoder layer instead of the one with the smallest perplexity increase."""
    base_model: str = ""
    """The backbone to start from: local dir, hub id or s3:// checkpoint."""
    labels: str = "runs/tiny/labels"
    """Output of jobs/label.py (local dir or s3://)."""
    storage_path: str = "runs/tiny/train"
    """Ray Train storage (local dir or s3://bucket/prefix): checkpoints and the final model."""
    name: str = "tah"
    """Run name; re-running with the same name resumes from its latest checkpoint."""
    model: TaHConfig = field(default_factory=TaHConfig)
    num_workers: int = 2
    use_gpu: bool = False
    zero_stage: int = 2
    bf16: bool = False
    """bf16 on GPU; CPU runs fp32."""
    lr: float = 4e-5
    stage2_lr: float = 3e-5
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 0.2
    epochs: float = 5.0
    stage2_epochs: float = 2.0
    max_steps: int | None = None
    """Stop each stage after this many optimizer steps (smoke runs)."""
    global_batch: int = 128
    """Sequences per optimizer step across all workers."""
    micro_batch: int = 4
    """Sequences per forward/backward per worker (gradient accumulation makes up the rest)."""
    max_length: int = 8192
    eval_every: int = 50
    """Optimizer steps between validation losses (and checkpoints)."""
    checkpoint_every: int = 50
    seed: int = 0
    metric: str = "mismatch"
    """Oracle metric used to derive depths from the stored reference statistics."""

    def __post_init__(self) -> None:
        if self.method not in ("standard", "always_think", "tah"):
            raise ValueError(f"method must be standard | always_think | tah, got {self.method!r}")
        if self.prune_layer is not None and not self.prune:
            raise ValueError("prune_layer is set but prune is false: set prune=true to remove a layer")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError("zero_stage must be 0..3")
        if self.num_workers < 1 or self.micro_batch < 1 or self.global_batch < 1:
            raise ValueError("num_workers, micro_batch and global_batch must be >= 1")
        if self.global_batch % (self.micro_batch * self.num_workers):
            raise ValueError(f"global_batch {self.global_batch} must be a multiple of micro_batch x num_workers "
                             f"({self.micro_batch} x {self.num_workers})")
        if self.method == "standard" and self.model.max_depth != 1:
            self.model = dataclasses.replace(self.model, max_depth=1)
        if self.method == "always_think" and self.model.depth_attention != "current":
            # AlwaysThink attends causally within each depth (paper, appendix A.1).
            self.model = dataclasses.replace(self.model, depth_attention="current")

    @property
    def grad_accum(self) -> int:
        return self.global_batch // (self.micro_batch * self.num_workers)


@dataclass
class EvalConfig:
    """jobs/eval.py: checkpoints x benchmarks through the serving engine, graded, summarised."""

    models: dict[str, str] = field(default_factory=dict)
    """Name -> TaH checkpoint (local dir or s3://), e.g. {tah: runs/tiny/train/tah/stage2/model}."""
    policies: dict[str, str] = field(default_factory=dict)
    """Name -> depth policy where not the decider: standard | always_think (default: decider)."""
    benchmarks: list[str] = field(default_factory=lambda: ["tinytask"])
    sources: dict[str, str] = field(default_factory=dict)
    """Benchmark -> local file/dir or s3:// mirror of its published rows (default: the hub)."""
    tokenizer: str | None = None
    """None: each checkpoint's own tokenizer, else the shipped task's."""
    limit: int | None = None
    """First N problems of each benchmark (None: all)."""
    n_samples: int = 1
    """Samples per problem; accuracy is pass@1 averaged over them."""
    n_samples_per_benchmark: dict[str, int] = field(default_factory=dict)
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    max_tokens: int = 1024
    threshold: float | None = None
    """Decider threshold (None: each checkpoint's)."""
    seed: int = 0
    num_actors: int = 1
    """Engine actors per model (Ray Data ActorPoolStrategy)."""
    max_num_seqs: int = 32
    max_model_len: int = 4096
    batch_size: int = 32
    """Problems per actor call (decoded together by the engine)."""
    grade_workers: int = 2
    sandbox: SandboxLimits = field(default_factory=SandboxLimits)
    """The code grader's sandbox (limits, backend, unsafe_code_execution), see tah/eval/sandbox.py."""
    output: str = "runs/eval"
    labels: str | None = None
    """A jobs/label.py output: also run the token-level analysis on its validation rows."""

    def __post_init__(self) -> None:
        for name, pol in self.policies.items():
            if pol not in ("decider", "standard", "always_think"):
                raise ValueError(f"policies.{name} must be decider | standard | always_think, got {pol!r}")
        if self.n_samples < 1 or self.num_actors < 1 or self.batch_size < 1:
            raise ValueError("n_samples, num_actors and batch_size must be >= 1")
