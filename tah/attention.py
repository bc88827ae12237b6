"""Duo-causal attention: the mask rule and its backends, plugged into HF's AttentionInterface
(through tah/hf_adapter.py).

Query (i, d) may attend to key (j, k) iff j <= i, k <= d and token j ran depth k (the variants of
`TaHConfig.depth_attention` narrow k; "first_self", TaH2's causal mode, lets a query see deeper keys
only at its own position: `DuoCausalSpec.k_self_only`). TaH runs one depth at
a time, and the key set handed to a depth-d call holds only depths the rule allows (see tah/cache.py),
so inside one call the rule reduces to *position causality + key existence*:

    allowed[b, q, k] = k_valid[b, k] and k_pos[b, k] <= q_pos[b, q]

`DuoCausalSpec` carries those per-call tensors; HF's attention modules pass it through unchanged as
`attention_mask` to `tah_attention`, registered here under the name "tah". Backends:

- reference  explicit (B, 1, Tq, Tk) mask + naive softmax in fp32; used by tests as ground truth.
- sdpa       torch SDPA. Depth 1 of a forward without cache is plain causal (`is_causal=True`, no
             mask); decode sees every cached key (a (B, Tk) validity vector, no positional mask);
             otherwise a dense bool mask of (Tq_d x Tk) -- small at depth >= 2 where Tq_d ~ 15% of T.
- flex       FlexAttention with a block mask built from the same rule (never a dense T x T mask);
             compiled. Torch has no FlexAttention backward on CPU, so on CPU it serves inference only.
- flash      the flash-attn package (optional `[gpu]` extra) for the calls its API can express:
             causal attention within one depth (depth 1; every depth of AlwaysThink), unpadded with
             `flash_attn_varlen_func`. Cross-depth calls need per-query prefix lengths, which its
             training kernels do not take: those go to flex (CUDA) or sdpa, and are counted as such.
- auto       causal calls via flash-attn when it is installed and the tensors are on CUDA, else SDPA;
             decode via SDPA with a key-validity vector; the general case via flex on CUDA and the
             dense-mask SDPA on CPU.

The serving engine's decode step, where each row is at its own depth, uses `MixedDecodeSpec`: one
query per row against the per-depth cache view, grouped by KV head, without copying the cache.

Which path ran is counted per call in `DuoCausalSpec.counts` (TaHForCausalLM.attention_paths).
Try it: python -c "import tah.attention as a; print(a.__doc__)"
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from .hf_adapter import register_attention, sdpa_forward

ATTN_IMPLEMENTATION = "tah"
# Invalid (padding) query slots get this position so that they see every valid key: their output is
# discarded, but a fully masked softmax row would put NaNs into the backward pass.
INVALID_QUERY_POS = torch.iinfo(torch.int64).max


@dataclass
class DuoCausalSpec:
    """The visibility of one depth's call: the same for every layer of that depth."""

    q_pos: torch.Tensor
    """(B, Tq) long: position id of each query; INVALID_QUERY_POS for padding slots."""
    k_pos: torch.Tensor
    """(B, Tk) long: position id of each key (in the order of the key tensor)."""
    k_valid: torch.Tensor
    """(B, Tk) bool: the key exists (real token, ran that depth)."""
    backend: str = "auto"
    """Requested backend: auto | reference | sdpa | flex."""
    causal: bool = False
    """Keys are exactly the queries' own packed, left-aligned sequence: plain causal attention."""
    all_keys_precede: bool = False
    """Every valid key is at or before every query (decode): only key validity matters."""
    q_segment: torch.Tensor | None = None
    """(B, Tq) optional sample id of packed rows; attention never crosses sample boundaries."""
    k_segment: torch.Tensor | None = None
    """(B, Tk) sample ids of the keys (with q_segment)."""
    k_self_only: torch.Tensor | None = None
    """(B, Tk) bool, depth_attention="first_self" only: keys a query sees only at its own position
    (the token's own deeper keys); None: no such keys."""
    counts: Counter = field(default_factory=Counter)
    """Path name -> number of layer calls that took it."""
    _block_mask: Any = None

    def dense_mask(self) -> torch.Tensor:
        """(B, 1, Tq, Tk) bool: the explicit visibility matrix (reference path, tests)."""
        allowed = self.k_valid[:, None, :] & (self.k_pos[:, None, :] <= self.q_pos[:, :, None])
        if self.k_self_only is not None:
            allowed = allowed & (~self.k_self_only[:, None, :] | (self.k_pos[:, None, :] == self.q_pos[:, :, None]))
        if self.q_segment is not None:
            allowed = allowed & (self.k_segment[:, None, :] == self.q_segment[:, :, None])
            # Padding queries have no segment match; let them see all valid keys (output discarded).
            empty = ~allowed.any(-1, keepdim=True)
            allowed = allowed | (empty & self.k_valid[:, None, :])
        return allowed[:, None]


