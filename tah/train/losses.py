"""The training objectives of TaH (stage 1, stage 2) and TaH2 (one joint stage).

Stage 1 trains backbone + LoRA with next-token cross-entropy at each token's oracle depth: that is
`TaHForCausalLM(..., depths=oracle, labels=...)`'s loss, averaged once over the target tokens.
Stage 2 trains the decider alone: BCE-with-logits on its continuation logit after depth d against
the oracle's "goes deeper" label, for d = 1..min(max_depth - 1, oracle depth), weighted by
`pos_weight` = (stop labels) / (continue labels) counted on the labelled data, never hard-coded.

TaH2 trains everything at once on NTP + bce_weight x Dec, both summed and divided by N, the number of
supervised tokens of the optimizer step over all workers (thu-nics/TaH tah2/model/loss.py CombinedLoss):
NTP is the mixture's NLL; Dec = sum over depths d < M and supervised tokens that ran d of
cost x BCEwithLogits(decider logit after d, [label > d], pos_weight_d), the labels and costs from the
lookahead rule (tah.oracle.boundary_labels) and pos_weight_d = clamp(#negatives / #positives, 0.02, 50)
counted over every worker's targets at depth d in the micro-batch (1 when either count is 0).

    python -c "import torch; from tah.train.losses import decider_loss; \
               print(decider_loss(torch.zeros(1, 3, 1), torch.tensor([[1, 2, 1]]), torch.ones(1, 3, dtype=torch.bool), 2.0))"
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import check_choices
from ..oracle import continue_labels


@dataclass
class Tah2Objective:
    """TaH2's joint loss and its lookahead labels (the authors' recipe values as defaults)."""

    bce_weight: float = 0.05
    """Weight of the decider's cost-weighted BCE next to the mixture NLL."""
    coverage: float | list[float] = 0.99
    """Hard tokens at boundary d cover this share of the positive CE gains (a list: one per boundary,
    the last repeated)."""
    cost_min: float = 1e-6
    cost_max: float = 1.0
    """Each BCE term is weighted by clamp(|gain - tau|, cost_min, cost_max)."""
    pos_weight_min: float = 0.02
    pos_weight_max: float = 50.0
    """Bounds of the dynamic pos_weight = #negatives / #positives."""

    def __post_init__(self) -> None:
        check_choices(self)
        covs = self.coverage if isinstance(self.coverage, list) else [self.coverage]
        if not covs or any(not 0.0 < c <= 1.0 for c in covs):
            raise ValueError(f"tah2.coverage must be in (0, 1], got {self.coverage}")
        if not 0.0 < self.cost_min < self.cost_max:
            raise ValueError("tah2.cost_min and cost_max must satisfy 0 < cost_min < cost_max")
        if not 0.0 < self.pos_weight_min <= self.pos_weight_max:
            raise ValueError("tah2.pos_weight_min and pos_weight_max must satisfy 0 < min <= max")
        if self.bce_weight < 0:
            raise ValueError(f"tah2.bce_weight must be >= 0, got {self.bce_weight}")

    def coverage_at(self, d: int) -> float:
        """The coverage of boundary d (1-based)."""
        covs = self.coverage if isinstance(self.coverage, list) else [self.coverage]
        return covs[min(d, len(covs)) - 1]


def dynamic_pos_weight(counts: torch.Tensor, lo: float = 0.02, hi: float = 50.0) -> torch.Tensor:
    """counts (D, 2) [positives, negatives] per depth (summed over workers) -> (D,) fp32
    clamp(neg / pos, lo, hi), 1 where a depth lacks either class."""
    pos, neg = counts[:, 0].double(), counts[:, 1].double()
    ratio = (neg / pos.clamp_min(1)).clamp(lo, hi)
    return torch.where((pos > 0) & (neg > 0), ratio, torch.ones_like(ratio)).float()


def cost_weighted_bce(logits: torch.Tensor, targets: torch.Tensor, costs: torch.Tensor,
                      pos_weight: torch.Tensor | float) -> torch.Tensor:
    """Summed cost x BCEwithLogits(logits, targets, pos_weight) over (N,) decisions, in fp32."""
    pw = torch.as_tensor(pos_weight, dtype=torch.float32, device=logits.device)
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), pos_weight=pw, reduction="none")
    return (costs.float() * bce).sum()


def stop_continue_counts(depths: torch.Tensor, positions: torch.Tensor, max_depth: int) -> torch.Tensor:
    """(2,) float64: how many decider targets at the given (labelled) positions say stop / continue."""
    lab = continue_labels(depths, max_depth)[positions.bool()]  # (N, D-1)
    return torch.tensor([float((lab == 0).sum()), float((lab == 1).sum())], dtype=torch.float64)


def pos_weight(counts: torch.Tensor) -> float:
    """Stop-to-continue ratio from stop_continue_counts (summed over workers where there are several)."""
    if counts[1] == 0:
        raise ValueError("no continue labels in the data: the decider has nothing to learn")
    return float(counts[0] / counts[1])


def pos_weight_from_depths(depths: torch.Tensor, positions: torch.Tensor, max_depth: int) -> float:
    """Stop-to-continue ratio over the decider targets of the given (labelled) positions."""
    return pos_weight(stop_continue_counts(depths, positions, max_depth))


def decider_loss(decider_logits: torch.Tensor, depths: torch.Tensor, positions: torch.Tensor, pos_weight: float,
                 threshold: float = 0.5) -> tuple[torch.Tensor, dict[str, float]]:
    """decider_logits (B, T, D-1), oracle depths (B, T), positions (B, T) bool (which tokens are
    trained) -> (mean weighted BCE, {accuracy, precision, recall, targets})."""
    D = decider_logits.shape[-1] + 1
    lab = continue_labels(depths, D)  # (B, T, D-1), -1 where the token never reaches that depth
    use = (lab >= 0) & positions.bool()[..., None]
    x, y = decider_logits[use].float(), lab[use].float()
    n = max(int(use.sum()), 1)
    loss = F.binary_cross_entropy_with_logits(x, y, pos_weight=torch.tensor(pos_weight, device=x.device),
                                              reduction="sum") / n
    with torch.no_grad():
        pred = torch.sigmoid(x) > threshold
        tp, fp = int((pred & (y == 1)).sum()), int((pred & (y == 0)).sum())
        fn = int((~pred & (y == 1)).sum())
        stats = {"accuracy": float((pred == (y == 1)).float().mean()) if y.numel() else 0.0,
                 "precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1), "targets": float(y.numel())}
    return loss, stats
