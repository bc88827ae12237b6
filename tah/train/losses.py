"""The two training objectives of TaH.

Stage 1 trains backbone + LoRA with next-token cross-entropy at each token's oracle depth: that is
`TaHForCausalLM(..., depths=oracle, labels=...)`'s loss, averaged once over the target tokens.
Stage 2 trains the decider alone: BCE-with-logits on its continuation logit after depth d against
the oracle's "goes deeper" label, for d = 1..min(max_depth - 1, oracle depth), weighted by
`pos_weight` = (stop labels) / (continue labels) counted on the labelled data, never hard-coded.

    python -c "import torch; from tah.train.losses import decider_loss; \
               print(decider_loss(torch.zeros(1, 3, 1), torch.tensor([[1, 2, 1]]), torch.ones(1, 3, dtype=torch.bool), 2.0))"
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..oracle import continue_labels


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