@dataclass
class MixedDecodeSpec:
    """One decode token per row, each row at its own depth (the engine's single pass per step).

    The keys arrive as the cache's per-depth view (B, Hkv, D_vis, W, D) -- no copy -- and
    k_valid (B, D_vis, W) says which of them this row's query may see (existing slots of the depths
    the rule allows it). Every existing key precedes the query, so validity is the whole mask."""

    k_valid: torch.Tensor
    counts: Counter = field(default_factory=Counter)
    deep_rows: torch.Tensor | None = None
    """Split form (TaH2's decode): k_valid covers the depth-1 window only, (B, 1, W); these rows
    (B_deep,) also see deeper keys, handed over as a second (B_deep, Hkv, D_deep, W2, D) tensor."""
    deep_valid: torch.Tensor | None = None
    """(B_deep, D_deep, W2): which of those deeper keys each of them sees."""
    blocked: bool = False
    """Keys (the depth-1 ones in the split form) arrive as the paged pool's gathered blocks
    (B, D_vis, nb, Hkv, u, D), W = nb * u, and are multiplied block by block where they lie."""


def _scores(q: torch.Tensor, key: torch.Tensor, blocked: bool, scaling: float) -> torch.Tensor:
    """q (B, Hkv, g, D) against a window (B, Hkv, Dv, W, D) or gathered blocks (B, Dv, nb, Hkv, u, D)
    -> scaled scores (B, Hkv, g, Dv, W) in fp32."""
    B, Hkv, g, D = q.shape
    if blocked:  # one (g, D) x (D, u) product per (row, depth, block, head), batched over all four
        s = torch.matmul(q.reshape(B, 1, 1, Hkv, g, D), key.transpose(-1, -2))  # (B, Dv, nb, Hkv, g, u)
        s = s.permute(0, 3, 4, 1, 2, 5).reshape(B, Hkv, g, key.shape[1], -1)
    else:
        s = torch.matmul(q.reshape(B, Hkv, 1, g, D), key.transpose(-1, -2)).transpose(2, 3)  # (B, Hkv, g, Dv, W)
    return s.float() * scaling


def _weighted(p: torch.Tensor, value: torch.Tensor, blocked: bool) -> torch.Tensor:
    """Probabilities (B, Hkv, g, Dv, W) over values laid out as `_scores`' keys -> (B, Hkv, g, D)."""
    B, Hkv, g, Dv, _ = p.shape
    p = p.to(value.dtype)
    if blocked:
        nb, u = value.shape[2], value.shape[4]
        pb = p.reshape(B, Hkv, g, Dv, nb, u).permute(0, 3, 4, 1, 2, 5)  # (B, Dv, nb, Hkv, g, u)
        return torch.matmul(pb, value).sum((1, 2))  # (B, Dv, nb, Hkv, g, D) -> (B, Hkv, g, D)
    return torch.matmul(p.transpose(2, 3), value).sum(2)  # (B, Hkv, Dv, g, D) -> (B, Hkv, g, D)


