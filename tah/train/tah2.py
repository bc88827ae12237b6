"""TaH2's joint training step: the main pass, the lookahead side pass, online labels, NTP + cost-weighted BCE.

One micro-batch (thu-nics/TaH tah2/model/tah_runtime.py, iter_label.py, loss.py; spec section 2):

1. Main pass with grad, the decider routing: depth 1 on every token, depth d + 1 on the tokens the
   decider continues (`TaHForCausalLM.forward(return_depth_states=True)`). s_d = per-token CE of
   depth d's own logits, detached.
2. For each boundary d = 1..M-1, candidates = supervised tokens that ran d and were hard at d - 1.
   A candidate that stopped at d has no s_{d+1}: the **side pass** runs it once more, without grad, at
   depth d + 1 with input updater(e, h^(d)) against the main pass's keys (`lookahead_scores`).
3. delta = s_d - s_{d+1}; tau = the coverage threshold pooled over every worker (`gather`); hard =
   delta >= tau -> label d + 1; cost = clamp(|delta - tau|, 1e-6, 1) (tah.oracle.boundary_labels).
4. Loss sums: NTP = the mixture's NLL; Dec = sum_d cost x BCE(decider logit after d, [label > d],
   pos_weight_d) over supervised tokens that ran d, pos_weight_d from every worker's counts
   (tah.train.losses). The loop divides both by the step's global supervised-token count.

The side pass runs only the candidates that stopped, not every token of depth d as the authors'
duo side pass does: their pass recomputes the continuing tokens' depth-(d+1) keys, which equal the
main pass's exactly, so reading those keys from the main pass gives the same scores for less work.
Visibility of a side-pass query at (i, d + 1), duo (the authors' `duo_posterior`): keys of depths
1..d of tokens j <= i, depth-(d+1) keys of the tokens that continued (j <= i), and its own new key;
first_self (their causal): depth-1 keys j <= i and its own keys at depths 2..d + 1.

Where the authors' code has a corner case this follows the rule instead: when no worker has a
candidate at a boundary, the decisions at that depth get no costs of their own and fall back to weight
1 (or to depth 1's costs when the token counts happen to match: their IterDeciderLoss fallback); here
every non-candidate keeps cost_min (1e-6).

Collectives: `gather` is called exactly once per boundary (M - 1 times) and `reduce` once per
micro-batch on every worker, whatever the routing -- empty tensors are allowed -- so workers whose
micro-batches route differently stay in step. The side pass itself has no collective (ZeRO <= 2).

    (used by tah/train/loop.py for method tah2; tests/test_tah2_train.py checks every part)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import hf_adapter as hf
from ..attention import DuoCausalSpec
from ..cache import PackedKV, _DepthView, _query_pos
from ..depths import Layout, next_token_targets, wide
from ..model import DepthStates, TaHForCausalLM, TaHOutput
from ..oracle import _identity, boundary_labels
from .losses import Tah2Objective, cost_weighted_bce, dynamic_pos_weight

Gather = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def per_token_ce(logits: torch.Tensor, target: torch.Tensor, rows: torch.Tensor | None = None,
                 chunk: int = 4096) -> torch.Tensor:
    """(N, V) logits (or the rows `rows` (n,) of them), (n,) targets -> (n,) fp32 cross-entropy (fp64 for
    fp64 logits; 0 where the target is -100), chunked so that no fp32 copy of the whole (n, V) exists."""
    out = torch.zeros(target.shape[0], dtype=wide(logits).dtype, device=logits.device)
    for a in range(0, target.shape[0], chunk):
        z = wide(logits[a:a + chunk] if rows is None else logits[rows[a:a + chunk]])  # (c, V)
        t = target[a:a + chunk]
        ce = torch.logsumexp(z, -1) - z.gather(1, t.clamp_min(0)[:, None])[:, 0]
        out[a:a + chunk] = ce.masked_fill(t == -100, 0.0)
    return out


def check_tah2_model(model: TaHForCausalLM) -> None:
    """TaH2 training needs the TaH2 configuration (updater input, TaH2 decider, a mixture, M >= 2)."""
    c = model.config
    if c.max_depth < 2 or c.input_rule != "updater" or c.decider_kind != "tah2" or c.combine == "logit_residual":
        raise ValueError("TaH2 training needs a TaH2 model (TaHConfig.tah2: max_depth >= 2, input_rule=updater, "
                         f"decider_kind=tah2, a mixture combine); got max_depth={c.max_depth}, "
                         f"input_rule={c.input_rule}, decider_kind={c.decider_kind}, combine={c.combine}")
    if c.depth_attention not in ("duo_causal", "first_self"):
        raise ValueError(f"TaH2's side pass is defined for depth_attention duo_causal or first_self, "
                         f"not {c.depth_attention!r}")


class _LookaheadView(_DepthView):
    """The side pass's keys at depth `depth` (= d + 1): the main pass's keys the rule allows (detached,
    row-selected) followed by the queries' own new keys, which only their own position sees."""

    def __init__(self, store: PackedKV, depth: int, rows: torch.Tensor | None, q_pos: torch.Tensor,
                 q_valid: torch.Tensor, q_segment: torch.Tensor | None, backend: str, counts) -> None:
        self.store, self.rows = store, rows
        if store.depth_attention == "duo_causal":  # depths 1..d, and d + 1 where tokens continued
            self.main = [(j, False) for j in range(1, depth + 1) if j in store.pos]
        else:  # first_self: depth-1 keys, and the token's own deeper keys only at its own position
            self.main = [(1, False)] + [(j, True) for j in range(2, depth) if j in store.pos]
        sel = self._sel
        k_pos = torch.cat([sel(store.pos[j]) for j, _ in self.main] + [q_pos], 1)  # (B_q, Tk)
        k_valid = torch.cat([sel(store.valid[j]) for j, _ in self.main] + [q_valid], 1)
        k_self = torch.cat([torch.full_like(sel(store.valid[j]), own) for j, own in self.main]
                           + [torch.ones_like(q_valid)], 1)
        k_segment = None
        if q_segment is not None:
            if any(j not in store.seg for j, _ in self.main):
                raise ValueError("segment_ids given to the side pass but not to the main pass")
            k_segment = torch.cat([sel(store.seg[j]) for j, _ in self.main] + [q_segment], 1)
        self.spec = DuoCausalSpec(q_pos=_query_pos(q_pos, q_valid), k_pos=k_pos, k_valid=k_valid, backend=backend,
                                  counts=counts, q_segment=q_segment, k_segment=k_segment, k_self_only=k_self)

    def _sel(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.rows is None else t.index_select(0, self.rows)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        st = self.store
        ks = [self._sel(st.k[layer_idx][j]).detach() for j, _ in self.main] + [key_states]
        vs = [self._sel(st.v[layer_idx][j]).detach() for j, _ in self.main] + [value_states]
        return torch.cat(ks, 2), torch.cat(vs, 2)


@torch.no_grad()
def lookahead_scores(model: TaHForCausalLM, states: DepthStates, input_ids: torch.Tensor, target: torch.Tensor,
                     d: int, queries: torch.Tensor, segment_ids: torch.Tensor | None = None,
                     chunk: int = 4096) -> torch.Tensor:
    """s_{d+1} of tokens that ran depth d but stopped there: (Nq,) fp32 CE of their depth-(d+1) own logits.

    input_ids (B, T); target (B*T,) next-token targets; queries (Nq,) sorted flat indices (each ran
    depth d and did not run d + 1 in the main pass); segment_ids (B, T) when the rows are packed.
    """
    B, T = input_ids.shape
    if queries.numel() == 0:
        return torch.zeros(0, dtype=wide(states.logits[0]).dtype, device=input_ids.device)
    flat_d = states.flat[d - 1]
    where = torch.searchsorted(flat_d, queries)
    if bool((where >= flat_d.numel()).any()) or not torch.equal(flat_d[where.clamp_max(flat_d.numel() - 1)], queries):
        raise ValueError(f"side-pass queries must have run depth {d}")
    if d < len(states.flat) and bool(torch.isin(queries, states.flat[d]).any()):
        raise ValueError(f"side-pass queries must not have run depth {d + 1} in the main pass")
    emb = model.backbone.get_input_embeddings()
    x = model.updater(emb(input_ids.reshape(-1)[queries]), states.last_hidden[d - 1][where].detach())  # (Nq, H)
    lay = Layout(queries, B, T)
    q_pos = lay.pack(states.position_ids.reshape(-1)[queries])  # (B_q, T_q)
    q_seg = lay.pack(segment_ids.reshape(-1)[queries]) if segment_ids is not None else None
    view = _LookaheadView(states.store, d + 1, lay.rows, q_pos, lay.q_valid, q_seg, model.config.attn_backend,
                          model.attention_paths)
    h, _ = model._layers(lay.pack(x), q_pos, view, set())  # (TaH2 has no depth LoRA to switch on)
    h = lay.unpack(h)  # (Nq, H)
    head = hf.decoder_parts(model.backbone).lm_head
    tq = target[queries]
    return torch.cat([per_token_ce(head(h[a:a + chunk]), tq[a:a + chunk]) for a in range(0, len(tq), chunk)])


@torch.no_grad()
def _main_scores(states: DepthStates, d: int, want: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """s_d of the flat tokens `want` (sorted, each ran depth d in the main pass): (len(want),) fp32."""
    if want.numel() == 0:
        return torch.zeros(0, dtype=wide(states.logits[0]).dtype, device=want.device)
    idx = torch.searchsorted(states.flat[d - 1], want)
    return per_token_ce(states.logits[d - 1].detach(), target[want], rows=idx)


@dataclass
class Lookahead:
    """The online labels of one micro-batch, flat over (B*T)."""

    labels: torch.Tensor
    """(B*T,) long: 1..M for supervised tokens, 0 elsewhere."""
    costs: torch.Tensor
    """(B*T, M-1) fp32: the BCE weight of the decision after depth d at [:, d - 1]."""
    taus: list[float | None]
    """The pooled threshold per boundary (None: no positive gain on any worker)."""
    candidates: list[int] = field(default_factory=list)
    """Candidates per boundary on this worker."""
    side_tokens: int = 0
    """Tokens the side passes ran on this worker."""


@torch.no_grad()
def lookahead_labels(model: TaHForCausalLM, states: DepthStates, input_ids: torch.Tensor, target: torch.Tensor,
                     run_depth: torch.Tensor, obj: Tah2Objective, gather: Gather = _identity,
                     segment_ids: torch.Tensor | None = None) -> Lookahead:
    """Labels and costs of every boundary d = 1..M-1 (see the module docstring); calls `gather` once per
    boundary. target (B*T,) next-token targets; run_depth (B*T,) the depth each token ran."""
    M = model.config.max_depth
    sup = target != -100
    labels = torch.ones_like(target)
    costs, taus, ncand = [], [], []
    side = 0
    cand = sup & (run_depth >= 1)
    # scores in fp32 (fp64 for an fp64 model); NaN where not computed (never read: only candidates are)
    s_d = torch.full(target.shape, float("nan"), dtype=wide(states.logits[0]).dtype, device=target.device)
    want = cand.nonzero().squeeze(1)
    s_d[want] = _main_scores(states, 1, want, target)
    for d in range(1, M):
        cand = cand & (run_depth >= d)
        s_next = torch.full_like(s_d, float("nan"))
        cont = (cand & (run_depth >= d + 1)).nonzero().squeeze(1)  # s_{d+1} from the main pass
        s_next[cont] = _main_scores(states, d + 1, cont, target)
        stopped = (cand & (run_depth == d)).nonzero().squeeze(1)  # s_{d+1} from the side pass
        s_next[stopped] = lookahead_scores(model, states, input_ids, target, d, stopped, segment_ids)
        side += stopped.numel()
        hard, cost, tau = boundary_labels(s_d - s_next, cand, obj.coverage_at(d), gather, obj.cost_min, obj.cost_max)
        labels[hard] = d + 1
        costs.append(cost)
        taus.append(tau)
        ncand.append(int(cand.sum()))
        cand, s_d = hard, s_next
    return Lookahead(labels.masked_fill(~sup, 0), torch.stack(costs, 1), taus, ncand, side)


@dataclass
class JointResult:
    """One micro-batch of the joint stage: the loss sums (not yet divided by N) and what to log."""

    loss_sum: torch.Tensor
    """NTP sum + bce_weight x Dec sum, with grad."""
    nll_sum: float
    bce_sum: float
    supervised: int
    """Supervised tokens (targets) of this micro-batch on this worker."""
    pos_weight: torch.Tensor
    """(M-1,) the pos_weight used after each depth (the same on every worker)."""
    lookahead: Lookahead
    run_counts: torch.Tensor
    """(M,) supervised tokens whose deepest depth was d, at [d - 1]."""
    label_counts: torch.Tensor
    """(M,) supervised tokens labelled d."""
    decisions: torch.Tensor
    """(2,) decider decisions that agreed with their target, and all decisions."""


def joint_loss(model: TaHForCausalLM, forward: Callable[..., TaHOutput], batch: dict[str, torch.Tensor],
               obj: Tah2Objective, gather: Gather = _identity,
               reduce: Callable[[torch.Tensor], torch.Tensor] = _identity) -> JointResult:
    """The main pass (through `forward`: the model, or the DeepSpeed engine wrapping it), the labels,
    and the loss sums of one micro-batch. batch: input_ids, attention_mask, labels (B, T) [, segment_ids].
    `reduce` sums a tensor over the workers (the pos_weight counts); `gather` pools the gains."""
    check_tah2_model(model)
    M = model.config.max_depth
    ids, mask, seg = batch["input_ids"], batch["attention_mask"], batch.get("segment_ids")
    extra = {"segment_ids": seg} if seg is not None else {}
    out = forward(ids, attention_mask=mask, labels=batch["labels"], return_logits=False, return_depth_states=True,
                  **extra)
    target = next_token_targets(batch["labels"], mask.bool(), seg).reshape(-1)  # (B*T,)
    sup = target != -100
    n = int(sup.sum())
    nll = out.loss * max(n, 1)  # forward's loss is the sum / max(n, 1)
    run_depth = out.depths.reshape(-1)
    look = lookahead_labels(model, out.depth_states, ids, target, run_depth, obj, gather, seg)
    dec = out.decider_logits.reshape(-1, M - 1)  # (B*T, M-1) fp32
    with torch.no_grad():
        counts = torch.zeros(M - 1, 2, dtype=torch.float64, device=ids.device)
        active = [sup & (run_depth >= d) for d in range(1, M)]
        for d in range(1, M):
            y = look.labels[active[d - 1]] > d
            counts[d - 1] = torch.stack([y.sum(), (~y).sum()]).double()
        pw = dynamic_pos_weight(reduce(counts), obj.pos_weight_min, obj.pos_weight_max)
    bce = dec.new_zeros(())
    agree = torch.zeros(2, dtype=torch.float64)
    for d in range(1, M):
        a = active[d - 1]
        z, y = dec[a, d - 1], (look.labels[a] > d).float()
        bce = bce + cost_weighted_bce(z, y, look.costs[a, d - 1], pw[d - 1])
        said = torch.sigmoid(z.detach()) > model.threshold  # what the decider decided
        agree += torch.tensor([float((said == (y > 0.5)).sum()), float(y.numel())], dtype=torch.float64)
    with torch.no_grad():
        run_counts = torch.bincount(run_depth[sup], minlength=M + 1)[1:M + 1].double().cpu()
        label_counts = torch.bincount(look.labels[sup], minlength=M + 1)[1:M + 1].double().cpu()
    return JointResult(nll + obj.bce_weight * bce, float(nll.detach()), float(bce.detach()), n, pw.cpu(), look,
                       run_counts, label_counts, agree)


class JointStep:
    """The joint stage's per-optimizer-step bookkeeping: the normaliser N and the step's metrics.

    `begin(batches)` counts the supervised tokens of the step's micro-batches on every worker (one
    `reduce`); `micro(forward, batch)` returns the micro-batch's loss to back-propagate,
    (NTP + bce_weight x Dec) x scale / N, where `scale` undoes the runner's averaging (DeepSpeed divides
    by the accumulation steps and averages gradients over the workers: scale = accum x world), so the
    optimizer sees the step's sums over every worker divided by N once, as the authors' loop does;
    `metrics()` (one `reduce`, one `gather`) gives the step's global values.

    Every micro-batch's loss also touches the updater and the decider with a zero weight: a worker whose
    tokens all stop at depth 1 runs no updater, and ZeRO's bucketed gradient all-reduce needs every
    trainable parameter to get a gradient on every worker (v1's fix for its LoRA, tah/train/loop.py)."""

    def __init__(self, model: TaHForCausalLM, obj: Tah2Objective, gather: Gather = _identity,
                 reduce: Callable[[torch.Tensor], torch.Tensor] = _identity, scale: float = 1.0) -> None:
        check_tah2_model(model)
        self.model, self.obj, self.gather, self.reduce, self.scale = model, obj, gather, reduce, scale
        self.M = model.config.max_depth
        self.norm = 1.0
        self.skippable = [p for mod in (model.updater, model.decider) for p in mod.parameters() if p.requires_grad]
        self._reset()

    def _reset(self) -> None:
        M = self.M
        # [nll, bce, supervised, side-pass tokens, run counts (M), label counts (M), agreeing decisions, decisions]
        self.sums = torch.zeros(6 + 2 * M, dtype=torch.float64)
        self.tau = [[] for _ in range(M - 1)]
        self.pw = torch.zeros(M - 1, dtype=torch.float64)
        self.micros = 0
        self.side_tokens = 0  # this worker's, this step

    def begin(self, batches: list[dict[str, torch.Tensor]]) -> float:
        """N of the step: supervised targets of `batches` (this worker's micro-batches) over all workers."""
        n = sum(int((next_token_targets(b["labels"], b["attention_mask"].bool(), b.get("segment_ids")) != -100).sum())
                for b in batches)
        dev = batches[0]["input_ids"].device
        self.norm = max(float(self.reduce(torch.tensor([float(n)], dtype=torch.float64, device=dev))[0]), 1.0)
        self._reset()
        return self.norm

    def micro(self, forward: Callable[..., TaHOutput], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        res = joint_loss(self.model, forward, batch, self.obj, self.gather, self.reduce)
        head = [res.nll_sum, res.bce_sum, float(res.supervised), float(res.lookahead.side_tokens)]
        self.sums += torch.cat([torch.tensor(head, dtype=torch.float64), res.run_counts, res.label_counts,
                                res.decisions])
        self.side_tokens += res.lookahead.side_tokens
        for d, t in enumerate(res.lookahead.taus):
            if t is not None:
                self.tau[d].append(t)
        self.pw += res.pos_weight.double()
        self.micros += 1
        touch = sum((p.reshape(-1)[0] for p in self.skippable), res.loss_sum.new_zeros(()))
        return res.loss_sum * (self.scale / self.norm) + 0.0 * touch

    def metrics(self) -> dict[str, float]:
        """The step's metrics over every worker: loss = ntp + bce_weight x bce (each divided by N),
        share of supervised tokens by deepest depth, by label and run by the side pass, the decider's agreement with its
        targets, and per boundary the mean tau of the step's micro-batches (identical on every worker:
        tau_d*_spread, its max - min over the workers, is 0) and the mean pos_weight."""
        M = self.M
        dev = self.model.backbone.get_input_embeddings().weight.device
        tot = self.reduce(self.sums.to(dev)).cpu()
        n = max(float(tot[2]), 1.0)
        taus = torch.tensor([sum(t) / len(t) if t else 0.0 for t in self.tau], dtype=torch.float64)
        every = self.gather(taus.to(dev)).cpu().view(-1, M - 1)  # (workers, M-1)
        out = {"ntp": float(tot[0]) / self.norm, "bce": float(tot[1]) / self.norm}
        out["loss"] = out["ntp"] + self.obj.bce_weight * out["bce"]
        out["side_share"] = float(tot[3]) / n  # supervised tokens the side passes ran, per supervised token
        for d in range(1, M + 1):
            out[f"share_depth{d}"] = float(tot[4 + d - 1]) / n
            out[f"label_share_d{d}"] = float(tot[4 + M + d - 1]) / n
        out["decider_accuracy"] = float(tot[4 + 2 * M]) / max(float(tot[5 + 2 * M]), 1.0)
        for d in range(1, M):
            out[f"tau_d{d}"] = float(taus[d - 1])
            out[f"tau_d{d}_spread"] = float(every[:, d - 1].max() - every[:, d - 1].min())
            out[f"pos_weight_d{d}"] = float(self.pw[d - 1]) / max(self.micros, 1)
        return out
