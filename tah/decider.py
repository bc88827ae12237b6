"""The iteration decider: a small MLP that says whether a token should run one more depth.

Input, per token after depth d: the hidden states of a few backbone layers from that depth's pass
(concatenated) plus the raw top-k cumulative logits (sorted, no softmax) projected to the hidden
size. Then Linear(-> width), Linear(width -> width), `blocks` pre-LayerNorm residual MLP blocks
(width -> mlp_ratio*width -> width, GELU, dropout), LayerNorm, Linear(width -> 1). The output is a
logit; the token continues iff sigmoid(logit) > threshold. With the paper's sizes this is ~18.3 M
parameters for Qwen3-1.7B and ~4.9 M for Qwen3-0.6B (width 256, five layers).

    python -c "from tah.decider import IterationDecider; from tah.config import DeciderSettings; \
               print(IterationDecider(64, 4, 100, DeciderSettings(width=32, blocks=2)))"
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import DeciderSettings


# The serving engine runs the decider once per decode step on a few rows, where module-call overhead
# is most of its cost: the forwards call the same ops as the modules' own forwards (bit for bit), directly.
def _linear(m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, m.weight, m.bias)


def _layer_norm(m: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)


class TopK(NamedTuple):
    values: torch.Tensor
    indices: torch.Tensor


def topk_logits(logits: torch.Tensor, k: int) -> TopK:
    """The k largest logits of each row (N, V), sorted descending, and their token ids, (N, k) each: what
    the v1 decider reads and the soft input weights. The model's forward and the serving engine both
    take them from here, so they agree on every tie.

    The values are exactly torch.topk's; among equal values the ids may be other tokens of the same value
    (torch.topk leaves its tie order unspecified too). On CPU, where torch.topk runs a heap over each row
    (~40 us per row of 8192 at k = 100, one thread), the row is cut into c interleaved groups of W = V / c
    ({g, g + W, ...}) and topk runs over the members of the k groups with the largest maxima only: a group
    outside them has k group maxima at other positions at least as large as any of its members, so none
    of the k largest values is lost. c ~ sqrt(V / k) balances the two selections (V = 8192, k = 100:
    c = 8, ~35 % less time); with c < 4 (small vocabularies) or a single row (its fixed cost dominates),
    plain torch.topk.
    """
    N, V = logits.shape
    c = 1
    while c * 2 <= math.sqrt(V / max(k, 1)) and V % (c * 2) == 0:
        c *= 2
    if logits.device.type != "cpu" or c < 4 or N < 2:
        return TopK(*logits.topk(k, dim=-1))
    W = V // c
    groups = logits.reshape(N, c, W)  # (N, c, W): group g holds columns g, g + W, ..., g + (c - 1) W
    g = groups.amax(1).topk(k, dim=-1, sorted=False).indices  # (N, k) the groups with the largest maxima, any order
    cand = groups.gather(2, g[:, None, :].expand(N, c, k)).reshape(N, c * k)  # (N, c k): [m k + j] = member m of g[j]
    values, j = cand.topk(k, dim=-1)
    return TopK(values, (j // k) * W + g.gather(1, j % k))


def default_decider_layers(num_layers: int) -> list[int]:
    """Four HF hidden-state indices spread over the depth ([2, 10, 18, 26] for 28 layers)."""
    picks = [round(f * num_layers) for f in (0.07, 0.36, 0.64, 0.93)]
    return sorted(set(min(max(p, 0), num_layers) for p in picks))


class _Block(nn.Module):
    def __init__(self, width: int, ratio: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, ratio * width)
        self.fc2 = nn.Linear(ratio * width, width)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(_linear(self.fc1, _layer_norm(self.norm, x)), approximate=self.act.approximate)
        if self.training:  # (dropout is the identity in eval)
            return x + self.drop(_linear(self.fc2, self.drop(y)))
        return x + _linear(self.fc2, y)


class IterationDecider(nn.Module):
    """Continuation logit from (selected hidden states, top-k cumulative logits)."""

    def __init__(self, hidden_size: int, num_inputs: int, topk: int, settings: DeciderSettings) -> None:
        super().__init__()
        self.hidden_size, self.num_inputs, self.topk = hidden_size, num_inputs, topk
        w = settings.width
        self.logit_proj = nn.Linear(topk, hidden_size)
        self.inp = nn.Linear((num_inputs + 1) * hidden_size, w)
        self.mid = nn.Linear(w, w)
        self.blocks = nn.ModuleList(_Block(w, settings.mlp_ratio, settings.dropout) for _ in range(settings.blocks))
        self.norm = nn.LayerNorm(w)
        self.head = nn.Linear(w, 1)

    def forward(self, hidden_states: list[torch.Tensor], topk_logits: torch.Tensor) -> torch.Tensor:
        """hidden_states: num_inputs tensors (..., H); topk_logits (..., topk) -> logits (...)."""
        if len(hidden_states) != self.num_inputs:
            raise ValueError(f"decider expects {self.num_inputs} hidden states, got {len(hidden_states)}")
        dtype = self.inp.weight.dtype
        feats = [h.to(dtype) for h in hidden_states] + [_linear(self.logit_proj, topk_logits.to(dtype))]
        x = _linear(self.mid, _linear(self.inp, torch.cat(feats, dim=-1)))  # (..., width)
        for block in self.blocks:
            x = block(x)
        return _linear(self.head, _layer_norm(self.norm, x)).squeeze(-1)  # (...)


class Tah2Decider(nn.Module):
    """TaH2's decider (shared by every depth, no depth input): continuation logit after depth d from
    the token embedding e, the last hidden state h^(d) (after the final norm) and depth d's own logits z_d.

        f = norm_first(e); h = norm_last(h^(d)); l = norm_l(topk(softmax(z_d), k).values)  (sorted,
        zero-padded to k when the vocabulary is smaller); x = input_proj([f; h; l]) (3H -> H);
        x = norm_out(SwiGLU(x)); logit = score(x) (H -> 1)

    norm_l has size k, so the authors' checkpoints have k == H. Parameter names are theirs
    (`norm_first/norm_last/norm_l/norm_out.weight`, `input_proj.weight`, `mlp.*`, `score.weight`)."""

    def __init__(self, hidden_size: int, intermediate_size: int, topk: int, eps: float = 1e-6) -> None:
        super().__init__()
        from .updater import RMSNorm, SwiGLU

        self.topk = topk
        self.norm_first = RMSNorm(hidden_size, eps)
        self.norm_last = RMSNorm(hidden_size, eps)
        self.norm_l = RMSNorm(topk, eps)
        self.input_proj = nn.Linear(2 * hidden_size + topk, hidden_size, bias=False)
        self.mlp = SwiGLU(hidden_size, intermediate_size)
        self.norm_out = RMSNorm(hidden_size, eps)
        self.score = nn.Linear(hidden_size, 1, bias=False)
        nn.init.normal_(self.score.weight, std=0.01)  # the authors' init: starts near p = 0.5

    def forward(self, embeds: torch.Tensor, last_hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """embeds, last_hidden (..., H); logits (..., V) of this depth alone -> decider logits (...)."""
        dtype = self.input_proj.weight.dtype
        k = min(self.topk, logits.shape[-1])
        wide = logits if logits.dtype == torch.float64 else logits.float()
        probs = topk_logits(torch.softmax(wide, dim=-1).reshape(-1, wide.shape[-1]), k).values
        probs = probs.reshape(*wide.shape[:-1], k).to(dtype)
        if k < self.topk:
            probs = torch.nn.functional.pad(probs, (0, self.topk - k))
        x = torch.cat([self.norm_first(embeds.to(dtype)), self.norm_last(last_hidden.to(dtype)),
                       self.norm_l(probs)], dim=-1)
        return self.score(self.norm_out(self.mlp(self.input_proj(x)))).squeeze(-1)
