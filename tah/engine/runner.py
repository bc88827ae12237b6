"""The engine's model runner: owns the model, the paged KV pool (through `kv.PagedBatch` per call) and the
per-row depth state; runs a step plan's prefills and its one decode pass and returns final-token logits.

- prefill: the parallel forward over each admitted request's uncached tokens (its prompt, or prompt +
  output on resume after preemption) with the paged cache; the decider runs on every prompt token as
  in the reference `generate()`; one forward per distinct depth cap (`model.depth_capped`).
- decode: ONE pass of the weights over every running row, each at its own depth
  (`TaHForCausalLM.decode_step` for v1, `decode_step_mix` for TaH2). A row whose token the decider sends
  deeper keeps its state -- v1: the top-k and cumulative logits (`pending`); TaH2: its mixture in
  `tah.mixture.MixtureState`, at the row's slot -- and runs the next depth in the next step's pass.
  Whether a token goes deeper is `TaHForCausalLM.goes_deeper`, the forward's own rule.

    python -m tah.engine      # the demo drives it through Engine
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..decider import topk_logits
from ..mixture import MixtureState
from ..model import TaHForCausalLM
from .kv import BlockPool, PagedBatch

if TYPE_CHECKING:
    from .scheduler import Request


class ModelRunner:
    """Runs the model for a step plan; depth_policy: decider | standard | always_think."""

    def __init__(self, model: TaHForCausalLM, pool: BlockPool, max_num_seqs: int, policy: str,
                 prompt_depth1: bool = False) -> None:
        c = model.config
        self.model, self.pool, self.policy = model, pool, policy
        self.prompt_depth1 = prompt_depth1  # prompt tokens at depth 1 (EngineConfig.prompt_depth)
        self.max_depth, self.mixture = c.max_depth, c.combine != "logit_residual"
        w = model.backbone.get_input_embeddings().weight
        self.device, self.vocab_size = w.device, w.shape[0]
        self.pending: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # v1 mid-token
        self.mix: MixtureState | None = None
        if self.mixture:
            wide = w.dtype if w.dtype == torch.float64 else torch.float32  # the forward's mixture precision
            self.mix = MixtureState(max_num_seqs, self.vocab_size, model.backbone.config.hidden_size,
                                    c.combine, wide, w.dtype, self.device)
        self._slots = list(range(max_num_seqs))

    def batch(self, reqs: list["Request"]) -> PagedBatch:
        return PagedBatch(self.pool, [r.kv for r in reqs], self.max_depth, self.model.config.depth_attention)

    # ------------------------------------------------------------------ per-request state
    def attach(self, r: "Request") -> None:
        r.slot = self._slots.pop()
        r.next_depth = 1

    def release(self, r: "Request") -> None:
        """Forget a request's depth state (finished, failed or preempted)."""
        self.pending.pop(r.rid, None)
        if r.slot >= 0:
            self._slots.append(r.slot)
            r.slot = -1
        r.next_depth = 1

    # ------------------------------------------------------------------ prefill
    def prefill(self, reqs: list["Request"], thresholds: list[float]
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(n, V) final logits of each request's last token, (n,) its depth, and per request the depths
        its fed tokens ran. May raise kv.NoFreeBlocks (its deeper entries did not fit).

        Each request feeds its uncached tokens. With prompt_depth1 that is two phases: its prompt's at
        depth 1, then (a request resumed after preemption) its generated tokens at its cap."""
        n = len(reqs)
        # phases: lists of (request index, tokens to feed, depth cap)
        if not self.prompt_depth1:
            phases = [[(j, r.tokens[r.kv.lengths[0]:], r.cap) for j, r in enumerate(reqs)]]
        else:
            first = [(j, r.prompt[r.kv.lengths[0]:], 1) for j, r in enumerate(reqs) if r.kv.lengths[0] < len(r.prompt)]
            # (the prefix cache never hits past a prompt in this mode: Scheduler.prompt_only_hits)
            then = [(j, r.output, r.cap) for j, r in enumerate(reqs) if r.output]
            phases = [ph for ph in (first, then) if ph]
        if len(phases) == 1 and len(phases[0]) == n:  # every request in order, one phase: as it is
            return self._forward(reqs, phases[0], thresholds)
        logits = depth = None
        ran: list[list[torch.Tensor]] = [[] for _ in range(n)]
        for phase in phases:
            lg, dp, rn = self._forward(reqs, phase, thresholds)
            if logits is None:
                logits = torch.zeros(n, lg.shape[1], dtype=lg.dtype, device=self.device)
                depth = torch.zeros(n, dtype=torch.long, device=self.device)
            js = torch.tensor([j for j, _, _ in phase], device=self.device)
            logits[js], depth[js] = lg, dp
            for (j, _, _), d in zip(phase, rn):
                ran[j].append(d)
        return logits, depth, [torch.cat(x) for x in ran]

    def _forward(self, reqs: list["Request"], feeds: list[tuple[int, list[int], int]], thresholds: list[float]
                 ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """One phase of a prefill: (m, V) last-token logits, (m,) their depth, the depths each fed token
        ran, for feeds = (request index, tokens, depth cap) into each request's paged cache."""
        dev = self.device
        forced = self.policy != "decider"
        # One forward per distinct cap, run as the model of that max depth: under a forced policy too
        # (the same result -- forced tokens stop at the cap either way -- without the decider running at
        # a cap it cannot change, and Standard's head runs on the last token only).
        groups: dict[int, list[int]] = {}
        for i, (_, _, cap) in enumerate(feeds):
            groups.setdefault(cap, []).append(i)
        logits = torch.zeros(len(feeds), self.vocab_size, device=dev)
        depth = torch.zeros(len(feeds), dtype=torch.long, device=dev)
        ran: list[torch.Tensor] = [torch.zeros(0)] * len(feeds)
        for cap, idx in groups.items():
            rs = [reqs[feeds[i][0]] for i in idx]
            toks = [feeds[i][1] for i in idx]
            T = max(len(f) for f in toks)
            ids = torch.zeros(len(rs), T, dtype=torch.long, device=dev)
            valid = torch.zeros(len(rs), T, dtype=torch.bool, device=dev)
            for i, f in enumerate(toks):
                ids[i, :len(f)] = torch.tensor(f, dtype=torch.long)
                valid[i, :len(f)] = True
            last = torch.tensor([len(f) - 1 for f in toks], device=dev)
            fd = None
            if forced:  # every token runs its request's cap
                fd = torch.tensor([cap] * len(rs), device=dev)[:, None].expand(len(rs), T).contiguous()
            thr = [thresholds[feeds[i][0]] for i in idx]
            thr_t = thr[0] if all(t == thr[0] for t in thr) else torch.tensor(thr, dtype=torch.float32, device=dev)
            with self.model.depth_capped(cap):
                out = self.model(ids, attention_mask=valid, depths=fd, past_key_values=self.batch(rs),
                                 threshold=thr_t, return_decider_logits=False, logits_at=last)
            it = torch.tensor(idx, device=dev)
            if len(groups) == 1:
                logits = out.logits
            else:
                logits = logits.to(out.logits.dtype)
                logits[it] = out.logits
            depth[it] = out.depths[torch.arange(len(rs), device=dev), last]
            for i, k in enumerate(idx):
                ran[k] = out.depths[i, :len(toks[i])]
        return logits, depth, ran

    # ------------------------------------------------------------------ decode
    def decode(self, rows: list["Request"], thresholds: list[float]
               ) -> tuple[torch.Tensor, torch.Tensor, list["Request"]]:
        """One pass over the running rows; returns (logits, depth, request) of the rows whose token is
        final this step (the others run their next depth in the next step)."""
        return self._decode_mix(rows, thresholds) if self.mixture else self._decode(rows, thresholds)

    def _thr(self, thresholds: list[float], idx: list[int] | None = None) -> float | torch.Tensor:
        vals = thresholds if idx is None else [thresholds[i] for i in idx]
        if all(v == vals[0] for v in vals):
            return vals[0]
        return torch.tensor(vals, dtype=torch.float32, device=self.device)

    def _decode(self, rows: list["Request"], thresholds: list[float]):
        dev, model = self.device, self.model
        depth = torch.tensor([r.next_depth for r in rows], dtype=torch.long, device=dev)
        ids = torch.tensor([r.output[-1] for r in rows], dtype=torch.long, device=dev)
        deep = [self.pending[r.rid] for r in rows if r.next_depth > 1]
        soft = prev = None
        if deep:
            soft = (torch.stack([p[0] for p in deep]), torch.stack([p[1] for p in deep]))
            prev = torch.stack([p[2] for p in deep])
        cum, hidden = model.decode_step(ids, depth, self.batch(rows), soft, prev)
        # Which rows may go deeper is known here from each row's depth and cap: no device sync to ask.
        below = [i for i, r in enumerate(rows) if r.next_depth < r.cap]
        cont = [False] * len(rows)
        top = None
        if below:  # (over every row: gathering the few rows at their cap out would copy more than it saves)
            top = topk_logits(cum, model.topk)  # the decider's input, and the soft input of the rows going on
            go = [True] * len(rows)  # always_think: every row below its cap
            if self.policy == "decider":  # each request's threshold
                go = model.goes_deeper(model.decider(hidden, top.values), self._thr(thresholds)).tolist()
            for i in below:
                cont[i] = go[i]
        done = []
        for i, (r, c) in enumerate(zip(rows, cont)):
            if c:
                self.pending[r.rid] = (top.values[i], top.indices[i], cum[i])
                r.next_depth += 1
            else:
                self.pending.pop(r.rid, None)
                r.next_depth = 1
                done.append(i)
        idx = torch.tensor(done, dtype=torch.long, device=dev)
        return cum[idx], depth[idx], [rows[i] for i in done]

    def _decode_mix(self, rows: list["Request"], thresholds: list[float]):
        """TaH2: the decider runs only where it can matter (rows below their cap; under always_think
        too, where stop_prob_mix weighs by its c_d); the updater only on the rows that iterate."""
        dev, n, mix = self.device, len(rows), self.mix
        depth_l = [r.next_depth for r in rows]
        below = [i for i, r in enumerate(rows) if depth_l[i] < r.cap]
        run = below if self.policy == "decider" or mix.combine == "stop_prob_mix" else []
        deep = [i for i in range(n) if depth_l[i] > 1]
        slots = torch.tensor([r.slot for r in rows], dtype=torch.long, device=dev)
        depth = torch.tensor(depth_l, dtype=torch.long, device=dev)
        ids = torch.tensor([r.output[-1] for r in rows], dtype=torch.long, device=dev)
        hidden = mix.hidden(slots[torch.tensor(deep, dtype=torch.long, device=dev)]) if deep else None
        decide = torch.tensor(run, dtype=torch.long, device=dev) if run else None
        z, h, dec = self.model.decode_step_mix(ids, depth, self.batch(rows), hidden, decide)
        cont, c = [False] * n, None
        if run:  # c_d as the forward computes it: sigmoid in the mixture's precision
            c = torch.ones(n, dtype=mix.dtype, device=dev).index_copy(0, decide, torch.sigmoid(dec.to(mix.dtype)))
        if self.policy == "decider" and run:
            for i, go in zip(run, self.model.goes_deeper(dec, self._thr(thresholds, run)).tolist()):
                cont[i] = go
        elif self.policy == "always_think":
            for i in below:
                cont[i] = True
        out, stop = mix.step(depth_l, z, h, cont, c, slots)
        for i, r in enumerate(rows):
            r.next_depth = depth_l[i] + 1 if cont[i] else 1
        return out, torch.tensor([depth_l[i] for i in stop], dtype=torch.long, device=dev), [rows[i] for i in stop]
