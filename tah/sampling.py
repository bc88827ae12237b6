"""Next-token sampling shared by the reference `generate()` and the serving engine.

Per-row parameters (tensors of shape (B,)) so that one batch can mix requests: temperature
(0 = greedy), top-k (0 = off), top-p (1 = off), min-p (0 = off), and a per-row torch.Generator for
reproducible seeds. The paper's reasoning defaults are temperature 0.6, top-p 0.95, top-k 20.

    python -c "import torch; from tah.sampling import sample; print(sample(torch.randn(2, 10), temperature=0.0))"
"""

from __future__ import annotations

import torch


def _as_rows(value: float | int | torch.Tensor, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=dtype, device=device)
    return t.expand(batch) if t.dim() == 0 else t


def filter_logits(logits: torch.Tensor, temperature: float | torch.Tensor = 1.0, top_k: int | torch.Tensor = 0,
                  top_p: float | torch.Tensor = 1.0, min_p: float | torch.Tensor = 0.0) -> torch.Tensor:
    """(B, V) logits -> (B, V) fp32 scaled logits with the filtered-out tokens at -inf.

    Rows with temperature 0 are left unscaled (the caller takes their argmax).
    """
    B, V = logits.shape
    dev = logits.device
    temp = _as_rows(temperature, B, torch.float32, dev)
    x = logits.float() / torch.where(temp > 0, temp, torch.ones_like(temp))[:, None]
    k = _as_rows(top_k, B, torch.long, dev).clamp(0, V)
    p = _as_rows(top_p, B, torch.float32, dev)
    mp = _as_rows(min_p, B, torch.float32, dev)
    sorted_x, order = x.sort(dim=-1, descending=True)  # (B, V)
    rank = torch.arange(V, device=dev)[None, :]
    drop = (k[:, None] > 0) & (rank >= k[:, None])  # top-k
    probs = torch.softmax(sorted_x.masked_fill(drop, float("-inf")), dim=-1)
    # top-p: keep the smallest prefix whose mass reaches p (the first token always stays).
    drop |= (probs.cumsum(-1) - probs) >= p[:, None]
    drop |= probs < mp[:, None] * probs[:, :1]  # min-p relative to the top token
    drop[:, 0] = False
    mask = torch.zeros_like(drop).scatter(1, order, drop)
    return x.masked_fill(mask, float("-inf"))


def candidates(logits: torch.Tensor, temperature: float | torch.Tensor = 1.0, top_k: int | torch.Tensor = 0,
               top_p: float | torch.Tensor = 1.0, min_p: float | torch.Tensor = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, V) logits -> (probs (B, C), token ids (B, C)): the distribution of `filter_logits` restricted
    to its C most likely tokens (zeros where filtered out), most likely first.

    When every row has a top-k, only max(top_k) candidates are looked at (topk, not a full-vocabulary
    sort): sampling a batch then costs O(B x k) after one topk instead of O(B x V log V)."""
    B, V = logits.shape
    dev = logits.device
    temp = _as_rows(temperature, B, torch.float32, dev)
    k = _as_rows(top_k, B, torch.long, dev).clamp(0, V)
    x = logits.float() / torch.where(temp > 0, temp, torch.ones_like(temp))[:, None]
    if bool((k > 0).all()):
        vals, ids = x.topk(int(k.max()), dim=-1)  # (B, C) sorted
    else:
        vals, ids = x.sort(dim=-1, descending=True)
    C = vals.shape[1]
    rank = torch.arange(C, device=dev)[None, :]
    drop = (k[:, None] > 0) & (rank >= k[:, None])
    probs = torch.softmax(vals.masked_fill(drop, float("-inf")), dim=-1)
    drop |= (probs.cumsum(-1) - probs) >= _as_rows(top_p, B, torch.float32, dev)[:, None]
    drop |= probs < _as_rows(min_p, B, torch.float32, dev)[:, None] * probs[:, :1]
    drop[:, 0] = False
    probs = probs.masked_fill(drop, 0.0)
    return probs / probs.sum(-1, keepdim=True), ids


def sample(logits: torch.Tensor, temperature: float | torch.Tensor = 1.0, top_k: int | torch.Tensor = 0,
           top_p: float | torch.Tensor = 1.0, min_p: float | torch.Tensor = 0.0,
           generators: list[torch.Generator | None] | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids; greedy where temperature == 0.

    One uniform draw per row (from that row's generator, if given) picks a token by inverse CDF over
    `candidates`: a row's draws do not depend on what else is in the batch."""
    B = logits.shape[0]
    dev = logits.device
    temp = _as_rows(temperature, B, torch.float32, dev)
    greedy = logits.argmax(-1)
    if bool((temp <= 0).all()):
        return greedy
    probs, ids = candidates(logits, temp, top_k, top_p, min_p)
    if generators is None:
        u = torch.rand(B, device=dev)
    else:
        u = torch.stack([torch.rand((), generator=g, device=dev) if g is not None else torch.rand((), device=dev)
                         for g in generators])
    cdf = probs.cumsum(-1)  # (B, C)
    choice = torch.searchsorted(cdf, u[:, None].to(cdf.dtype), right=True).clamp_max(probs.shape[1] - 1)
    # Never land on a filtered-out candidate through rounding at the end of the CDF.
    choice = torch.minimum(choice, (probs > 0).sum(-1, keepdim=True) - 1)
    drawn = ids.gather(1, choice)[:, 0]
    return torch.where(temp > 0, drawn, greedy)
