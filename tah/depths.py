"""The parallel forward's per-depth bookkeeping, apart from the model: which tokens run a depth and
where they sit (`Layout`), and how the per-depth logits become outputs -- each token's deepest
cumulative logits (v1) or the mixture over the depths it ran (TaH2), and their losses computed per depth
without assembling (B*T, V) -- plus the position and target rules of padded and packed batches.

`TaHForCausalLM.forward` (tah/model.py) fills per depth d: `layouts[d]` (the tokens that ran it, in
depth 1's list order), `cum_lists[d]` (N_d, V) (v1: cumulative logits; TaH2: depth d's own logits),
`conts[d]` (N_d,) (which of them went on to d + 1). The functions here only read those lists.

    python -m pytest tests/test_model.py tests/test_tah2.py    # their checks against brute-force references
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Layout:
    """Tokens running one depth: a sorted list of flat indices into (B*T) and their packed slots."""

    def __init__(self, flat: torch.Tensor, batch: int, seqlen: int) -> None:
        self.flat, self.B, self.T = flat, batch, seqlen  # (N,)
        self.identity = flat.numel() == batch * seqlen  # every token of every row: packing is a view
        row = flat // seqlen
        present = torch.unique(row)  # sorted row ids that have at least one token at this depth
        self.rows = None if present.numel() == batch else present
        row_in = row if self.rows is None else torch.searchsorted(present, row)
        counts = torch.bincount(row_in, minlength=present.numel())  # (B_d,)
        starts = counts.cumsum(0) - counts
        self.bi, self.qi = row_in, torch.arange(flat.numel(), device=flat.device) - starts[row_in]
        self.Bd, self.Td = present.numel(), int(counts.max()) if flat.numel() else 0
        self.q_valid = torch.arange(self.Td, device=flat.device)[None, :] < counts[:, None]  # (B_d, T_d)

    def pack(self, values: torch.Tensor) -> torch.Tensor:
        """(N, ...) in list order -> (B_d, T_d, ...) with zeros in padding slots."""
        if self.identity:
            return values.reshape(self.B, self.T, *values.shape[1:])
        out = values.new_zeros((self.Bd, self.Td, *values.shape[1:]))
        return out.index_put((self.bi, self.qi), values)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """(B_d, T_d, ...) -> (N, ...) in list order."""
        if self.identity:
            return packed.reshape(self.B * self.T, *packed.shape[2:])
        return packed[self.bi, self.qi]


def wide(x: torch.Tensor) -> torch.Tensor:
    """x in fp32 at least (fp64 stays fp64): the precision the mixture and decider outputs use."""
    return x if x.dtype == torch.float64 else x.float()


def assemble_logits(layouts: list[Layout], cum_lists: list[torch.Tensor], n: int, like: torch.Tensor) -> torch.Tensor:
    """(B*T, V): every token's deepest cumulative logits (zeros at padding). like: (V, H) the input
    embedding, for the dtype, device and V when no token ran."""
    if not layouts:
        return torch.zeros(n, like.shape[0], dtype=like.dtype, device=like.device)
    if layouts[0].identity:
        final = cum_lists[0]
    else:
        final = cum_lists[0].new_zeros(n, cum_lists[0].shape[-1]).index_copy(0, layouts[0].flat, cum_lists[0])
    for lay, cum in zip(layouts[1:], cum_lists[1:]):
        final = final.index_copy(0, lay.flat, cum)
    return final


def deepest_logits_at(flats: list[torch.Tensor], cum_lists: list[torch.Tensor], want: torch.Tensor, n: int,
              like: torch.Tensor) -> torch.Tensor:
    """(len(want), V): the deepest cumulative logits of the flat token indices `want` only (flats[d]:
    the flat index of each row of cum_lists[d]); like: (V, H) the input embedding."""
    out = torch.zeros(len(want), like.shape[0], dtype=like.dtype, device=like.device)
    where = torch.full((n,), -1, dtype=torch.long, device=want.device)
    where[want] = torch.arange(len(want), device=want.device)
    for flat, cum in zip(flats, cum_lists):  # deeper depths overwrite shallower ones
        idx = where[flat]
        sel = (idx >= 0).nonzero().squeeze(1)
        out[idx[sel]] = cum[sel].to(out.dtype)
    return out


def depthwise_loss(layouts: list[Layout], cum_lists: list[torch.Tensor], conts: list[torch.Tensor],
                    target: torch.Tensor) -> torch.Tensor:
    """Summed CE of the assembled logits vs flat targets (B*T,), computed per depth without assembling."""
    total = None
    for d, (lay, cum) in enumerate(zip(layouts, cum_lists)):
        t = target[lay.flat]
        if d < len(conts):
            t = t.masked_fill(conts[d], -100)  # scored at a deeper depth
        part = F.cross_entropy(cum.float(), t, ignore_index=-100, reduction="sum")
        total = part if total is None else total + part
    return total


# ------------------------------------------------------------------ TaH2: mixture over depths
def mixture_log_weights(combine: str, layouts: list[Layout], conts: list[torch.Tensor],
                        dec_parts: list[tuple[torch.Tensor, int, torch.Tensor]], run_depth: torch.Tensor,
                        like: torch.Tensor) -> list[torch.Tensor]:
    """Per depth d, (N_d,) fp32 log w_d of its tokens.

    stop_prob_mix: c_d = sigmoid(decider logit after d) in fp32, R_1 = 1, R_{d+1} = R_d c_d;
    w_d = R_d (1 - c_d) where the token continues past d, R_d where it stops at d (also at the cap
    M). Forced depths force only the stops: the weights still use each executed depth's c_d.
    even_mix: w_d = 1 / (the token's executed depth count). like: the input embedding (the precision
    when no decider ran)."""
    if combine == "even_mix":
        dt = wide(like).dtype
        return [-torch.log(run_depth[lay.flat].to(dt)) for lay in layouts]
    out = []
    mass = None  # R_d of depth d's tokens
    for d, lay in enumerate(layouts):
        if mass is None:  # (max_depth 1 runs no decider: the weights' precision is the model's, widened)
            dt = wide(dec_parts[0][2] if dec_parts else like).dtype
            mass = torch.ones(lay.flat.numel(), dtype=dt, device=lay.flat.device)
        if d < len(conts):
            c = torch.sigmoid(wide(dec_parts[d][2]))
            out.append(torch.log(torch.where(conts[d], mass * (1 - c), mass)))
            mass = (mass * c)[conts[d]]
        else:
            out.append(torch.log(mass))
    return out


def first_depth_index(layouts: list[Layout], conts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per depth d, (N_d,) the index of each of its tokens in depth 1's list."""
    idx = [torch.arange(layouts[0].flat.numel(), device=layouts[0].flat.device)]
    for d in range(1, len(layouts)):
        idx.append(idx[d - 1][conts[d - 1]])
    return idx


