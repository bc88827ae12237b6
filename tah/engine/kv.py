"""The engine's paged KV memory: one pool of fixed-size blocks per layer, per-request block tables per
depth, prefix caching of full depth-1 prompt blocks, and the per-call paged view the model attends through.

- `BlockPool`  per layer K and V of shape (num_blocks, Hkv, block_size, D) plus each slot's position id
               (num_blocks, block_size); a free list, reference counts, and the prefix cache: full depth-1
               blocks of prompts keyed by a hash of every token up to the block's end (and of what
               decides the deeper depths: cap, threshold, policy), kept after their request ends and
               evicted least-recently-used when blocks run out.
- `SeqKV`      one request's block tables, one per depth: depth 1 holds every token, depth d >= 2 only
               the tokens that ran depth d (their positions are in the pool), allocated when the
               request's first token reaches that depth. Entries are appended in position order.
- `PagedBatch` what `TaHForCausalLM.forward` / `decode_step` / `decode_step_mix` take as
               `past_key_values` for one call over some requests: the `TaHCache` protocol (`active`,
               `lengths`, `seen_tokens`, `begin_depth`, `begin_mixed`). New keys are scattered into
               their blocks; attention reads a per-row key window gathered through the block tables
               (`gather`: the one place a CUDA paged-attention kernel would replace).

Prefix-cache policy for the deeper depths: a cached depth-1 block carries, by value, the K/V and
positions of the deeper-depth entries the decider wrote for the block's tokens (`DeepPayload`). A hit
copies them into the new request's own deeper blocks, so the prompt suffix attends exactly what a miss
would have computed (deeper entries depend only on the tokens up to them and on cap / threshold /
policy, which are part of the hash). They are small (the iterated share of a block) and counted in
`BlockPool.payload_bytes`.

    python -c "import tah.engine.kv as m; print(m.__doc__)"
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

import torch

from ..attention import DuoCausalSpec, MixedDecodeSpec
from ..cache import _DepthView, _query_pos, mixed_visibility, visible_depths


class NoFreeBlocks(RuntimeError):
    """The pool has fewer free blocks than a write needs (the scheduler preempts or requeues)."""


@dataclass
class DeepPayload:
    """The deeper-depth entries of one cached depth-1 block: per depth d >= 2 (key d), K/V
    (num_layers, n, Hkv, D) and positions (n,) of the block's tokens that ran depth d."""

    k: dict[int, torch.Tensor] = field(default_factory=dict)
    v: dict[int, torch.Tensor] = field(default_factory=dict)
    pos: dict[int, torch.Tensor] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.k, self.v, self.pos) for t in d.values())


def chain_hashes(tokens: list[int], block_size: int, n_blocks: int, seed: str) -> list[bytes]:
    """Hash of each of the first n_blocks full blocks, chained (block i's hash covers tokens 0..end of i)."""
    out, h = [], hashlib.sha256(seed.encode()).digest()
    for i in range(n_blocks):
        blk = tokens[i * block_size:(i + 1) * block_size]
        h = hashlib.sha256(h + b"|" + ",".join(map(str, blk)).encode()).digest()
        out.append(h)
    return out


