"""TaH2's input updater: the input of depth d + 1 from the token's embedding and its last hidden state.

    x = norm_out(MLP(norm_pre_mlp(W_p [norm_prev(e_t); norm_last(h_t^(d))])))

e_t is the token's original embedding (not depth d's input), h_t^(d) the backbone's output at depth
d after its final norm; W_p is Linear(2H -> H) without bias, MLP the SwiGLU block of Qwen3
(down(silu(gate(x)) * up(x)), H -> I -> H, no bias), the norms RMSNorm (eps 1e-6) computed in fp32
like Qwen3's. Parameter names are the authors' (`projection.weight`, `mlp.{gate,up,down}_proj.weight`,
`norm_{prev,last,pre_mlp,out}.weight`), so their `input_updater.bin` state dicts load as they are.
The RMSNorm and SwiGLU here are shared with the TaH2 decider (tah/decider.py).

    python -c "from tah.updater import InputUpdater; print(InputUpdater(64, 128))"
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Qwen3's RMSNorm: normalise in fp32 (fp64 stays fp64), cast back, then scale (weight ones at init)."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x if dtype == torch.float64 else x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): H -> I -> H, no bias (Qwen3's MLP)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class InputUpdater(nn.Module):
    """(token embedding e, last hidden state h) (..., H) each -> the next depth's input (..., H)."""

    def __init__(self, hidden_size: int, intermediate_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.projection = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.mlp = SwiGLU(hidden_size, intermediate_size)
        self.norm_prev = RMSNorm(hidden_size, eps)
        self.norm_last = RMSNorm(hidden_size, eps)
        self.norm_pre_mlp = RMSNorm(hidden_size, eps)
        self.norm_out = RMSNorm(hidden_size, eps)

    def forward(self, embeds: torch.Tensor, last_hidden: torch.Tensor) -> torch.Tensor:
        dtype = self.projection.weight.dtype
        x = torch.cat([self.norm_prev(embeds.to(dtype)), self.norm_last(last_hidden.to(dtype))], dim=-1)
        return self.norm_out(self.mlp(self.norm_pre_mlp(self.projection(x))))
