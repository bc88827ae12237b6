"""Per-depth key/value stores for duo-causal attention.

Each depth keeps its own K/V (post-RoPE) per layer, holding only the tokens that ran that depth,
packed to the left of each batch row. A depth-d call sees the concatenation of the depths its
variant allows (duo-causal: 1..d), never keys of deeper depths. Two stores share one interface:

- `PackedKV`  one forward without cache (training, scoring): keeps each depth's K/V tensors as
              computed, so autograd sees no in-place writes; concatenates them per layer call.
- `TaHCache`  decoding: per layer one preallocated buffer (B, Hkv, max_depth, capacity, D) grown in
              chunks; new tokens are scattered into their slots (no torch.cat of the whole cache per
              step); the depths a query may see are a *view* of the buffer, with a (B, Tk) validity
              vector instead of any positional mask for single-token steps.

HF's attention modules call `view.update(key_states, value_states, layer_idx)` (we pass the view as
the layers' cache) and get back the visible keys; `view.spec` is passed as `attention_mask`. That call
is the protocol `tah.hf_adapter.KVCacheView` (its contract and the HF versions it was checked with).
Try it: python -m tah.demo
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch

from .attention import INVALID_QUERY_POS, DuoCausalSpec, MixedDecodeSpec
from .hf_adapter import KVCacheView


def visible_depths(depth: int, depth_attention: str) -> tuple[int, int]:
    """Inclusive range (first, last) of depths whose keys a depth-`depth` query may see."""
    if depth_attention == "duo_causal":
        return 1, depth
    if depth_attention == "current":  # AlwaysThink / Causal@current: causal within each depth
        return depth, depth
    if depth_attention == "first":  # Causal@iter1 ablation: every depth reads depth-1 keys only
        return 1, 1
    if depth_attention == "first_self":  # TaH2 "causal": depth-1 keys + the token's own deeper keys
        return 1, depth
    raise ValueError(f"unknown depth_attention {depth_attention!r}")


def mixed_visibility(depth_attention: str, d0: torch.Tensor, n_vis: int,
                     same_position: Callable[[], torch.Tensor]) -> torch.Tensor:
    """(B, n_vis, 1 or W) bool: which cached depths (0-based) a decode row at 0-based depth d0 (B,) may see,
    by `visible_depths`' rule; "first_self" adds the row's own deeper keys, where same_position() (B, n_vis,
    W) says a key sits at the query's position. Shared by TaHCache and the paged engine's batch view."""
    kd = torch.arange(n_vis, device=d0.device)[None, :]  # (1, n_vis)
    if depth_attention == "duo_causal":
        allowed = kd <= d0[:, None]
    elif depth_attention == "current":
        allowed = kd == d0[:, None]
    else:  # "first" (and the depth-1 keys of "first_self")
        allowed = (kd == 0).expand(d0.shape[0], n_vis)
    allowed = allowed[:, :, None]
    if depth_attention == "first_self":  # + the row's own deeper keys (its own position)
        allowed = allowed | ((kd <= d0[:, None])[:, :, None] & same_position())
    return allowed


def _query_pos(q_pos: torch.Tensor, q_valid: torch.Tensor) -> torch.Tensor:
    return torch.where(q_valid, q_pos, torch.full_like(q_pos, INVALID_QUERY_POS))


class _DepthView(KVCacheView):
    """What one depth's pass through the layers sees; subclasses implement `update` (the
    hf_adapter.KVCacheView protocol HF's attention modules call)."""

    spec: DuoCausalSpec

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               layer_idx: int, *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        """HF's attention calls this (hf_adapter.KVCacheView); extra arguments are unused."""
        raise NotImplementedError


