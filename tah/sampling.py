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


def sample(logits: torch.Tensor, temperature: float | torch.Tensor = 1.0, top_k: int | torch.Tensor = 0,
           top_p: float | torch.Tensor = 1.0, min_p: float | torch.Tensor = 0.0,
           generators: list[torch.Generator | None] | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids; greedy where temperature == 0."""
    B = logits.shape[0]
    temp = _as_rows(temperature, B, torch.float32, logits.device)
    greedy = logits.argmax(-1)
    if bool((temp <= 0).all()):
        return greedy
    probs = torch.softmax(filter_logits(logits, temp, top_k, top_p, min_p), dim=-1)
    if generators is None:
        drawn = torch.multinomial(probs, 1).squeeze(1)
    else:
        drawn = torch.stack([torch.multinomial(probs[i], 1, generator=g).squeeze(0)
                             for i, g in enumerate(generators)])
    return torch.where(temp > 0, drawn, greedy)
