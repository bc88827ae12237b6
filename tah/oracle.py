"""Oracle labels: which tokens are hard, as pure functions of a reference model's logits.

Position i makes the prediction of token i + 1. The default metric is **top-1 mismatch**: position i
is hard iff the reference model's argmax at i differs from token i + 1 (the flag sits on i, the
position that makes the wrong prediction). Only positions inside the assistant response are
labelled (token i and token i + 1 both assistant tokens); under TaH prompt tokens run depth 1
(AlwaysThink runs every token deeper: `row_depths`).

Alternatives (same hard ratio per sample as the mismatch count): the `entropy` or `ce` of the
reference prediction, top-k per sample. For max_depth > 2 the hard tokens are sorted by reference
cross-entropy and split into (max_depth - 1) equal bins, highest CE deepest.

    python -c "import torch; from tah.oracle import token_stats; print(token_stats(torch.randn(5, 7), torch.arange(5)))"
"""

from __future__ import annotations

from typing import Any, Callable

import torch

METRICS = ("mismatch", "entropy", "ce")


@torch.no_grad()
def _stats_flat(x: torch.Tensor, target: torch.Tensor, chunk: int) -> tuple[torch.Tensor, ...]:
    """x (N, V) logits, target (N,) -> mismatch, ce, entropy (N,), chunked so that fp32 copies of
    (N, V) never exist at once."""
    N = x.shape[0]
    mismatch = torch.empty(N, dtype=torch.bool, device=x.device)
    ce = torch.empty(N, dtype=torch.float32, device=x.device)
    ent = torch.empty(N, dtype=torch.float32, device=x.device)
    for a in range(0, N, chunk):
        c = x[a:a + chunk].float()  # (c, V)
        lse = torch.logsumexp(c, dim=-1)
        ent[a:a + chunk] = lse - (torch.softmax(c, dim=-1) * c).sum(-1)
        ce[a:a + chunk] = lse - c.gather(1, target[a:a + chunk, None]).squeeze(1)
        mismatch[a:a + chunk] = c.argmax(-1) != target[a:a + chunk]
    return mismatch, ce, ent


@torch.no_grad()
def token_stats(logits: torch.Tensor, input_ids: torch.Tensor, chunk: int = 4096) -> dict[str, torch.Tensor]:
    """logits (T, V) of a teacher-forced pass, input_ids (T,) -> per position i (predicting i + 1):
    mismatch (T,) bool, ce (T,) float32, entropy (T,) float32. The last position has no target:
    mismatch False, ce 0."""
    target = torch.cat([input_ids[1:], input_ids[-1:]])  # (T,), last one unused
    mismatch, ce, ent = _stats_flat(logits, target, chunk)
    mismatch[-1], ce[-1] = False, 0.0
    return {"mismatch": mismatch, "ce": ce, "entropy": ent}


@torch.no_grad()
def batch_token_stats(logits: torch.Tensor, input_ids: torch.Tensor, lengths: torch.Tensor,
                      chunk: int = 4096) -> dict[str, torch.Tensor]:
    """Right-padded batch: logits (B, T, V), input_ids (B, T), lengths (B,) -> the same statistics,
    (B, T) each, computed in one pass over the batch (positions at or past a row's end: 0 / False)."""
    B, T, V = logits.shape
    target = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)  # (B, T)
    mismatch, ce, ent = (t.view(B, T) for t in _stats_flat(logits.reshape(B * T, V), target.reshape(-1), chunk))
    has_target = torch.arange(T, device=logits.device)[None, :] < (lengths[:, None] - 1)  # (B, T)
    return {"mismatch": mismatch & has_target, "ce": ce.masked_fill(~has_target, 0.0), "entropy": ent}


def labelled_positions(assistant_mask: torch.Tensor) -> torch.Tensor:
    """(T,) bool: positions whose own token and whose target token are both assistant tokens."""
    m = assistant_mask.bool()
    out = torch.zeros_like(m)
    out[:-1] = m[:-1] & m[1:]
    return out


def oracle_depths(mismatch: torch.Tensor, ce: torch.Tensor, entropy: torch.Tensor, assistant_mask: torch.Tensor,
                  max_depth: int = 2, metric: str = "mismatch") -> torch.Tensor:
    """(T,) long depth per position in 1..max_depth."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if max_depth < 1:
        raise ValueError("max_depth must be >= 1")
    lab = labelled_positions(assistant_mask)
    hard = mismatch.bool() & lab
    depths = torch.ones_like(mismatch, dtype=torch.long)
    if max_depth == 1:
        return depths
    if metric != "mismatch":
        k = int(hard.sum())
        score = (entropy if metric == "entropy" else ce).float().masked_fill(~lab, float("-inf"))
        hard = torch.zeros_like(hard)
        if k:
            hard[score.topk(k).indices] = True
    idx = hard.nonzero().squeeze(1)
    if idx.numel() == 0:
        return depths
    if max_depth == 2:
        depths[idx] = 2
        return depths
    # Quantile bins of the hard tokens by reference CE: lowest bin -> depth 2, highest -> max_depth.
    order = idx[ce[idx].float().argsort(stable=True)]
    for b, part in enumerate(torch.tensor_split(order, max_depth - 1)):
        depths[part] = 2 + b
    return depths


def continue_labels(depths: torch.Tensor, max_depth: int) -> torch.Tensor:
    """(..., max_depth - 1) stage-2 targets: at depth d, 1 if the oracle goes deeper, 0 if it stops,
    -1 (ignored) where the token never reaches depth d (d = 1..min(max_depth - 1, oracle depth))."""
    d = torch.arange(1, max_depth, device=depths.device)
    lab = (depths[..., None] > d).long()
    return lab.masked_fill(depths[..., None] < d, -1)


# ------------------------------------------------------------------ the depth and label rules of a row
METHODS = ("standard", "always_think", "tah")


def row_depths(row: dict[str, Any], method: str, max_depth: int, metric: str = "mismatch") -> torch.Tensor:
    """(T,) depths of one label row for a training method.

    AlwaysThink runs every token at max_depth, the prompt's too: that is the baseline (paper: every
    token iterates) and what the engine's always_think policy serves. Under its within-depth causal
    attention a deeper query sees only that depth's keys, so a prompt left at depth 1 in training would
    leave the answer's deeper passes blind to the question, and serving them prompt keys they never saw."""
    am = torch.as_tensor(row["assistant_mask"])
    if method == "standard" or max_depth == 1:
        return torch.ones(len(am), dtype=torch.long)
    if method == "always_think":
        return torch.full((len(am),), max_depth, dtype=torch.long)
    if method != "tah":
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return oracle_depths(torch.as_tensor(row["ref_mismatch"]).bool(), torch.as_tensor(row["ref_ce"]),
                         torch.as_tensor(row["ref_entropy"]), am, max_depth, metric)