class PackedKV:
    """K/V of one cache-less forward, one tensor per (layer, depth), full batch rows."""

    def __init__(self, num_layers: int, batch_size: int, depth_attention: str = "duo_causal") -> None:
        self.num_layers, self.batch_size, self.depth_attention = num_layers, batch_size, depth_attention
        self.k: list[dict[int, torch.Tensor]] = [{} for _ in range(num_layers)]  # (B, Hkv, T_d, D)
        self.v: list[dict[int, torch.Tensor]] = [{} for _ in range(num_layers)]
        self.pos: dict[int, torch.Tensor] = {}  # depth -> (B, T_d) long
        self.valid: dict[int, torch.Tensor] = {}  # depth -> (B, T_d) bool
        self.seg: dict[int, torch.Tensor] = {}  # depth -> (B, T_d) sample id within a packed row

    def _full(self, x: torch.Tensor, rows: torch.Tensor | None, fill: float | bool = 0) -> torch.Tensor:
        """Rows-subset tensor -> full-batch tensor (out of place, so it stays differentiable)."""
        if rows is None:
            return x
        full = x.new_full((self.batch_size, *x.shape[1:]), fill)
        return full.index_copy(0, rows, x)

    def begin_depth(self, depth: int, rows: torch.Tensor | None, q_pos: torch.Tensor,
                    q_valid: torch.Tensor, backend: str, counts: Counter,
                    single_step: bool = False, q_segment: torch.Tensor | None = None) -> "_PackedView":
        """Register depth `depth`'s queries (rows' packed slots) and return the view for its layers.

        q_segment (B_d, T_d): sample ids when several samples share a row (packing); attention
        never crosses them.
        """
        self.pos[depth] = self._full(q_pos, rows)
        self.valid[depth] = self._full(q_valid, rows, False)
        lo, hi = visible_depths(depth, self.depth_attention)
        sel = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))
        k_pos = torch.cat([sel(self.pos[j]) for j in range(lo, hi + 1)], dim=1)
        k_valid = torch.cat([sel(self.valid[j]) for j in range(lo, hi + 1)], dim=1)
        k_segment = None
        if q_segment is not None:
            self.seg[depth] = self._full(q_segment, rows, -1)
            k_segment = torch.cat([sel(self.seg[j]) for j in range(lo, hi + 1)], dim=1)
        k_self = None
        if self.depth_attention == "first_self" and hi > 1:
            k_self = torch.cat([torch.full_like(sel(self.valid[j]), j > 1) for j in range(lo, hi + 1)], dim=1)
        spec = DuoCausalSpec(q_pos=_query_pos(q_pos, q_valid), k_pos=k_pos, k_valid=k_valid,
                             backend=backend, causal=(lo == hi == depth), counts=counts,
                             q_segment=q_segment, k_segment=k_segment, k_self_only=k_self)
        return _PackedView(self, depth, rows, spec, (lo, hi), sel)


class _PackedView(_DepthView):
    def __init__(self, store: PackedKV, depth: int, rows: torch.Tensor | None, spec: DuoCausalSpec,
                 visible: tuple[int, int], sel) -> None:
        self.store, self.depth, self.rows, self.spec, self.visible, self.sel = store, depth, rows, spec, visible, sel

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        st, d = self.store, self.depth
        st.k[layer_idx][d] = st._full(key_states, self.rows)
        st.v[layer_idx][d] = st._full(value_states, self.rows)
        lo, hi = self.visible
        # This depth's own keys are used as computed (no gather); shallower ones are row-selected.
        ks = [key_states if j == d else self.sel(st.k[layer_idx][j]) for j in range(lo, hi + 1)]
        vs = [value_states if j == d else self.sel(st.v[layer_idx][j]) for j in range(lo, hi + 1)]
        if len(ks) == 1:
            return ks[0], vs[0]
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2)


