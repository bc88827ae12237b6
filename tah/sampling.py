"""Next-token sampling shared by the reference `generate()` and the serving engine.

Per-row parameters (tensors of shape (B,)) so that one batch can mix requests: temperature
(0, or below SAMPLING_EPS = greedy), top-k (0 = off), top-p (1 = off), min-p (0 = off), and a per-row torch.Generator for
reproducible seeds. The paper's reasoning defaults are temperature 0.6, top-p 0.95, top-k 20.
`SamplingParams` holds one request's settings and checks them (`check()`: a RequestError, a
ValueError, for any value that would otherwise fail inside a batched step).

    python -c "import torch; from tah.sampling import sample; print(sample(torch.randn(2, 10), temperature=0.0))"
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch

MAX_LOGPROBS = 20
SAMPLING_EPS = 1e-5
"""A temperature below this is greedy (as vLLM's `_SAMPLING_EPS`): dividing logits by 1e-40 would
overflow to inf and the softmax to NaN."""
SEED_RANGE = (-(2**63), 2**64 - 1)
"""What torch.Generator.manual_seed accepts: a 64-bit value, signed or unsigned."""


class RequestError(ValueError):
    """A request the engine cannot run (the message is meant for the client)."""


@dataclass
class SamplingParams:
    """Per-request decoding settings (the paper's reasoning defaults)."""

    max_tokens: int | None = None
    """Tokens to generate at most; None = up to the context window."""
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    """0 = off."""
    min_p: float = 0.0
    seed: int | None = None
    """Same seed, same prompt, same params -> same tokens, whatever else is batched alongside."""
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    """None: none; 0: the chosen token's log-probability; k: also the k most likely tokens'."""
    prompt_logprobs: int | None = None
    """As `logprobs`, for every prompt token given the tokens before it (the first has none): scoring,
    OpenAI's `echo` with `logprobs`."""
    threshold: float | None = None
    """Decider threshold for this request (None: the engine's current one)."""
    max_depth: int | None = None
    """The deepest depth this request's tokens may run, 1..the model's max_depth (None: the model's);
    the engine checks the upper bound. 1 = the plain backbone (Standard)."""

    def check(self, vocab_size: int | None = None) -> None:
        """Raise RequestError (a ValueError) unless every field has the right type and range.

        Everything here would otherwise fail later inside a batched step (a top_k that overflows int64,
        a seed torch rejects, a NaN temperature), where the error could not be pinned on one request."""
        if self.max_tokens is not None and (_int(self.max_tokens) is None or self.max_tokens < 1):
            raise RequestError(f"max_tokens must be an integer >= 1, got {_show(self.max_tokens)}")
        if _real(self.temperature) is None or self.temperature < 0:
            raise RequestError(f"temperature must be a finite number >= 0, got {_show(self.temperature)}")
        if _real(self.top_p) is None or not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {_show(self.top_p)}")
        # A top_k beyond the vocabulary means "no top-k" to the sampler; beyond int64 it cannot be a tensor.
        if _int(self.top_k) is None or not 0 <= self.top_k < 2**63:
            raise RequestError(f"top_k must be an integer in [0, 2**63) (0 = off), got {_show(self.top_k)}")
        if _real(self.min_p) is None or not 0 <= self.min_p <= 1:
            raise RequestError(f"min_p must be in [0, 1], got {_show(self.min_p)}")
        if self.seed is not None and (_int(self.seed) is None or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise RequestError(f"seed must be an integer in [-2**63, 2**64 - 1], got {_show(self.seed)}")
        if not isinstance(self.stop_token_ids, (list, tuple, set, frozenset)):
            raise RequestError(f"stop_token_ids must be a list of token ids, got {type(self.stop_token_ids).__name__}")
        id_max = vocab_size if vocab_size is not None else 2**63
        if any(_int(t) is None or not 0 <= t < id_max for t in self.stop_token_ids):
            raise RequestError(f"stop_token_ids must be token ids in [0, {id_max})")
        if not isinstance(self.ignore_eos, bool):
            raise RequestError(f"ignore_eos must be a bool, got {_show(self.ignore_eos)}")
        lp_max = min(MAX_LOGPROBS, vocab_size) if vocab_size is not None else MAX_LOGPROBS
        if self.logprobs is not None and (_int(self.logprobs) is None or not 0 <= self.logprobs <= lp_max):
            raise RequestError(f"logprobs must be an integer in [0, {lp_max}], got {_show(self.logprobs)}")
        if self.prompt_logprobs is not None and (_int(self.prompt_logprobs) is None
                                                 or not 0 <= self.prompt_logprobs <= lp_max):
            raise RequestError(f"prompt_logprobs must be an integer in [0, {lp_max}], got {_show(self.prompt_logprobs)}")
        if self.threshold is not None and (_real(self.threshold) is None or not 0 <= self.threshold <= 1):
            raise RequestError(f"threshold must be in [0, 1], got {_show(self.threshold)}")
        if self.max_depth is not None and (_int(self.max_depth) is None or self.max_depth < 1):
            raise RequestError(f"max_depth must be an integer >= 1, got {_show(self.max_depth)}")


def _show(x: Any) -> str:
    """A short repr for an error message (a client may send a 4000-digit number)."""
    try:
        r = repr(x)
    except ValueError:  # an int too long to print
        return "a very large number"
    return r if len(r) <= 40 else r[:37] + "..."


def _int(x: Any) -> int | None:
    """x as a plain int if it is an integer (numpy / torch integer scalars too, not bool), else None."""
    if isinstance(x, bool):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


def _real(x: Any) -> float | None:
    """x as a float if it is a finite real number (not bool), else None."""
    if isinstance(x, bool) or _int(x) is None and not isinstance(x, float):
        return None
    try:
        f = float(x)
    except OverflowError:  # an int beyond float range
        return None
    return f if math.isfinite(f) else None


def _as_rows(value: float | int | torch.Tensor, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=dtype, device=device)
    return t.expand(batch) if t.dim() == 0 else t


def _scaled(logits: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """(B, V) fp32 logits / temperature; rows below SAMPLING_EPS (greedy) unscaled (their caller takes the argmax)."""
    temp = _as_rows(temperature, logits.shape[0], torch.float32, logits.device)
    return logits.float() / torch.where(temp >= SAMPLING_EPS, temp, torch.ones_like(temp))[:, None]


def _filtered(sorted_x: torch.Tensor, top_k: int | torch.Tensor, top_p: float | torch.Tensor,
              min_p: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one filtering rule: over (B, C) scaled logits sorted descending, (probs after top-k, drop)
    where drop marks what top-k, then top-p (the smallest prefix whose mass reaches p) and min-p
    (relative to the top token) remove; the most likely token always stays."""
    B, C = sorted_x.shape
    dev = sorted_x.device
    k = _as_rows(top_k, B, torch.long, dev).clamp(0, C)
    rank = torch.arange(C, device=dev)[None, :]
    drop = (k[:, None] > 0) & (rank >= k[:, None])  # top-k
    probs = torch.softmax(sorted_x.masked_fill(drop, float("-inf")), dim=-1)
    drop |= (probs.cumsum(-1) - probs) >= _as_rows(top_p, B, torch.float32, dev)[:, None]
    drop |= probs < _as_rows(min_p, B, torch.float32, dev)[:, None] * probs[:, :1]
    drop[:, 0] = False
    return probs, drop


def filter_logits(logits: torch.Tensor, temperature: float | torch.Tensor = 1.0, top_k: int | torch.Tensor = 0,
                  top_p: float | torch.Tensor = 1.0, min_p: float | torch.Tensor = 0.0) -> torch.Tensor:
    """(B, V) logits -> (B, V) fp32 scaled logits with the filtered-out tokens at -inf.

    Greedy rows (temperature below SAMPLING_EPS) are left unscaled (the caller takes their argmax).
    """
    x = _scaled(logits, temperature)
    sorted_x, order = x.sort(dim=-1, descending=True)  # (B, V)
    _, drop = _filtered(sorted_x, top_k, top_p, min_p)
    mask = torch.zeros_like(drop).scatter(1, order, drop)
    return x.masked_fill(mask, float("-inf"))


def candidates(logits: torch.Tensor, temperature: float | torch.Tensor = 1.0, top_k: int | torch.Tensor = 0,
               top_p: float | torch.Tensor = 1.0, min_p: float | torch.Tensor = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, V) logits -> (probs (B, C), token ids (B, C)): the distribution of `filter_logits` restricted
    to its C most likely tokens (zeros where filtered out), most likely first.

    The order is canonical: descending value, ties by ascending token id (a stable sort), so a row's
    candidates -- and the token its uniform draw picks -- never depend on the other rows. When every row
    has a top-k, only max(top_k) candidates are looked at (topk, not a full-vocabulary sort): sampling a
    batch then costs O(B x k) after one topk instead of O(B x V log V); unless a row's own k-th value
    ties with tokens topk left out (bf16 logits tie often), when the batch takes the full sort."""
    B, V = logits.shape
    x = _scaled(logits, temperature)
    k = _as_rows(top_k, B, torch.long, logits.device).clamp(0, V)
    if bool((k > 0).all()):
        vals, ids = x.topk(int(k.max()), dim=-1)  # (B, C), ties in no promised order
        ids, by_id = ids.sort(dim=-1)  # canonical: by id, then stably by value
        vals, by_val = vals.gather(1, by_id).sort(dim=-1, descending=True, stable=True)
        ids = ids.gather(1, by_val)
        kth = vals.gather(1, (k - 1)[:, None])  # (B, 1) each row's own k-th value
        if bool(((x == kth).sum(-1) > (vals == kth).sum(-1)).any()):  # a tie at a row's cut left out
            vals, ids = x.sort(dim=-1, descending=True, stable=True)
    else:
        vals, ids = x.sort(dim=-1, descending=True, stable=True)
    probs, drop = _filtered(vals, k, top_p, min_p)
    probs = probs.masked_fill(drop, 0.0)
    return probs / probs.sum(-1, keepdim=True), ids


def sample(logits: torch.Tensor, temperature: float | torch.Tensor = 1.0, top_k: int | torch.Tensor = 0,
           top_p: float | torch.Tensor = 1.0, min_p: float | torch.Tensor = 0.0,
           generators: list[torch.Generator | None] | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids; greedy where temperature < SAMPLING_EPS.

    One uniform draw per row (from that row's generator, if given) picks a token by inverse CDF over
    `candidates`: a row's draws do not depend on what else is in the batch."""
    B = logits.shape[0]
    dev = logits.device
    temp = _as_rows(temperature, B, torch.float32, dev)
    greedy = logits.argmax(-1)
    if bool((temp < SAMPLING_EPS).all()):
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
    return torch.where(temp >= SAMPLING_EPS, drawn, greedy)