class BlockPool:
    """Fixed-size KV blocks for every layer, their allocator and the prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size, self.num_layers = num_blocks, block_size, num_layers
        self.device = torch.device(device)
        shape = (num_blocks, num_kv_heads, block_size, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.pos = torch.zeros(num_blocks, block_size, dtype=torch.long, device=self.device)
        self.ref = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # free, not in the prefix cache
        self._evictable: OrderedDict[int, bytes] = OrderedDict()  # free but cached: LRU first
        self._cached: dict[bytes, int] = {}  # hash -> block
        self._hash_of: dict[int, bytes] = {}
        self.payload: dict[bytes, DeepPayload] = {}
        self.prefix_queries = self.prefix_hits = 0  # in tokens, as vLLM counts them

    # ------------------------------------------------------------------ accounting
    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks held by live requests (cached-but-free blocks count as free: they are evictable)."""
        return self.num_blocks - self.num_free

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def bytes_per_block(self) -> int:
        return 2 * self.num_layers * self.k[0][0].numel() * self.k[0].element_size()

    def payload_bytes(self) -> int:
        return sum(p.nbytes() for p in self.payload.values())

    # ------------------------------------------------------------------ allocation
    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise NoFreeBlocks(f"{n} KV blocks wanted, {self.num_free} free of {self.num_blocks}")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:  # evict the least recently used cached block
                b, h = self._evictable.popitem(last=False)
                del self._cached[h], self._hash_of[b]
                self.payload.pop(h, None)
            self.ref[b] = 1
            out.append(b)
        return out

    def free(self, blocks: list[int]) -> None:
        for b in reversed(blocks):  # a chain's tail is evicted before its head
            if self.ref[b] <= 0:
                raise RuntimeError(f"KV block {b} freed twice")
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if b in self._hash_of:
                    self._evictable[b] = self._hash_of[b]
                else:
                    self._free.append(b)

    # ------------------------------------------------------------------ prefix cache
    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The leading cached blocks of a chain (not yet taken)."""
        out = []
        for h in hashes:
            b = self._cached.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def take(self, blocks: list[int]) -> None:
        """A new reference to cached blocks (a prefix hit)."""
        for b in blocks:
            if self.ref[b] == 0:
                del self._evictable[b]
            self.ref[b] += 1

    def register(self, block: int, h: bytes, payload: DeepPayload) -> None:
        if h in self._cached or block in self._hash_of:
            return
        self._cached[h], self._hash_of[block] = block, h
        self.payload[h] = payload

    def clear_prefix_cache(self) -> None:
        for b in list(self._evictable):
            self._free.append(b)
        self._evictable.clear()
        self._cached.clear()
        self._hash_of.clear()
        self.payload.clear()

    def snapshot(self, seq: "SeqKV", lo: int, hi: int) -> DeepPayload:
        """The deeper-depth entries of `seq` whose positions lie in [lo, hi) (a block being cached)."""
        out = DeepPayload()
        for d0 in range(1, len(seq.lengths)):
            n = seq.lengths[d0]
            if not n:
                break
            blk, off = self.entries(seq.tables[d0], n)
            pos = self.pos[blk, off]  # (n,) ascending
            sel = ((pos >= lo) & (pos < hi)).nonzero().squeeze(1)
            if not sel.numel():
                continue
            b, o = blk[sel], off[sel]
            out.k[d0 + 1] = torch.stack([k[b, :, o] for k in self.k])  # (L, n_d, Hkv, D)
            out.v[d0 + 1] = torch.stack([v[b, :, o] for v in self.v])
            out.pos[d0 + 1] = pos[sel].clone()
        return out

    def restore(self, seq: "SeqKV", payloads: list[DeepPayload]) -> None:
        """Append cached blocks' deeper entries to `seq`'s deeper tables (in position order)."""
        for d in sorted({d for p in payloads for d in p.pos}):
            ks = torch.cat([p.k[d] for p in payloads if d in p.k], dim=1)  # (L, n, Hkv, D)
            vs = torch.cat([p.v[d] for p in payloads if d in p.v], dim=1)
            pos = torch.cat([p.pos[d] for p in payloads if d in p.pos])
            n, table = pos.numel(), seq.tables[d - 1]
            start = seq.lengths[d - 1]
            need = -(-(start + n) // self.block_size) - len(table)
            if need > 0:
                table += self.allocate(need)
            blk, off = self.entries(table, start + n)
            blk, off = blk[start:], off[start:]
            for layer in range(self.num_layers):
                self.k[layer][blk, :, off] = ks[layer]
                self.v[layer][blk, :, off] = vs[layer]
            self.pos[blk, off] = pos
            seq.lengths[d - 1] = start + n

    # ------------------------------------------------------------------ reading and writing
    def gather(self, layer: int, tables: torch.Tensor, store: str = "k") -> torch.Tensor:
        """(R, n_vis, nb) block ids -> (R, Hkv, n_vis, nb * block_size, D) keys (or values) in slot order.

        On CPU a gather per layer; a paged-attention kernel would read through `tables` in place."""
        buf = (self.k if store == "k" else self.v)[layer]
        R, n_vis, nb = tables.shape
        g = buf[tables]  # (R, n_vis, nb, Hkv, bs, D)
        return g.permute(0, 3, 1, 2, 4, 5).reshape(R, g.shape[3], n_vis, nb * self.block_size, g.shape[-1])

    def entries(self, table: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, offset) index tensors of a table's first n entries."""
        i = torch.arange(n, device=self.device)
        t = torch.tensor(table, dtype=torch.long, device=self.device)
        return t[i // self.block_size], i % self.block_size


class SeqKV:
    """One request's block tables (per depth) and entry counts (per depth)."""

    def __init__(self, max_depth: int) -> None:
        self.tables: list[list[int]] = [[] for _ in range(max_depth)]
        self.lengths: list[int] = [0] * max_depth
        self.shared = 0  # leading depth-1 blocks taken from the prefix cache (read-only)

    def blocks(self) -> list[int]:
        return [b for t in self.tables for b in t]

    def reset(self) -> None:
        for t in self.tables:
            t.clear()
        self.lengths = [0] * len(self.lengths)
        self.shared = 0


class PagedBatch:
    """One model call's cache over `seqs` (row i = seqs[i]): the TaHCache protocol through block tables.

    Writes beyond a row's blocks allocate from the pool (NoFreeBlocks if it is empty); the scheduler
    allocated every block a decode step needs beforehand, so only a prefill's deeper depths get here."""

    def __init__(self, pool: BlockPool, seqs: list[SeqKV], max_depth: int, depth_attention: str) -> None:
        self.pool, self.seqs, self.max_depth, self.depth_attention = pool, seqs, max_depth, depth_attention
        self.num_layers, self.bs = pool.num_layers, pool.block_size
        self.active = len(seqs)
        self.device = pool.device
        self.lengths = torch.tensor([s.lengths for s in seqs], dtype=torch.long, device=self.device).view(
            len(seqs), max_depth)  # (n, M)

    @property
    def seen_tokens(self) -> torch.Tensor:
        return self.lengths[:, 0]

    def _round(self, n: int) -> int:
        return max(1, -(-n // self.bs)) * self.bs

    def _reserve(self, rows: list[int], d0: int, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Append counts[j] entries to rows[j]'s depth d0 table; (block, offset) of each, row-major."""
        blk, off = [], []
        for i, c in zip(rows, counts):
            s = self.seqs[i]
            start, need = s.lengths[d0], s.lengths[d0] + c
            have = len(s.tables[d0]) * self.bs
            if need > have:
                s.tables[d0] += self.pool.allocate(-(-(need - have) // self.bs))
            for slot in range(start, need):
                blk.append(s.tables[d0][slot // self.bs])
                off.append(slot % self.bs)
            s.lengths[d0] = need
        t = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
        return t(blk), t(off)

    def _tables(self, rows: list[int], lo: int, hi: int, width: int) -> torch.Tensor:
        """(len(rows), hi - lo + 1, width // bs) block ids of depths lo..hi (0-based), padded with 0."""
        nb = width // self.bs
        out = torch.zeros(len(rows), hi - lo + 1, nb, dtype=torch.long)
        for j, i in enumerate(rows):
            for d in range(lo, hi + 1):
                t = self.seqs[i].tables[d][:nb]
                if t:
                    out[j, d - lo, :len(t)] = torch.tensor(t, dtype=torch.long)
        return out.to(self.device)

    def _window(self, rows: list[int], lo: int, hi: int) -> int:
        return self._round(max((self.seqs[i].lengths[d] for i in rows for d in range(lo, hi + 1)), default=1))

    # ------------------------------------------------------------------ forward (prefill) calls
    def begin_depth(self, depth: int, rows: torch.Tensor | None, q_pos: torch.Tensor, q_valid: torch.Tensor,
                    backend: str, counts: Counter, single_step: bool = False) -> "_PagedDepthView":
        """As TaHCache.begin_depth: the valid queries of `rows` at `depth` get entries; keys of the visible
        depths are gathered into (B_d, Hkv, n_vis * W, D)."""
        if not 1 <= depth <= self.max_depth:
            raise ValueError(f"depth {depth} outside 1..{self.max_depth} of this cache")
        row_l = list(range(self.active)) if rows is None else rows.tolist()
        n_new = q_valid.sum(1).tolist()
        blk, off = self._reserve(row_l, depth - 1, n_new)
        bi, qi = q_valid.nonzero(as_tuple=True)
        self.pool.pos[blk, off] = q_pos[bi, qi]
        self.lengths[torch.tensor(row_l, dtype=torch.long, device=self.device), depth - 1] += q_valid.sum(1)
        lo, hi = visible_depths(depth, self.depth_attention)
        n_vis, w = hi - lo + 1, self._window(row_l, lo - 1, hi - 1)
        tables = self._tables(row_l, lo - 1, hi - 1, w)  # (B_d, n_vis, nb)
        lens = self.lengths[torch.tensor(row_l, dtype=torch.long, device=self.device), lo - 1:hi]  # (B_d, n_vis)
        k_valid = (torch.arange(w, device=self.device)[None, None, :] < lens[:, :, None]).reshape(len(row_l), -1)
        k_pos = self.pool.pos[tables].reshape(len(row_l), n_vis * w)
        k_self = None
        if self.depth_attention == "first_self" and hi > 1:
            deep = torch.arange(lo, hi + 1, device=self.device)[:, None] > 1
            k_self = deep.expand(n_vis, w).reshape(1, n_vis * w).expand(len(row_l), -1)
        spec = DuoCausalSpec(q_pos=_query_pos(q_pos, q_valid), k_pos=k_pos, k_valid=k_valid, backend=backend,
                             all_keys_precede=single_step, counts=counts, k_self_only=k_self)
        return _PagedDepthView(self, tables, blk, off, bi, qi, spec)

    # ------------------------------------------------------------------ decode calls
    def begin_mixed(self, depth: torch.Tensor, q_pos: torch.Tensor, counts: Counter,
                    split_deep: bool = False) -> "_PagedMixedView":
        """As TaHCache.begin_mixed: one token per row, row r at depth[r]; keys (n, Hkv, n_vis, W, D)."""
        n = self.active
        depth_l = depth.tolist()
        if any(not 1 <= d <= self.max_depth for d in depth_l):
            raise ValueError(f"depths must be in 1..{self.max_depth}")
        blk, off = [], []
        for i, d in enumerate(depth_l):
            b, o = self._reserve([i], d - 1, [1])
            blk.append(b)
            off.append(o)
        blk, off = torch.cat(blk), torch.cat(off)
        self.pool.pos[blk, off] = q_pos
        d0 = depth - 1
        self.lengths[torch.arange(n, device=self.device), d0] += 1
        rows = list(range(n))
        if split_deep and self.depth_attention in ("duo_causal", "first_self"):
            deep = [i for i in rows if depth_l[i] > 1]
            if 0 < len(deep) < n:
                return self._begin_split(deep, depth_l, q_pos, blk, off, counts)
        n_vis = 1 if self.depth_attention == "first" else max(depth_l)
        w = self._window(rows, 0, n_vis - 1)
        tables = self._tables(rows, 0, n_vis - 1, w)
        exists = torch.arange(w, device=self.device)[None, None, :] < self.lengths[:, :n_vis, None]
        allowed = mixed_visibility(self.depth_attention, d0, n_vis,
                                   lambda: self.pool.pos[tables].reshape(n, n_vis, w) == q_pos[:, None, None])
        spec = MixedDecodeSpec(k_valid=exists & allowed, counts=counts)
        return _PagedMixedView(self, blk, off, tables, spec)

    def _begin_split(self, deep: list[int], depth_l: list[int], q_pos: torch.Tensor, blk, off,
                     counts: Counter) -> "_PagedMixedView":
        """Split form (TaH2): every row sees its depth-1 window; the deeper rows also depths 2..theirs."""
        n = self.active
        dev = self.device
        rows = list(range(n))
        w = self._window(rows, 0, 0)
        tables1 = self._tables(rows, 0, 0, w)
        n_vis = max(depth_l[i] for i in deep)
        w2 = self._window(deep, 1, n_vis - 1)
        tables2 = self._tables(deep, 1, n_vis - 1, w2)  # (B_deep, n_vis - 1, nb2)
        deep_t = torch.tensor(deep, dtype=torch.long, device=dev)
        exists1 = torch.arange(w, device=dev)[None, None, :] < self.lengths[:, :1, None]
        lens = self.lengths.index_select(0, deep_t)[:, 1:n_vis, None]
        exists = torch.arange(w2, device=dev)[None, None, :] < lens
        kd = torch.arange(1, n_vis, device=dev)[None, :, None]
        dd0 = torch.tensor([depth_l[i] - 1 for i in deep], device=dev)
        allowed = kd <= dd0[:, None, None]
        if self.depth_attention == "first_self":
            pos = self.pool.pos[tables2].reshape(len(deep), n_vis - 1, w2)
            allowed = allowed & (pos == q_pos.index_select(0, deep_t)[:, None, None])
        spec = MixedDecodeSpec(k_valid=exists1, counts=counts, deep_rows=deep_t, deep_valid=exists & allowed)
        return _PagedMixedView(self, blk, off, tables1, spec, deep_tables=tables2)


class _PagedDepthView(_DepthView):
    def __init__(self, batch: PagedBatch, tables, blk, off, bi, qi, spec: DuoCausalSpec) -> None:
        self.batch, self.tables, self.blk, self.off, self.bi, self.qi, self.spec = batch, tables, blk, off, bi, qi, spec

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        pool = self.batch.pool
        kb, vb = pool.k[layer_idx], pool.v[layer_idx]
        kb[self.blk, :, self.off] = key_states[self.bi, :, self.qi].to(kb.dtype)  # (N, Hkv, D)
        vb[self.blk, :, self.off] = value_states[self.bi, :, self.qi].to(vb.dtype)
        k, v = pool.gather(layer_idx, self.tables, "k"), pool.gather(layer_idx, self.tables, "v")
        R, H, nv, w, D = k.shape
        return k.reshape(R, H, nv * w, D), v.reshape(R, H, nv * w, D)


class _PagedMixedView(_DepthView):
    def __init__(self, batch: PagedBatch, blk, off, tables, spec: MixedDecodeSpec,
                 deep_tables: torch.Tensor | None = None) -> None:
        self.batch, self.blk, self.off, self.tables, self.spec = batch, blk, off, tables, spec
        self.deep_tables = deep_tables

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        pool = self.batch.pool
        kb, vb = pool.k[layer_idx], pool.v[layer_idx]
        kb[self.blk, :, self.off] = key_states[:, :, 0].to(kb.dtype)  # (n, Hkv, D)
        vb[self.blk, :, self.off] = value_states[:, :, 0].to(vb.dtype)
        k, v = pool.gather(layer_idx, self.tables, "k"), pool.gather(layer_idx, self.tables, "v")
        if self.deep_tables is None:
            return k, v
        return ((k, pool.gather(layer_idx, self.deep_tables, "k")),
                (v, pool.gather(layer_idx, self.deep_tables, "v")))
