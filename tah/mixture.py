"""TaH2's per-row decode state in the serving engine: what a token that iterates carries between steps.

A TaH2 token's output is a mixture over the depths it runs (`tah.depths.mixture_logits`):

    log p = logsumexp_d(log w_d + log_softmax(z_d))
    stop_prob_mix: c_d = sigmoid(decider logit after d), R_1 = 1, R_{d+1} = R_d c_d,
                   w_d = R_d (1 - c_d) where the token continues past d, R_d where it stops (cap included)
    even_mix:      w_d = 1 / (depths run)

The engine (tah/engine.py) runs one depth of each row per step, so a row whose decider says continue
keeps, in pools indexed by its slot: the log-mix accumulator (V values: logsumexp of the terms of the
depths run so far), the remaining mass R_{d+1}, and the last hidden state h^(d) the updater reads at
d + 1. A row that stops is sampled from logaddexp(accumulator, log R_d + log p_d) (even_mix: minus
log d); a row that stops at depth 1 -- most rows -- is sampled from log p_1 itself: no (V,) work beyond
the log-softmax. The order of the floating-point operations is the parallel forward's, so a token's
log-probabilities equal the reference's up to the batched matmuls' rounding.

    python -c "from tah.mixture import MixtureState; print(MixtureState.__doc__)"
"""

from __future__ import annotations

import torch


class MixtureState:
    """Pools of the rows mid-token, indexed by cache slot: acc (slots, V), R (slots,), h (slots, H).

    Only a row that continues writes its slot; a row that starts a token (depth 1) reads nothing, so
    a slot never needs clearing when a request ends or a new one takes it."""

    def __init__(self, slots: int, vocab_size: int, hidden_size: int, combine: str, dtype: torch.dtype,
                 hidden_dtype: torch.dtype, device: torch.device | str) -> None:
        if combine not in ("stop_prob_mix", "even_mix"):
            raise ValueError(f"MixtureState mixes stop_prob_mix | even_mix, not {combine!r}")
        self.combine, self.dtype = combine, dtype
        self.acc = torch.zeros(slots, vocab_size, dtype=dtype, device=device)  # log-mix accumulator
        self.R = torch.ones(slots, dtype=dtype, device=device)  # mass left for the depths after
        self.h = torch.zeros(slots, hidden_size, dtype=hidden_dtype, device=device)  # h^(d), final-normed
        self._slots: torch.Tensor | None = None  # step()'s row -> slot map

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.acc, self.R, self.h))

    def move(self, src: int, dst: int) -> None:
        """Slot src's state into slot dst (the engine keeps live rows leading)."""
        for t in (self.acc, self.R, self.h):
            t[dst] = t[src]

    def hidden(self, rows: torch.Tensor) -> torch.Tensor:
        """(N,) slots -> (N, H) their last hidden states (the updater's input at the next depth)."""
        return self.h.index_select(0, rows)

    def step(self, depth: list[int], logits: torch.Tensor, hidden: torch.Tensor, cont: list[bool],
             c: torch.Tensor | None, slots: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
        """Fold one depth of rows 0..n-1 into their mixtures.

        depth: the depth each row ran; logits (n, V) its own logits z_d; hidden (n, H) its h^(d);
        cont: whether the row runs d + 1 next step; c (n,) the decider's continue probability in this
        state's precision (read where a stop_prob_mix row continues; None if no row does).
        slots (n,): each row's state slot (None: row i uses slot i).
        Returns (n_stop, V) the stopping rows' mixture log-probs and those rows (in row order)."""
        dev = logits.device
        self._slots = slots
        logp = torch.log_softmax(logits.to(self.dtype), dim=-1)  # (n, V)
        stop = [i for i, k in enumerate(cont) if not k]
        deep_stop = [i for i in stop if depth[i] > 1]
        if deep_stop:  # written into logp's rows: the stopping rows' output without another (n, V)
            ds = torch.tensor(deep_stop, dtype=torch.long, device=dev)
            lp = logp.index_select(0, ds)
            if self.combine == "stop_prob_mix":
                mix = torch.logaddexp(self.acc.index_select(0, self._s(ds)),
                                      torch.log(self.R.index_select(0, self._s(ds)))[:, None] + lp)
            else:
                count = torch.tensor([depth[i] for i in deep_stop], dtype=self.dtype, device=dev)
                mix = torch.logaddexp(self.acc.index_select(0, self._s(ds)), lp) - torch.log(count)[:, None]
            logp.index_copy_(0, ds, mix)
        go = [i for i, k in enumerate(cont) if k]
        if go:
            self._continue(go, depth, logp, hidden, c)
        if len(stop) == len(cont):
            return logp, stop
        return logp.index_select(0, torch.tensor(stop, dtype=torch.long, device=dev)), stop

    def _s(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows -> their state slots."""
        return rows if self._slots is None else self._slots.index_select(0, rows)

    def _continue(self, go: list[int], depth: list[int], logp: torch.Tensor, hidden: torch.Tensor,
                  c: torch.Tensor | None) -> None:
        """The continuing rows' terms into their slots: acc = term (depth 1) or logaddexp(acc, term)."""
        dev = logp.device
        gi = torch.tensor(go, dtype=torch.long, device=dev)
        lp = logp.index_select(0, gi)  # (n_go, V)
        si = self._s(gi)  # their slots
        if self.combine == "stop_prob_mix":
            first = torch.tensor([depth[i] == 1 for i in go], device=dev)
            mass = torch.where(first, torch.ones_like(self.R[si]), self.R.index_select(0, si))  # R_d
            cg = c.index_select(0, gi)
            term = torch.log(mass * (1 - cg))[:, None] + lp  # log w_d + log p_d, w_d = R_d (1 - c_d)
            self.R.index_copy_(0, si, mass * cg)  # R_{d+1}
        else:
            term = lp
        deep = [j for j, i in enumerate(go) if depth[i] > 1]
        if deep:
            dj = torch.tensor(deep, dtype=torch.long, device=dev)
            dslots = si.index_select(0, dj)
            term = term.index_copy(0, dj, torch.logaddexp(self.acc.index_select(0, dslots), term.index_select(0, dj)))
        self.acc.index_copy_(0, si, term)
        self.h.index_copy_(0, si, hidden.index_select(0, gi).to(self.h.dtype))