def _mixed_decode_split(query: torch.Tensor, key: tuple[torch.Tensor, torch.Tensor],
                        value: tuple[torch.Tensor, torch.Tensor], spec: MixedDecodeSpec,
                        scaling: float) -> torch.Tensor:
    """The split form: every row attends over the depth-1 window, the deeper rows over it and their
    deeper keys jointly (one softmax). query (B, H, 1, D) -> (B, H, 1, D); the deeper keys
    (B_deep, Hkv, D_deep, W2, D) are a window."""
    (k1, kd), (v1, vd) = key, value
    B, H, _, D = query.shape
    Hkv, Dd, W2 = kd.shape[1], kd.shape[2], kd.shape[3]
    g = H // Hkv
    rows = spec.deep_rows
    q = query.reshape(B, Hkv, g, D)
    s1 = _scores(q, k1, spec.blocked, scaling)[:, :, :, 0]  # (B, Hkv, g, W)
    s1 = s1.masked_fill(~spec.k_valid[:, None, :, :], float("-inf"))
    W = s1.shape[-1]
    sd = torch.matmul(q.index_select(0, rows)[:, :, None], kd.transpose(-1, -2)).float() * scaling  # (B_d, Hkv, Dd, g, W2)
    sd = sd.masked_fill(~spec.deep_valid[:, None, :, None, :], float("-inf"))
    sd = sd.transpose(2, 3).reshape(rows.numel(), Hkv, g, Dd * W2)
    joint = torch.softmax(torch.cat([s1.index_select(0, rows), sd], dim=-1), dim=-1)  # (B_d, Hkv, g, W + Dd W2)
    p1 = torch.softmax(s1, dim=-1).index_copy(0, rows, joint[..., :W])
    out = _weighted(p1[:, :, :, None], v1, spec.blocked)  # (B, Hkv, g, D)
    pd = joint[..., W:].reshape(rows.numel(), Hkv, g, Dd, W2).transpose(2, 3).to(vd.dtype)  # (B_d, Hkv, Dd, g, W2)
    out = out.index_add(0, rows, torch.matmul(pd, vd).sum(2))
    return out.reshape(B, H, 1, D)


def _mixed_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spec: MixedDecodeSpec,
                  scaling: float) -> torch.Tensor:
    """query (B, H, 1, D), keys/values as `_scores` takes them -> (B, H, 1, D); softmax over (Dv, W)
    jointly. Batched matmuls read the cache's window view (or the gathered blocks) in place; query
    heads are grouped by their KV head (GQA) instead of repeating K/V."""
    B, H, _, D = query.shape
    Hkv = key.shape[3] if spec.blocked else key.shape[1]
    g = H // Hkv
    s = _scores(query.reshape(B, Hkv, g, D), key, spec.blocked, scaling)  # (B, Hkv, g, Dv, W)
    s = s.masked_fill(~spec.k_valid[:, None, None], float("-inf"))
    Dv, W = s.shape[3], s.shape[4]
    probs = torch.softmax(s.reshape(B, Hkv, g, Dv * W), dim=-1).reshape(B, Hkv, g, Dv, W)
    return _weighted(probs, value, spec.blocked).reshape(B, H, 1, D)


def _reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spec: DuoCausalSpec,
               scaling: float, dropout: float, training: bool) -> torch.Tensor:
    """Naive attention with the explicit mask, in fp32. query (B, H, Tq, D), key (B, Hkv, Tk, D)."""
    rep = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(rep, dim=1)  # (B, H, Tk, D)
    v = value.float().repeat_interleave(rep, dim=1)
    scores = torch.matmul(query.float(), k.transpose(-1, -2)) * scaling  # (B, H, Tq, Tk)
    scores = scores.masked_fill(~spec.dense_mask(), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = F.dropout(probs, p=dropout, training=training)
    return torch.matmul(probs, v).to(query.dtype)  # (B, H, Tq, D)


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spec: DuoCausalSpec,
          scaling: float, dropout: float) -> tuple[torch.Tensor, str]:
    """SDPA with the cheapest exact mask for this call; returns the output and the path name."""
    gqa = query.shape[1] != key.shape[1]
    if spec.causal and spec.q_segment is None and query.shape[2] == key.shape[2]:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                             dropout_p=dropout, enable_gqa=gqa)
        return out, "sdpa:is_causal"
    if spec.all_keys_precede and spec.q_segment is None and spec.k_self_only is None:
        mask = None if bool(spec.k_valid.all()) else spec.k_valid[:, None, None, :]  # (B, 1, 1, Tk)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                             dropout_p=dropout, enable_gqa=gqa)
        return out, "sdpa:key_valid" if mask is not None else "sdpa:no_mask"
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=spec.dense_mask(), scale=scaling,
                                         dropout_p=dropout, enable_gqa=gqa)
    return out, "sdpa:dense_mask"