def mixture_logits(layouts: list[Layout], own: list[torch.Tensor], conts: list[torch.Tensor],
                   log_w: list[torch.Tensor], n: int, like: torch.Tensor) -> torch.Tensor:
    """(B*T, V) fp32: logsumexp_d(log w_d + log_softmax(z_d)) per token (zeros at padding)."""
    if not layouts:
        return torch.zeros(n, like.shape[0], dtype=torch.float32, device=like.device)
    acc = log_w[0][:, None] + torch.log_softmax(wide(own[0]), dim=-1)  # (N_1, V)
    for idx, z, lw in zip(first_depth_index(layouts, conts)[1:], own[1:], log_w[1:]):
        term = lw[:, None] + torch.log_softmax(wide(z), dim=-1)
        acc = acc.index_put((idx,), torch.logaddexp(acc[idx], term))
    if layouts[0].identity:
        return acc
    return acc.new_zeros(n, acc.shape[-1]).index_copy(0, layouts[0].flat, acc)


def mixture_nll(layouts: list[Layout], own: list[torch.Tensor], conts: list[torch.Tensor],
                log_w: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Summed -log p_mix(target) over the tokens with a target, gathering only the target's
    log-probability per depth (no (N, V) mixture is assembled)."""
    if not layouts:
        return torch.zeros((), device=target.device)
    t1 = target[layouts[0].flat]  # (N_1,)
    has = t1 != -100
    tgt = t1.clamp_min(0)
    acc = None
    for idx, z, lw in zip(first_depth_index(layouts, conts), own, log_w):
        zf = wide(z)
        lp = lw + zf.gather(1, tgt[idx][:, None])[:, 0] - torch.logsumexp(zf, dim=-1)
        acc = lp if acc is None else acc.index_put((idx,), torch.logaddexp(acc[idx], lp))
    return -(acc[has]).sum()


def segment_positions(segment_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids restarting at 0 for each packed sample (counting real tokens only)."""
    c = valid.long().cumsum(1)  # real tokens up to and including t
    start = torch.ones_like(valid)
    start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    # Real tokens before each sample's first token, carried forward over the sample (non-decreasing).
    before = torch.where(start, c - valid.long(), torch.zeros_like(c)).cummax(1).values
    return (c - 1 - before).clamp_min(0)


def next_token_targets(labels: torch.Tensor, valid: torch.Tensor,
                       segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) target of each position: labels[t + 1], or -100 where t or t + 1 is padding (or where
    t + 1 starts another packed sample).

    Masking the *source* position too matters with left padding: HF's loss scores the last pad
    position against the first real token. The loss is normalised once by the number of targets
    (the authors' code divided twice).
    """
    labels = labels.masked_fill(~valid, -100)
    target = torch.full_like(labels, -100)
    target[:, :-1] = labels[:, 1:]
    if segment_ids is not None:
        target[:, :-1] = target[:, :-1].masked_fill(segment_ids[:, 1:] != segment_ids[:, :-1], -100)
    return target.masked_fill(~valid, -100)
