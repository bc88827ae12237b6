"""Reference generation for TaH: exact, simple, batch >= 1 (the fast engine is tah/engine.py).

Prefill runs the whole prompt through the parallel forward into a per-depth `TaHCache`; each decode
step feeds one token per live row: depth 1 for all, then the decider (or forced depths, for tests)
picks the rows that run depth 2, and so on. Finished rows stop computing.

    python -m tah.demo
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .sampling import sample

if TYPE_CHECKING:
    from .model import TaHForCausalLM


@dataclass
class GenerateOutput:
    sequences: torch.Tensor
    """(B, T + n) prompt followed by the generated tokens (pad after a row's EOS)."""
    prompt_depths: torch.Tensor
    """(B, T) depth each prompt token ran (0 = padding)."""
    depths: torch.Tensor
    """(B, n) depth each generated token ran when fed back (0 = never fed: the last one, or after EOS)."""
    step_logits: list[torch.Tensor]
    """n tensors (B, V): the final logits each generated token was drawn from."""

    def tokens_per_depth(self) -> dict[int, int]:
        """How many fed tokens (prompt + generated) ran exactly each depth."""
        d = torch.cat([self.prompt_depths, self.depths], dim=1)
        return {int(k): int((d == k).sum()) for k in d.unique().tolist() if k > 0}


def _last_valid(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, T, V), (B, T) -> (B, V) logits at each row's last real token."""
    T = valid.shape[1]
    last = (valid.long() * torch.arange(1, T + 1, device=valid.device)).argmax(1)
    return logits[torch.arange(logits.shape[0], device=logits.device), last]


@torch.no_grad()
def generate(model: "TaHForCausalLM", input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 0.6, top_k: int = 20,
             top_p: float = 0.95, min_p: float = 0.0, eos_token_id: int | list[int] | None = None,
             pad_token_id: int = 0, threshold: float | None = None, prompt_depths: torch.Tensor | None = None,
             forced_depths: torch.Tensor | None = None, seed: int | None = None) -> GenerateOutput:
    """Generate up to `max_new_tokens` per row. Greedy unless `do_sample` (then the paper's defaults).

    forced_depths (B, max_new_tokens): the depth generated token s runs when fed back (tests, AlwaysThink);
    None lets the decider choose with `threshold`. prompt_depths (B, T) likewise for the prompt.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    B, T = input_ids.shape
    dev = input_ids.device
    valid = torch.ones(B, T, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.bool()
    if not bool(valid.any(1).all()):
        raise ValueError("every row needs at least one prompt token")
    eos = torch.tensor([] if eos_token_id is None else
                       [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=dev)
    gens = None
    if seed is not None:
        gens = [torch.Generator(device=dev).manual_seed(seed + i) for i in range(B)]
    temp = temperature if do_sample else 0.0

    cache = model.new_cache(B, capacity=T + max_new_tokens)
    out = model(input_ids, attention_mask=valid, depths=prompt_depths, past_key_values=cache,
                threshold=threshold, return_decider_logits=False)
    logits = _last_valid(out.logits, valid)
    prompt_depths_ran = out.depths
    alive = torch.ones(B, dtype=torch.bool, device=dev)
    tokens, depths, step_logits = [], [], []
    for s in range(max_new_tokens):
        step_logits.append(logits)
        nxt = sample(logits, temp, top_k, top_p, min_p, gens)
        nxt = torch.where(alive, nxt, torch.full_like(nxt, pad_token_id))
        tokens.append(nxt)
        alive = alive & ~torch.isin(nxt, eos)
        if s == max_new_tokens - 1 or not bool(alive.any()):
            break
        d_in = None if forced_depths is None else forced_depths[:, s:s + 1]
        out = model(nxt[:, None], attention_mask=alive[:, None], depths=d_in, past_key_values=cache,
                    threshold=threshold, return_decider_logits=False)
        depths.append(out.depths[:, 0])
        logits = out.logits[:, 0]
    gen = torch.stack(tokens, dim=1)
    fed = torch.zeros_like(gen)
    if depths:
        fed[:, :len(depths)] = torch.stack(depths, dim=1)
    return GenerateOutput(sequences=torch.cat([input_ids, gen], dim=1), prompt_depths=prompt_depths_ran,
                          depths=fed, step_logits=step_logits)