def row_labels(row: dict[str, Any]) -> torch.Tensor:
    """(T,) LM labels: the token where it is an assistant token (a training target), else -100."""
    ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
    return ids.masked_fill(~torch.as_tensor(row["assistant_mask"]).bool(), -100)


# ------------------------------------------------------------------ TaH2: online lookahead labels
# TaH2 (thu-nics/TaH tah2/model/iter_label.py) labels tokens while it trains, boundary by boundary
# d = 1..M-1: a candidate (a supervised token that ran depth d and was hard at d - 1) is hard at d when
# its CE gain from one more depth, delta = s_d - s_{d+1}, reaches the coverage threshold tau; its label
# is then d + 1. These are the pure parts; tah/train/tah2.py computes the scores (with the side pass).


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def coverage_threshold(deltas: torch.Tensor, coverage: float,
                       gather: Callable[[torch.Tensor], torch.Tensor] = _identity) -> float | None:
    """The smallest positive gain tau such that the gains >= tau cover `coverage` of the sum of all
    positive gains, pooled over the workers; None when no worker has a positive gain.

    deltas (N,): this worker's candidates' gains (any sign). `gather` concatenates a 1-D float64
    tensor over all workers (identity on one worker); every worker must call this the same number of
    times, so it is called even when this worker has no candidate. Sorting the pooled positives makes
    tau independent of the workers' order: the same as pooling every gain on one worker.
    """
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    local = deltas.detach().to(torch.float64).flatten()
    pooled = gather(local[local > 0])  # NaN gains are never > 0: they take no part
    if pooled.numel() == 0:
        return None
    ordered = pooled.sort(descending=True).values
    cum = ordered.cumsum(0)
    # First index whose running sum reaches coverage x total (cum is increasing: gains are > 0).
    idx = int(torch.searchsorted(cum, cum[-1] * coverage))
    return float(ordered[min(idx, ordered.numel() - 1)])


def boundary_labels(deltas: torch.Tensor, candidates: torch.Tensor, coverage: float,
                    gather: Callable[[torch.Tensor], torch.Tensor] = _identity, cost_min: float = 1e-6,
                    cost_max: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """One boundary d: deltas (N,) gains s_d - s_{d+1} (read only where `candidates` (N,) is set) ->
    (hard (N,) bool, cost (N,) fp32, tau).

    hard = candidate and delta >= tau (none when tau is None). cost = clamp(|delta - tau|, cost_min,
    cost_max) for candidates (tau taken as 0 when None), cost_min for every other token: a token the
    decider ran at d without being a candidate still gets a BCE term, at the smallest weight.
    """
    tau = coverage_threshold(deltas[candidates], coverage, gather)
    d = deltas.float()
    hard = candidates & (d >= tau) if tau is not None else torch.zeros_like(candidates)
    cost = torch.full_like(d, cost_min)
    cost[candidates] = (d[candidates] - (tau or 0.0)).abs().clamp(cost_min, cost_max)
    return hard, cost, tau


def dense_lookahead_labels(scores: torch.Tensor, executed: torch.Tensor, supervised: torch.Tensor,
                           coverage: float | list[float],
                           gather: Callable[[torch.Tensor], torch.Tensor] = _identity, cost_min: float = 1e-6,
                           cost_max: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, list[float | None]]:
    """Every boundary at once, from complete score tables (tests and analysis; training fills the
    scores it needs as it goes, tah/train/tah2.py).

    scores (N, M): s_d of each token at depth d (read where the token ran d - 1, i.e. also one depth
    past where it stopped: the side pass's); executed (N, M) bool: ran depth d in the main pass;
    supervised (N,) bool. Returns labels (N,) long (1..M, 0 where unsupervised), costs (N, M - 1) fp32
    and the taus. Candidates at d: supervised, ran d, hard at d - 1 (all supervised tokens at d = 1).
    """
    N, M = scores.shape
    covs = coverage if isinstance(coverage, list) else [coverage]
    labels = torch.ones(N, dtype=torch.long, device=scores.device)
    costs, taus = [], []
    cand = supervised.bool()
    for d in range(1, M):
        cand = cand & executed[:, d - 1]
        hard, cost, tau = boundary_labels(scores[:, d - 1] - scores[:, d], cand, covs[min(d, len(covs)) - 1],
                                          gather, cost_min, cost_max)
        labels[hard] = d + 1
        costs.append(cost)
        taus.append(tau)
        cand = hard
    costs_t = torch.stack(costs, 1) if costs else scores.new_zeros(N, 0)
    return labels.masked_fill(~supervised.bool(), 0), costs_t, taus
