"""Layer pruning: TaH (one decoder layer removed to pay for LoRA + decider) vs TaH+ (unpruned).

`prune_layer` returns a backbone with one decoder layer removed and its config updated (layer count,
per-layer types, attention layer indices renumbered for the KV cache). `perplexity` is what the
training job uses to score each candidate layer (the smallest increase is pruned), on the assistant
tokens of validation chats: the tokens the model is fine-tuned on and generates. Scored on every token,
the prompts' question text (unpredictable, and most of the tokens) decides instead: on the shipped task
(40 validation chats per domain) removing the base's last layer *lowers* the whole-text loss by 0.075
nats a token while it raises the responses' by 0.075, against 0.031 for layer 2; the whole-text score
pruned the last layer (docs/results.md, setup C).

    python -c "from tah.testing import tiny_qwen3; from tah.prune import prune_layer; \
               print(prune_layer(tiny_qwen3(), 1).config.num_hidden_layers)"
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from .hf_adapter import decoder_parts, renumber_layers, set_decoder_layers


def prune_layer(backbone: PreTrainedModel, index: int, inplace: bool = False) -> PreTrainedModel:
    """Remove decoder layer `index` (0-based). Prune the plain HF model, before wrapping it in TaH."""
    layers = decoder_parts(backbone).layers
    n = len(layers)
    if n < 2:
        raise ValueError("cannot prune the only decoder layer")
    if not -n <= index < n:
        raise IndexError(f"layer index {index} out of range for {n} layers")
    index %= n
    if not inplace:
        backbone = copy.deepcopy(backbone)
        layers = decoder_parts(backbone).layers
    del layers[index]
    renumber_layers(layers)  # KV caches are indexed by layer_idx: keep the indices dense
    cfg = backbone.config
    cfg.num_hidden_layers = n - 1
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [t for i, t in enumerate(cfg.layer_types) if i != index]
    return backbone


@torch.no_grad()
def perplexity(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               loss_mask: torch.Tensor | None = None) -> float:
    """Token-level perplexity of an HF causal LM on a batch (B, T): over the tokens where `loss_mask`
    (B, T) is 1 (e.g. a chat's assistant tokens: what the model is trained on and generates), by
    default every token that is not padding. The first token is never a target."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    counted = mask if loss_mask is None else mask * loss_mask
    logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    target = input_ids[:, 1:].masked_fill(counted[:, 1:] == 0, -100)
    if not (target != -100).any():
        raise ValueError("perplexity: no token to score (the loss mask selects none after the first)")
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
    return float(torch.exp(nll))


class without_layer:
    """Context manager: the model runs with decoder layer `index` taken out (restored on exit).

    Cheaper than `prune_layer`'s deep copy when scoring every layer of a large model in turn.
    """

    def __init__(self, model: PreTrainedModel, index: int) -> None:
        self.model, self.index = model, index

    def __enter__(self) -> PreTrainedModel:
        layers = decoder_parts(self.model).layers
        self.saved = (list(layers), self.model.config.num_hidden_layers, getattr(self.model.config, "layer_types", None))
        kept = [l for i, l in enumerate(self.saved[0]) if i != self.index]
        renumber_layers(kept)
        set_decoder_layers(self.model, torch.nn.ModuleList(kept))
        self.model.config.num_hidden_layers = len(kept)
        if self.saved[2] is not None:
            self.model.config.layer_types = [t for i, t in enumerate(self.saved[2]) if i != self.index]
        return self.model

    def __exit__(self, *exc: object) -> None:
        renumber_layers(self.saved[0])
        set_decoder_layers(self.model, torch.nn.ModuleList(self.saved[0]))
        self.model.config.num_hidden_layers = self.saved[1]
        if self.saved[2] is not None:
            self.model.config.layer_types = self.saved[2]


@torch.no_grad()
def layer_ppl_deltas(model: PreTrainedModel, batches: list[tuple[torch.Tensor, ...]],
                     layers: list[int] | None = None) -> dict[int, float]:
    """{layer: perplexity without it - perplexity of the full model} on calibration batches
    (input_ids, attention_mask) or (input_ids, attention_mask, loss_mask) -- see `perplexity`. The
    layer to prune is the one with the smallest increase."""
    def ppl() -> float:
        return float(sum(perplexity(model, *b) for b in batches) / len(batches))

    base = ppl()
    out = {}
    for i in layers if layers is not None else range(model.config.num_hidden_layers):
        with without_layer(model, i):
            out[i] = ppl() - base
    return out