class TaHCache:
    """Preallocated per-(layer, depth) KV cache for decoding batch rows of different lengths.

    `capacity` slots per (row, depth) may be reserved up front (the serving engine reserves its whole
    budget: max sequences x max length). Attention only ever reads the *window*: the first
    `window` slots (the longest live row, rounded up to a chunk), and only the first `active` rows,
    so a short batch in a large reservation pays for what it holds, not for the reservation.
    """

    def __init__(self, num_layers: int, max_depth: int, batch_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 chunk: int = 128, capacity: int = 0, depth_attention: str = "duo_causal") -> None:
        self.num_layers, self.max_depth, self.batch_size = num_layers, max_depth, batch_size
        self.num_kv_heads, self.head_dim, self.chunk = num_kv_heads, head_dim, chunk
        self.dtype, self.device, self.depth_attention = dtype, torch.device(device), depth_attention
        self.capacity = 0  # slots allocated per (row, depth)
        self.window = 0  # slots attention reads: chunk-rounded longest row
        self.active = batch_size  # forward calls cover rows [0, active)
        self.k: list[torch.Tensor] = []  # per layer (B, Hkv, max_depth, capacity, D)
        self.v: list[torch.Tensor] = []
        self.pos = torch.zeros(batch_size, max_depth, 0, dtype=torch.long, device=self.device)
        self.lengths = torch.zeros(batch_size, max_depth, dtype=torch.long, device=self.device)
        self.grow_events = 0
        self._allocate(capacity)

    @property
    def seen_tokens(self) -> torch.Tensor:
        """(active,) tokens each row has run at depth 1 = the next token's position id."""
        return self.lengths[:self.active, 0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def _round(self, n: int) -> int:
        return -(-n // self.chunk) * self.chunk

    def _allocate(self, need: int) -> None:
        """Make room for `need` slots per (row, depth), rounded up to whole chunks (copies once)."""
        if need <= self.capacity:
            return
        cap = self._round(need)
        shape = (self.batch_size, self.num_kv_heads, self.max_depth, cap, self.head_dim)
        old = self.capacity
        for store in (self.k, self.v):
            for layer in range(self.num_layers):
                buf = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if old:
                    buf[:, :, :, :old] = store[layer]
                if layer < len(store):
                    store[layer] = buf
                else:
                    store.append(buf)
        pos = torch.zeros(self.batch_size, self.max_depth, cap, dtype=torch.long, device=self.device)
        pos[:, :, :old] = self.pos
        self.pos, self.capacity = pos, cap
        self.grow_events += old > 0

    def _grow(self, need: int) -> None:
        if need > self.window:
            self._allocate(need)
            self.window = min(self._round(need), self.capacity)

    def trim(self) -> None:
        """Shrink the attention window to the longest of the active rows (after rows finished)."""
        longest = int(self.lengths[:self.active].max()) if self.active else 0
        self.window = min(self._round(longest), self.capacity)

    def reset_rows(self, rows: list[int] | torch.Tensor) -> None:
        """Forget what rows hold (a serving slot given to a new request); no memory is touched."""
        self.lengths[torch.as_tensor(rows, dtype=torch.long, device=self.device)] = 0

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src`'s K/V (up to the window) into row `dst` (the engine keeps live rows leading)."""
        w = self.window
        for store in (self.k, self.v):
            for buf in store:
                buf[dst, :, :, :w] = buf[src, :, :, :w]
        self.pos[dst, :, :w] = self.pos[src, :, :w]
        self.lengths[dst] = self.lengths[src]

    def begin_depth(self, depth: int, rows: torch.Tensor | None, q_pos: torch.Tensor,
                    q_valid: torch.Tensor, backend: str, counts: Counter,
                    single_step: bool = False) -> "_CacheView":
        """Reserve slots for the valid queries of `rows` (of the active rows) at `depth`; return the
        view for its layers.

        single_step: the call feeds at most one token per row, so every cached key precedes it.
        """
        if not 1 <= depth <= self.max_depth:
            raise ValueError(f"depth {depth} outside 1..{self.max_depth} of this cache")
        n = self.active
        row_ids = rows if rows is not None else torch.arange(n, device=self.device)
        start = self.lengths[row_ids, depth - 1]  # (B_d,)
        n_new = q_valid.sum(1)  # (B_d,)
        self._grow(int((start + n_new).max()) if len(row_ids) else 0)
        bi, qi = q_valid.nonzero(as_tuple=True)  # valid query slots, row-major
        slots = start[bi] + (q_valid.long().cumsum(1) - 1)[bi, qi]
        self.pos[row_ids[bi], depth - 1, slots] = q_pos[bi, qi]
        self.lengths[row_ids, depth - 1] = start + n_new

        lo, hi = visible_depths(depth, self.depth_attention)
        n_vis, w = hi - lo + 1, self.window
        ar = torch.arange(w, device=self.device)
        k_valid = (ar[None, None, :] < self.lengths[:n, lo - 1:hi, None]).reshape(n, n_vis * w)
        k_pos = self.pos[:n, lo - 1:hi, :w].reshape(n, n_vis * w)
        if rows is not None:
            k_valid, k_pos = k_valid.index_select(0, rows), k_pos.index_select(0, rows)
        k_self = None
        if self.depth_attention == "first_self" and hi > 1:
            deep = torch.arange(lo, hi + 1, device=self.device)[:, None] > 1  # (n_vis, 1)
            k_self = deep.expand(n_vis, w).reshape(1, n_vis * w).expand(k_valid.shape[0], -1)
        # A single new token per row sees every cached key that exists: no positional mask needed.
        # (Not true of one depth-2 query inside a chunk: that chunk's later depth-1 keys exist too.)
        spec = DuoCausalSpec(q_pos=_query_pos(q_pos, q_valid), k_pos=k_pos, k_valid=k_valid,
                             backend=backend, all_keys_precede=single_step, counts=counts, k_self_only=k_self)
        return _CacheView(self, depth, rows, row_ids[bi], bi, qi, slots, spec, (lo, hi))


    def begin_mixed(self, depth: torch.Tensor, q_pos: torch.Tensor, counts: Counter,
                    split_deep: bool = False) -> "_MixedView":
        """One token per active row, row r at depth[r] (serving decode): reserve its slot and return
        the view for the layers. Keys are handed over as the per-depth window, a view of the buffer.

        split_deep (TaH2's decode): when depth-1 rows and deeper rows mix, the depth-1 rows read the
        depth-1 window only and the deeper rows also their deeper keys (a window of their own length),
        as the authors' engine indexes them, instead of every row reading every depth's window."""
        n = self.active
        r = torch.arange(n, device=self.device)
        d0 = depth - 1  # (n,) 0-based depth slot
        if bool((d0 < 0).any()) or bool((d0 >= self.max_depth).any()):
            raise ValueError(f"depths must be in 1..{self.max_depth}")
        slot = self.lengths[r, d0]  # (n,)
        self._grow(int(slot.max()) + 1)
        self.pos[r, d0, slot] = q_pos
        self.lengths[r, d0] = slot + 1
        if split_deep and self.depth_attention in ("duo_causal", "first_self"):
            deep = (depth > 1).nonzero().squeeze(1)  # (B_deep,)
            if 0 < deep.numel() < n:
                return self._begin_split(deep, d0, q_pos, r, slot, counts)
        n_vis = 1 if bool((depth == 1).all()) else self.max_depth
        w = self.window
        exists = torch.arange(w, device=self.device)[None, None, :] < self.lengths[:n, :n_vis, None]
        allowed = mixed_visibility(self.depth_attention, d0, n_vis, lambda: self.pos[:n, :n_vis, :w] == q_pos[:, None, None])
        spec = MixedDecodeSpec(k_valid=exists & allowed, counts=counts)
        return _MixedView(self, r, d0, slot, n_vis, spec)

    def _begin_split(self, deep: torch.Tensor, d0: torch.Tensor, q_pos: torch.Tensor, r: torch.Tensor,
                     slot: torch.Tensor, counts: Counter) -> "_MixedView":
        """begin_mixed's split form: every row sees the depth-1 window; the deeper rows `deep` also see
        depths 2..(their depth) of a window as long as their longest deeper depth (both rules here,
        duo_causal and first_self, let every row see depth-1 keys)."""
        n, w = self.active, self.window
        dd0 = d0.index_select(0, deep)  # (B_deep,)
        n_vis = int(dd0.max()) + 1
        w2 = min(w, self._round(int(self.lengths.index_select(0, deep)[:, 1:n_vis].max())))
        exists1 = torch.arange(w, device=self.device)[None, None, :] < self.lengths[:n, :1, None]  # (n, 1, w)
        lens = self.lengths.index_select(0, deep)[:, 1:n_vis, None]  # (B_deep, n_vis - 1, 1)
        exists = torch.arange(w2, device=self.device)[None, None, :] < lens
        kd = torch.arange(1, n_vis, device=self.device)[None, :, None]  # 0-based depth slots 1..n_vis-1
        allowed = kd <= dd0[:, None, None]
        if self.depth_attention == "first_self":  # the row's own deeper keys only (its own position)
            pos = self.pos.index_select(0, deep)[:, 1:n_vis, :w2]
            allowed = allowed & (pos == q_pos.index_select(0, deep)[:, None, None])
        spec = MixedDecodeSpec(k_valid=exists1, counts=counts, deep_rows=deep, deep_valid=exists & allowed)
        return _MixedView(self, r, d0, slot, 1, spec, deep=(deep, n_vis, w2))


class _MixedView(_DepthView):
    def __init__(self, cache: TaHCache, r, d0, slot, n_vis: int, spec: MixedDecodeSpec,
                 deep: tuple[torch.Tensor, int, int] | None = None) -> None:
        self.cache, self.r, self.d0, self.slot, self.n_vis, self.spec = cache, r, d0, slot, n_vis, spec
        self.deep = deep  # split form: (deeper rows, visible depths, their window)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        c = self.cache
        kb, vb = c.k[layer_idx], c.v[layer_idx]
        kb[self.r, :, self.d0, self.slot] = key_states[:, :, 0].to(kb.dtype)  # (n, Hkv, D)
        vb[self.r, :, self.d0, self.slot] = value_states[:, :, 0].to(vb.dtype)
        n, w = c.active, c.window
        k, v = kb[:n, :, :self.n_vis, :w], vb[:n, :, :self.n_vis, :w]  # (n, Hkv, n_vis, w, D) views
        if self.deep is None:
            return k, v
        rows, n_vis, w2 = self.deep  # + the deeper rows' deeper keys, (B_deep, Hkv, n_vis - 1, w2, D) copies
        return ((k, kb[:, :, 1:n_vis, :w2].index_select(0, rows)),
                (v, vb[:, :, 1:n_vis, :w2].index_select(0, rows)))


class _CacheView(_DepthView):
    def __init__(self, cache: TaHCache, depth: int, rows, write_rows, bi, qi, slots,
                 spec: DuoCausalSpec, visible: tuple[int, int]) -> None:
        self.cache, self.depth, self.rows, self.spec, self.visible = cache, depth, rows, spec, visible
        self.write_rows, self.bi, self.qi, self.slots = write_rows, bi, qi, slots

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        c, d = self.cache, self.depth
        kb, vb = c.k[layer_idx], c.v[layer_idx]
        # (N, Hkv, D) scattered into each valid query's slot of this depth.
        kb[self.write_rows, :, d - 1, self.slots] = key_states[self.bi, :, self.qi].to(kb.dtype)
        vb[self.write_rows, :, d - 1, self.slots] = value_states[self.bi, :, self.qi].to(vb.dtype)
        lo, hi = self.visible
        n, w = c.active, c.window
        shape = (n, c.num_kv_heads, (hi - lo + 1) * w, c.head_dim)
        # A view when one depth is visible (the common decode case); a copy only across depths.
        k, v = kb[:n, :, lo - 1:hi, :w].reshape(shape), vb[:n, :, lo - 1:hi, :w].reshape(shape)
        if self.rows is not None:
            k, v = k.index_select(0, self.rows), v.index_select(0, self.rows)
        return k, v
