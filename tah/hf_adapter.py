"""The seam between TaH and the internals of transformers and peft: every reliance in one place.

TaH runs an HF backbone's own modules by hand (embedding, rotary, decoder layers, norm, lm_head), plugs
its duo-causal attention in through HF's attention registry, hands its per-depth KV stores to HF's
attention modules as a duck-typed cache, and switches the depth-LoRA on and off (per call, by flipping
peft's own flag) or applies it to some batch rows only (gathering them). None of that is public API, so
each reliance lives here behind a small named function, with a comment naming the internal it relies on
and the versions it was checked against, and each has one test named after the assumption in
tests/test_hf_adapter.py. When a new transformers or peft release breaks TaH, that file says which
assumption broke:

    .venv/bin/python -m pytest -q tests/test_hf_adapter.py        # ~20-30 s on 2 CPU cores

Checked against transformers 5.23.0 and 5.24.0, peft 0.21.2 (pyproject.toml pins the range).
Library code outside this module uses only the functions below and public HF/peft API
(`get_input_embeddings`, `from_pretrained`, `save_pretrained`, config fields).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

if TYPE_CHECKING:
    from .config import LoraSettings

CHECKED_TRANSFORMERS = ("5.23.0", "5.24.0")
CHECKED_PEFT = ("0.21.2",)


# ------------------------------------------------------------------ attention registration
def register_attention(name: str, fn: Any) -> None:
    """Make `fn` the attention function of every backbone whose attn implementation is `name`.

    Relies on: transformers.AttentionInterface.register (a global registry the attention modules look
    up by `config._attn_implementation` at each call) and ALL_MASK_ATTENTION_FUNCTIONS.register, so that
    a backbone run on its own (HF builds the 4-D mask first) gets sdpa's bool mask format under `name`.
    The attention modules call fn(module, query (B, H, Tq, D), key, value (B, Hkv, Tk, D),
    attention_mask, dropout=, scaling=, sliding_window=, ...) and expect ((B, Tq, H, D), weights).
    Checked: transformers 5.23, 5.24.
    """
    AttentionInterface.register(name, fn)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)


def set_attn_implementation(backbone: nn.Module, name: str) -> None:
    """Route the backbone's attention through the function registered as `name` from the next call on.

    Relies on: the private `config._attn_implementation`, read by each attention module per forward
    (the public `set_attn_implementation` validates against HF's own names). Checked: transformers 5.23, 5.24.
    """
    backbone.config._attn_implementation = name


def sdpa_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                 **kwargs: Any) -> tuple[torch.Tensor, None]:
    """HF's own sdpa attention: query (B, H, Tq, D), key/value (B, Hkv, Tk, D) -> ((B, Tq, H, D), None).

    Relies on: transformers.integrations.sdpa_attention.sdpa_attention_forward: bool or additive 4-D
    mask, None = causal (from `module.is_causal`), GQA from `module.num_key_value_groups` (so `module`
    must be the HF attention module), extra kwargs such as sliding_window ignored.
    Checked: transformers 5.23, 5.24.
    """
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)


# ------------------------------------------------------------------ the decoder, run by hand
class DecoderParts(NamedTuple):
    """The backbone's modules in the order TaH runs them (Llama/Qwen layout)."""

    embed: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    rotary: nn.Module
    lm_head: nn.Module


_LAYOUT = ("embed_tokens", "layers", "norm", "rotary_emb")


def check_decoder_layout(backbone: nn.Module) -> None:
    """Raise unless the backbone has the Llama/Qwen layout and only full-attention layers."""
    inner = getattr(backbone, "model", None)
    for name in _LAYOUT:
        if inner is None or not hasattr(inner, name):
            raise TypeError(
                f"TaH wraps HF decoder-only LMs with the Llama/Qwen layout (model.embed_tokens, model.layers, "
                f"model.norm, model.rotary_emb, lm_head); {type(backbone).__name__} has no model.{name}"
            )
    types = set(getattr(backbone.config, "layer_types", None) or ["full_attention"])
    if types != {"full_attention"}:
        raise NotImplementedError(f"sliding-window layers are not supported by TaH yet (layer_types={types})")


def decoder_parts(backbone: nn.Module) -> DecoderParts:
    """(embed, layers, norm, rotary, lm_head) of an HF causal LM; read per call (pruning swaps `layers`).

    Relies on: the attribute layout `backbone.model.{embed_tokens, layers, norm, rotary_emb}` and
    `backbone.lm_head` of LlamaForCausalLM / Qwen3ForCausalLM, and that running them in this order is
    the model's forward. Checked: transformers 5.23, 5.24.
    """
    inner = backbone.model
    return DecoderParts(inner.embed_tokens, inner.layers, inner.norm, inner.rotary_emb, backbone.lm_head)


def set_decoder_layers(backbone: nn.Module, layers: list[nn.Module] | nn.ModuleList) -> None:
    """Replace the backbone's decoder layers (layer pruning). Relies on `backbone.model.layers`."""
    backbone.model.layers = layers if isinstance(layers, nn.ModuleList) else nn.ModuleList(layers)


def renumber_layers(layers: list[nn.Module] | nn.ModuleList) -> None:
    """Give the layers dense indices 0..n-1 after a removal.

    Relies on: each attention module's `layer_idx` attribute being the index it passes to
    `cache.update` (read at call time, not captured at construction). Checked: transformers 5.23, 5.24.
    """
    for i, layer in enumerate(layers):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = i


def kv_shape(config: Any) -> tuple[int, int]:
    """(num_key_value_heads, head_dim) of the key/value states the layers hand to `cache.update`.

    Relies on: `config.head_dim`, falling back to hidden_size // num_attention_heads (Llama configs
    without head_dim). Checked: transformers 5.23, 5.24.
    """
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_key_value_heads, head_dim


def rotary_embeddings(rotary: nn.Module, hidden_states: torch.Tensor,
                      position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (B, T, head_dim) in hidden_states' dtype, for position_ids (B, T).

    Relies on: `model.rotary_emb(x, position_ids)` returning the pair the layers take as
    `position_embeddings` (x is only read for its dtype/device). Checked: transformers 5.23, 5.24.
    """
    return rotary(hidden_states, position_ids)


def run_layer(layer: nn.Module, hidden_states: torch.Tensor, attention_mask: Any, position_ids: torch.Tensor,
              cache: KVCacheView, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """One decoder layer: hidden_states (B, T, H) -> (B, T, H).

    Relies on (checked: transformers 5.23, 5.24):
    - the layer returns a tensor (4.x returned a tuple);
    - `attention_mask` reaches the registered attention function unchanged (any object: TaH passes
      its DuoCausalSpec), and `cache.update` is called with the post-RoPE keys, its return value
      handed to the attention function unchanged (KVCacheView below);
    - the keyword `past_key_values`: 5.24 renamed it `cache` and warns (FutureWarning) until its
      removal in 5.40. Kept because 5.23 knows only the old name, and because under gradient
      checkpointing HF's layer wrapper sets `cache=` (not `past_key_values=`) to None.
    """
    return layer(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                 past_key_values=cache, use_cache=True, position_embeddings=position_embeddings)


class KVCacheView(Protocol):
    """What HF's attention modules call on the object passed as the layers' cache.

    Each attention module, after RoPE, calls `update(key_states, value_states, layer_idx, ...)` with
    this call's keys and values (B, Hkv, Tq, D) and its `layer_idx`, and passes the returned pair to
    the attention function as its key/value -- whatever they are (TaH's mixed decode returns
    (B, Hkv, D_vis, W, D) views; its split form for TaH2 a (depth-1 view, deeper rows' keys) pair each). Nothing else of `transformers.Cache` is touched when the layers are
    run by hand. Extra arguments vary by version (5.23: none; 5.24: kwargs=the attention kwargs) and
    must be accepted and may be ignored. Implemented by tah/cache.py's views. Checked: transformers 5.23, 5.24.
    """

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        ...


# ------------------------------------------------------------------ peft: the depth-LoRA
def wrap_with_lora(backbone: nn.Module, settings: LoraSettings) -> PeftModel:
    """Inject fresh LoRA layers (standard init, B = 0: a no-op until trained) into `backbone` in place.

    Relies on (checked: peft 0.21.2): get_peft_model replacing the target Linear modules *inside* the
    given backbone, so running `backbone.model.layers` runs the adapters; and its freezing every
    non-LoRA weight (TaHForCausalLM.set_trainable undoes that for stage 1).
    """
    lc = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                    target_modules=settings.target_modules, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(backbone, lc)


def load_lora(backbone: nn.Module, path: str | Path) -> PeftModel:
    """Inject a saved adapter into `backbone` in place, trainable. Checked: peft 0.21.2."""
    return PeftModel.from_pretrained(backbone, str(path), is_trainable=True)


def save_lora(peft_model: PeftModel, directory: str | Path) -> None:
    """Write the adapter as peft writes it (adapter_config.json + adapter_model.safetensors).

    Relies on: the adapter being named "default" and get_peft_model_state_dict's key names, which
    PeftModel.from_pretrained reads back. Checked: peft 0.21.2.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    peft_model.peft_config["default"].save_pretrained(directory)
    sd = get_peft_model_state_dict(peft_model)
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, directory / "adapter_model.safetensors",
              metadata={"format": "pt"})


def lora_layers(module: nn.Module) -> list[BaseTunerLayer]:
    """Every peft tuner layer inside `module`; cache the list -- walking all modules costs ms per switch.

    Relies on: peft's LoRA layers subclassing peft.tuners.tuners_utils.BaseTunerLayer. Checked: peft 0.21.2.
    """
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def set_lora_enabled(layers: list[BaseTunerLayer], on: bool) -> None:
    """Switch the adapters' contribution on or off for the next forwards (~0.08 ms for a cached list).

    Relies on: the private flag `_disable_adapters`, read by each LoRA layer's forward. Not
    `enable_adapters(False)`: it also clears the adapters' requires_grad, which training needs.
    Checked: peft 0.21.2.
    """
    for m in layers:
        if m._disable_adapters == on:  # (a module's __setattr__ costs microseconds: only where it changes)
            m._disable_adapters = not on


@contextlib.contextmanager
def lora_on_rows(layers: list[BaseTunerLayer], rows: torch.Tensor) -> Iterator[None]:
    """Within the block, the adapters add their output to the batch rows `rows` (R,) only (sorted, unique
    indices into dim 0 of every layer input (B, ..., in)); the other rows get the base layer's output alone.

    The rows are gathered, run through A then B (rank r) and added into the base output at those rows
    (index_add, alpha = alpha / r), as multi-LoRA servers apply an adapter to its own rows (BGMV/SGMV):
    the same value as base(x) + B(A(x)) * scaling on those rows, and no adapter work on the others.
    Layers that share an input (q/k/v, gate/up) share one gather; when the rows are the whole batch (a
    deep step at batch 1, AlwaysThink) there is no gather and the delta is added in place.

    Relies on (checked: peft 0.21.2): with `_disable_adapters` set, a LoRA Linear's forward is its
    `base_layer(x)` (the block sets it and restores it after; a forward hook adds the delta); the input
    is the forward's first positional argument; `active_adapters`, and `lora_A` / `lora_B` /
    `lora_dropout` / `scaling` keyed by adapter name, computing `lora_B(lora_A(dropout(x))) * scaling`
    in lora_A's dtype for vanilla LoRA (`lora_variant` empty: a variant such as DoRA is refused).
    """
    last: list[Any] = [None, None]  # (input tensor, its gathered rows): q/k/v and gate/up share their input
    adapters: dict[BaseTunerLayer, list[tuple]] = {}  # per layer, read once per block (not per call)

    def add_delta(m: BaseTunerLayer, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        every = rows.numel() == x.shape[0]  # (rows are sorted and unique: all of them, no gather)
        if last[0] is not x:
            last[0], last[1] = x, x if every else x.index_select(0, rows)
        xs = last[1]
        for a, b, drop, scale in adapters[m]:
            xa = xs.to(a.weight.dtype)
            if m.training:  # (dropout is the identity in eval: not called, per-call overhead saved)
                xa = drop(xa)
            delta = F.linear(F.linear(xa, a.weight, a.bias), b.weight, b.bias).to(out.dtype)
            if out.requires_grad:
                out = out.add(delta, alpha=scale) if every else out.index_add(0, rows, delta, alpha=scale)
            elif every:  # (the base layer's fresh output: added into in place)
                out.add_(delta, alpha=scale)
            else:
                out.index_add_(0, rows, delta, alpha=scale)
        return out

    # Only the enabled layers are switched (usually none: forward leaves them off); a module's
    # __setattr__ costs microseconds, and a decode step enters this block once.
    switched = [m for m in layers if not m._disable_adapters]
    handles = []
    try:
        for m in switched:
            m._disable_adapters = True
        if rows.numel():  # (no rows: the base layers alone)
            for m in layers:
                if not isinstance(m, LoraLinear) or any(n in m.lora_variant for n in m.active_adapters):
                    raise NotImplementedError(f"row-gathered LoRA runs vanilla LoRA on Linear layers, not "
                                              f"{type(m).__name__} with variants {sorted(m.lora_variant)}")
                adapters[m] = [(m.lora_A[n], m.lora_B[n], m.lora_dropout[n], m.scaling[n])
                               for n in m.active_adapters if n in m.lora_A]
            handles = [m.register_forward_hook(add_delta) for m in layers]
        yield
    finally:
        for h in handles:
            h.remove()
        for m in switched:
            m._disable_adapters = False
        last[0] = last[1] = None
        adapters.clear()


def is_lora_param(name: str) -> bool:
    """Whether a parameter name (of the wrapped backbone) belongs to the adapter. Relies on peft's
    `lora_A` / `lora_B` module names. Checked: peft 0.21.2."""
    return "lora_" in name


def base_state_dict(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's weights under plain HF names: LoRA tensors dropped, `base_layer` unwrapped.

    Relies on: peft keeping the wrapped Linear as `<name>.base_layer` and the adapter's tensors under
    `.lora_`; and HF re-tying lm_head to embed_tokens on load when tie_word_embeddings is set.
    Checked: peft 0.21.2, transformers 5.23, 5.24.
    """
    sd = {}
    for k, v in backbone.state_dict().items():
        if ".lora_" in k:
            continue
        sd[k.replace(".base_layer.", ".")] = v.detach().contiguous().cpu()
    if getattr(backbone.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)  # tied to embed_tokens; HF re-ties on load
    return sd