_COMPILED_FLEX: dict[bool, Any] = {}


def _bucket(n: int) -> int:
    """The padded length of a CPU flex call: the next power of two, at least 32."""
    return max(32, 1 << (n - 1).bit_length())


def _pad_to(x: torch.Tensor, dim: int, n: int, fill: float | bool | int = 0) -> torch.Tensor:
    if x.shape[dim] == n:
        return x
    shape = list(x.shape)
    shape[dim] = n - x.shape[dim]
    return torch.cat([x, x.new_full(shape, fill)], dim=dim)


def _flex(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spec: DuoCausalSpec,
          scaling: float, dropout: float) -> torch.Tensor:
    """FlexAttention over a block mask built once per spec (shared by all layers of the depth).

    On CPU it is compiled with static shapes over lengths padded to power-of-two buckets (padding
    keys do not exist, padding queries are dropped): Inductor's CPU flex template miscompiles once
    Dynamo turns a recompile dynamic (`CppCompileError: 'cur_qSplitSize4' was not declared`, seen
    with head_dim 64 at T = 48 after two other shapes), and buckets keep the static recompiles few."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if dropout > 0:
        raise ValueError("the flex attention backend does not support attention dropout")
    cpu = query.device.type == "cpu"
    if cpu and torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        raise RuntimeError(
            "attn_backend='flex' was asked for a backward pass on CPU, which FlexAttention does not "
            "support in this torch; use attn_backend='sdpa' (or 'auto') for CPU training"
        )
    if cpu not in _COMPILED_FLEX:
        _COMPILED_FLEX[cpu] = torch.compile(flex_attention, dynamic=False if cpu else None)
    Tq, Tk = query.shape[2], key.shape[2]
    Tq_b, Tk_b = (_bucket(Tq), _bucket(Tk)) if cpu else (Tq, Tk)
    if spec._block_mask is None:
        q_pos = _pad_to(spec.q_pos, 1, Tq_b, INVALID_QUERY_POS)
        k_pos, k_valid = _pad_to(spec.k_pos, 1, Tk_b, 0), _pad_to(spec.k_valid, 1, Tk_b, False)
        q_seg = None if spec.q_segment is None else _pad_to(spec.q_segment, 1, Tq_b, -1)
        k_seg = None if spec.k_segment is None else _pad_to(spec.k_segment, 1, Tk_b, -2)
        k_self = None if spec.k_self_only is None else _pad_to(spec.k_self_only, 1, Tk_b, False)

        def mask_mod(b, h, q_idx, kv_idx):
            ok = k_valid[b, kv_idx] & (k_pos[b, kv_idx] <= q_pos[b, q_idx])
            if k_self is not None:
                ok = ok & (~k_self[b, kv_idx] | (k_pos[b, kv_idx] == q_pos[b, q_idx]))
            if q_seg is not None:
                ok = ok & (k_seg[b, kv_idx] == q_seg[b, q_idx])
            return ok

        spec._block_mask = create_block_mask(mask_mod, q_pos.shape[0], None, Tq_b, Tk_b, device=query.device)
    out = _COMPILED_FLEX[cpu](_pad_to(query, 2, Tq_b), _pad_to(key, 2, Tk_b), _pad_to(value, 2, Tk_b),
                              block_mask=spec._block_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out[:, :, :Tq]


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _flash_causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spec: DuoCausalSpec,
                  scaling: float, dropout: float) -> torch.Tensor:
    """Causal attention of packed, left-aligned rows through flash_attn_varlen_func (padding dropped).

    query (B, H, T, D), keys the same tokens (B, Hkv, T, D) -> (B, H, T, D), zeros at padding slots.
    """
    from flash_attn import flash_attn_varlen_func

    B, H, T, D = query.shape
    valid = spec.k_valid  # (B, T): the queries are the keys here
    lens = valid.sum(1, dtype=torch.int32)
    cu = torch.zeros(B + 1, dtype=torch.int32, device=query.device)
    cu[1:] = lens.cumsum(0)
    bi, ti = valid.nonzero(as_tuple=True)
    q, k, v = (x.transpose(1, 2)[bi, ti] for x in (query, key, value))  # (N, heads, D)
    out = flash_attn_varlen_func(q, k, v, cu, cu, int(lens.max()), int(lens.max()), dropout_p=dropout,
                                 softmax_scale=scaling, causal=True)  # (N, H, D)
    full = out.new_zeros(B, T, H, D).index_put((bi, ti), out)
    return full.transpose(1, 2)


def resolve_backend(requested: str, device: torch.device, spec: DuoCausalSpec) -> str:
    """The backend that will run this call ('auto' resolved by device and what the call needs)."""
    plain_causal = spec.causal and spec.q_segment is None
    if requested == "flash":
        if not flash_attn_available():
            raise RuntimeError("attn_backend='flash' needs the flash-attn package (pip install 'tah[gpu]' on CUDA)")
        if plain_causal:
            return "flash"
        return "flex" if device.type == "cuda" else "sdpa"  # not expressible in flash-attn's API
    if requested != "auto":
        return requested
    if plain_causal and device.type == "cuda" and flash_attn_available():
        return "flash"
    if spec.causal or spec.all_keys_precede:
        return "sdpa"
    return "flex" if device.type == "cuda" else "sdpa"


def tah_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                  **kwargs: Any) -> tuple[torch.Tensor, None]:
    """HF attention-interface entry. query (B, H, Tq, D), key/value (B, Hkv, Tk, D) -> (B, Tq, H, D).

    With a plain HF mask (the backbone used on its own) this is exactly HF's sdpa attention.
    """
    if isinstance(attention_mask, MixedDecodeSpec):
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        if attention_mask.deep_rows is not None:
            attention_mask.counts["mixed_decode_split"] += 1
            out = _mixed_decode_split(query, key, value, attention_mask, scaling)
        else:
            attention_mask.counts["mixed_decode"] += 1
            out = _mixed_decode(query, key, value, attention_mask, scaling)
        return out.transpose(1, 2).contiguous(), None
    if not isinstance(attention_mask, DuoCausalSpec):
        return sdpa_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError("sliding-window layers are not supported by TaH's duo-causal attention")
    spec = attention_mask
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    backend = resolve_backend(spec.backend, query.device, spec)
    if backend == "reference":
        out, path = _reference(query, key, value, spec, scaling, dropout, module.training), "reference:dense_mask"
    elif backend == "sdpa":
        out, path = _sdpa(query, key, value, spec, scaling, dropout)
    elif backend == "flex":
        out, path = _flex(query, key, value, spec, scaling, dropout), "flex:block_mask"
    elif backend == "flash":
        out, path = _flash_causal(query, key, value, spec, scaling, dropout), "flash:varlen_causal"
    else:
        raise ValueError(f"unknown attention backend {backend!r}")
    spec.counts[path] += 1
    return out.transpose(1, 2).contiguous(), None


# HF builds its own 4-D mask before calling attention when the backbone runs on its own; the adapter
# gives the "tah" name sdpa's mask format too, so that standalone use keeps working.
register_attention(ATTN_IMPLEMENTATION, tah_attention)
