"""An independent, deliberately naive TaH forward used as ground truth by the tests.

It materialises the (position, depth) grid of one sequence, builds the explicit 2-D duo-causal mask
over *all* grid nodes (query (i, d) sees key (j, k) iff j <= i, k <= d, node exists), and runs every
layer by hand from the backbone's submodules (norms, projections with LoRA switched per node, RoPE,
naive softmax attention, MLP). It shares nothing with tah/attention.py or tah/cache.py.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def _lora(model, on: bool) -> None:
    for m in model.backbone.modules():
        if isinstance(m, BaseTunerLayer):
            m._disable_adapters = not on


def _per_node(model, fn, x: torch.Tensor, node_depth: torch.Tensor) -> torch.Tensor:
    """Apply fn row-wise with LoRA off for depth-1 nodes and on for deeper nodes."""
    out = None
    for on in (False, True):
        sel = (node_depth >= 2) if on else (node_depth == 1)
        if not sel.any():
            continue
        _lora(model, on)
        y = fn(x[sel])
        if out is None:
            out = y.new_zeros((x.shape[0], *y.shape[1:]))
        out[sel] = y
    _lora(model, False)
    return out


def _layer(model, layer, h: torch.Tensor, pos: torch.Tensor, node_depth: torch.Tensor, mask: torch.Tensor):
    """One decoder layer over N grid nodes. h (N, H), mask (N, N) bool."""
    attn = layer.self_attn
    cfg = model.backbone.config
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    x = layer.input_layernorm(h)
    q = _per_node(model, attn.q_proj, x, node_depth).view(-1, nh, hd)
    k = _per_node(model, attn.k_proj, x, node_depth).view(-1, nkv, hd)
    v = _per_node(model, attn.v_proj, x, node_depth).view(-1, nkv, hd)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = model.backbone.model.rotary_emb(h[None], pos[None])  # (1, N, hd)
    q, k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)  # (1, heads, N, hd)
    rep = nh // nkv
    k = k.repeat_interleave(rep, dim=1)
    v = v.transpose(0, 1)[None].repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * hd ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    o = (torch.softmax(scores, -1) @ v)[0].transpose(0, 1).reshape(h.shape[0], nh * hd)
    h = h + _per_node(model, attn.o_proj, o, node_depth)
    return h + _per_node(model, layer.mlp, layer.post_attention_layernorm(h), node_depth)


@torch.no_grad()
def bruteforce_logits(model, input_ids: torch.Tensor, depths: torch.Tensor, depth_attention: str = "duo_causal"):
    """One unpadded row: input_ids (T,), depths (T,) -> final logits (T, V), recomputed from scratch."""
    T = input_ids.shape[0]
    D = int(depths.max())
    emb = model.backbone.get_input_embeddings().weight
    cum = {}  # (i, d) -> cumulative logits
    for d in range(1, D + 1):
        nodes = [(i, k) for k in range(1, d + 1) for i in range(T) if depths[i] >= k]
        idx = {n: a for a, n in enumerate(nodes)}
        pos = torch.tensor([i for i, _ in nodes])
        nd = torch.tensor([k for _, k in nodes])
        rows = []
        for i, k in nodes:
            if k == 1:
                rows.append(emb[input_ids[i]])
            else:
                vals, ids = cum[(i, k - 1)].topk(min(model.config.soft_input_topk, emb.shape[0]))
                rows.append((torch.softmax(vals, -1)[:, None] * emb[ids]).sum(0))
        h = torch.stack(rows)
        qi, qd = pos[:, None], nd[:, None]
        kj, kd = pos[None, :], nd[None, :]
        if depth_attention == "duo_causal":
            mask = (kj <= qi) & (kd <= qd)
        elif depth_attention == "current":
            mask = (kj <= qi) & (kd == qd)
        elif depth_attention == "first_self":  # TaH2's causal: depth 1, plus the token's own deeper keys
            mask = (kj <= qi) & ((kd == 1) | ((kj == qi) & (kd <= qd)))
        else:  # "first"
            mask = (kj <= qi) & (kd == 1)
        for layer in model.backbone.model.layers:
            h = _layer(model, layer, h, pos, nd, mask)
        logits = model.backbone.lm_head(model.backbone.model.norm(h))
        for i in range(T):
            if depths[i] >= d:
                prev = cum.get((i, d - 1), 0)
                cum[(i, d)] = prev + logits[idx[(i, d)]]
    return torch.stack([cum[(i, int(depths[i]))] for i in range(T)])


def grid_forward(model, h: torch.Tensor, pos: torch.Tensor, node_depth: torch.Tensor, mask: torch.Tensor):
    """The backbone's layers and final norm over N grid nodes with an explicit (N, N) bool mask:
    h (N, H) inputs, pos (N,) position ids, node_depth (N,) -> (N, H) normed last hidden states."""
    for layer in model.backbone.model.layers:
        h = _layer(model, layer, h, pos, node_depth, mask)
    return model.backbone.model.norm(h)
