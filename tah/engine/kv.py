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
               their slots; attention reads a per-row key window gathered through the block tables
               (`gather`: the one place a CUDA paged-attention kernel would replace).

Heads before slots inside a block: a gathered pool block is a contiguous (Hkv, block_size, D) matrix per
head, so decode attention multiplies the gathered blocks in place, batched over (row, block, head)
(`MixedDecodeSpec.blocked`), and the gather itself is one `index_select` of whole blocks. With slots
before heads the gather was an element-wise `index` and `matmul` copied the window again to make its
(row, head) batch dimensions flatten. Measured on the small random model, Standard, batch 32, ~90-token
contexts, 2 threads, three alternating runs: 10.9-11.6 ms per decode step against 11.9-12.3 (the gathers
0.64 ms against 1.2 ms a step); no change at batch 1.

Two block kinds, one memory. Depth-1 tables use blocks of `block_size` tokens; the deeper tables use
blocks of `deep_block_size` tokens (a divisor of block_size), because a request's deeper depths hold
few tokens each and a whole block_size block per deeper table (plus each table's partly empty last
block) would cost more than the entries themselves. A deep block is a slice of a pool block: a pool
block taken for the deeper depths is split into block_size / deep_block_size deep blocks (a slab),
handed out one by one to any request's deeper tables, and returned to the free list when its last
deep block is freed. Both kinds address the same storage by flat slot: slot s is slot s % block_size
of pool block s // block_size, and deep block s is slots (s % split) * deep_block_size onwards of pool
block s // split, so attention gathers either kind (or depth-1 blocks split into deep-sized pieces, for
windows that mix depths) from the one buffer. `num_used` counts a split pool block as used in full
(depth 1 cannot have it); `num_deep_used` / `num_deep_free` count the deep blocks held and free inside split blocks.

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
import heapq
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
    """Fixed-size KV blocks for every layer, their allocator (depth-1 blocks, and the deeper depths'
    smaller blocks carved out of split ones) and the prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, deep_block_size: int | None = None) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        dbs = block_size if deep_block_size is None else deep_block_size
        if dbs < 1 or block_size % dbs:
            raise ValueError(f"deep_block_size must be a divisor of block_size {block_size}, got {dbs}")
        self.num_blocks, self.block_size, self.num_layers = num_blocks, block_size, num_layers
        self.deep_block_size, self.split = dbs, block_size // dbs  # deep blocks per split pool block
        self.device = torch.device(device)
        shape = (num_blocks, num_kv_heads, block_size, head_dim)  # a block is one (bs, D) matrix per head
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.pos = torch.zeros(num_blocks, block_size, dtype=torch.long, device=self.device)
        # Decode reads pool blocks in place (MixedDecodeSpec.blocked) except in half precision, where each
        # block's partial output would be rounded before their sum: there the window is read (one matmul
        # over it, one rounding), as before the pool was laid out by block.
        self.blocks_in_place = dtype not in (torch.float16, torch.bfloat16)
        self.ref = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # free, not in the prefix cache
        self._evictable: OrderedDict[int, bytes] = OrderedDict()  # free but cached: LRU first
        self._cached: dict[bytes, int] = {}  # hash -> block
        self._hash_of: dict[int, bytes] = {}
        self._deep_free: set[int] = set()  # deep blocks free inside split pool blocks
        self._deep_heap: list[int] = []  # the same ids (and stale ones, skipped): the lowest free in O(log n)
        self._deep_held: set[int] = set()
        self._split_held: dict[int, int] = {}  # split pool block -> how many of its deep blocks are held
        self.payload: dict[bytes, DeepPayload] = {}
        self.prefix_queries = self.prefix_hits = 0  # in tokens, as vLLM counts them

    # ------------------------------------------------------------------ accounting
    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Pool blocks held: by live requests' depth-1 tables, or split for deep blocks (in full: depth 1
        cannot use a split block's free deep blocks). Cached-but-free blocks count as free (evictable)."""
        return self.num_blocks - self.num_free

    @property
    def num_deep_used(self) -> int:
        """Deep blocks (deep_block_size tokens) held by live requests' deeper tables."""
        return len(self._deep_held)

    @property
    def num_deep_free(self) -> int:
        """Deep blocks free inside split pool blocks (the next deep allocations take them first)."""
        return len(self._deep_free)

    @property
    def num_split(self) -> int:
        """Pool blocks split into deep blocks."""
        return len(self._split_held)

    def unit(self, d0: int) -> int:
        """Tokens per block of the tables of 0-based depth d0."""
        return self.block_size if d0 == 0 else self.deep_block_size

    def blocks_needed(self, n: int, n_deep: int) -> int:
        """Pool blocks that n depth-1 blocks plus n_deep deep blocks would take (exactly as `allocate` and
        `allocate_deep` take them: deep blocks free in split blocks first)."""
        return n + max(0, -(-(n_deep - len(self._deep_free)) // self.split))

    def fits(self, n: int, n_deep: int) -> bool:
        return self.blocks_needed(n, n_deep) <= self.num_free

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

    def allocate_deep(self, n: int) -> list[int]:
        """n deep blocks (ids in units of deep_block_size slots), splitting free pool blocks as needed."""
        if not self.fits(0, n):
            raise NoFreeBlocks(f"{n} deep KV blocks wanted, {len(self._deep_free)} free in split blocks and "
                               f"{self.num_free} pool blocks free of {self.num_blocks}")
        out = []
        for _ in range(n):
            if not self._deep_free:
                (b,) = self.allocate(1)
                self._split_held[b] = 0
                ids = range(b * self.split, (b + 1) * self.split)
                self._deep_free.update(ids)
                for s in ids:
                    heapq.heappush(self._deep_heap, s)
            s = heapq.heappop(self._deep_heap)  # the lowest: fills split blocks one after another
            while s not in self._deep_free:  # stale: its split block went back to the pool
                s = heapq.heappop(self._deep_heap)
            self._deep_free.remove(s)
            self._deep_held.add(s)
            self._split_held[s // self.split] += 1
            out.append(s)
        return out

    def free_deep(self, blocks: list[int]) -> None:
        """Free deep blocks; a split pool block whose deep blocks are all free goes back to the pool."""
        for s in blocks:
            if s not in self._deep_held:
                raise RuntimeError(f"deep KV block {s} freed twice")
            self._deep_held.remove(s)
            self._deep_free.add(s)
            heapq.heappush(self._deep_heap, s)
            b = s // self.split
            self._split_held[b] -= 1
            if self._split_held[b] == 0:
                del self._split_held[b]
                self._deep_free.difference_update(range(b * self.split, (b + 1) * self.split))
                self.free([b])
                if len(self._deep_heap) > 2 * len(self._deep_free) + 2 * self.split:  # drop stale ids
                    self._deep_heap = sorted(self._deep_free)

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
            sl = self.slots(seq.tables[d0], self.deep_block_size, 0, n)
            pos = self.pos.view(-1)[sl]  # (n,) ascending
            sel = ((pos >= lo) & (pos < hi)).nonzero().squeeze(1)
            if not sel.numel():
                continue
            s = sl[sel]
            out.k[d0 + 1] = torch.stack([self.read(layer, "k", s) for layer in range(self.num_layers)])  # (L, n_d, Hkv, D)
            out.v[d0 + 1] = torch.stack([self.read(layer, "v", s) for layer in range(self.num_layers)])
            out.pos[d0 + 1] = pos[sel].clone()
        return out

    def restore(self, seq: "SeqKV", payloads: list[DeepPayload]) -> None:
        """Append cached blocks' deeper entries to `seq`'s deeper tables (in position order)."""
        dbs = self.deep_block_size
        for d in sorted({d for p in payloads for d in p.pos}):
            ks = torch.cat([p.k[d] for p in payloads if d in p.k], dim=1)  # (L, n, Hkv, D)
            vs = torch.cat([p.v[d] for p in payloads if d in p.v], dim=1)
            pos = torch.cat([p.pos[d] for p in payloads if d in p.pos])
            n, table = pos.numel(), seq.tables[d - 1]
            start = seq.lengths[d - 1]
            need = -(-(start + n) // dbs) - len(table)
            if need > 0:
                table += self.allocate_deep(need)
            sl = self.slots(table, dbs, start, start + n)
            for layer in range(self.num_layers):
                self.write(layer, sl, ks[layer], vs[layer])
            self.pos.view(-1)[sl] = pos
            seq.lengths[d - 1] = start + n

    # ------------------------------------------------------------------ reading and writing
    def read(self, layer: int, store: str, slots: torch.Tensor) -> torch.Tensor:
        """K (or V) of one layer at flat slots (N,) -> (N, Hkv, D); flat slot s is block s // bs, slot s % bs."""
        buf = (self.k if store == "k" else self.v)[layer]
        return buf[slots // self.block_size, :, slots % self.block_size]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (N, Hkv, D) into flat slots (N,)."""
        b, o = slots // self.block_size, slots % self.block_size
        kb, vb = self.k[layer], self.v[layer]
        kb[b, :, o] = k.to(kb.dtype)
        vb[b, :, o] = v.to(vb.dtype)

    def gather(self, layer: int, tables: torch.Tensor, store: str, unit: int) -> torch.Tensor:
        """(R, n_vis, nb) ids of `unit`-slot blocks -> their keys (or values) as gathered blocks
        (R, n_vis, nb, Hkv, unit, D). Pool blocks (unit = block_size) are one `index_select` of whole
        blocks; smaller units are pieces of them (a strided index). On CPU a copy per layer; a
        paged-attention kernel would read through `tables` in place."""
        buf = (self.k if store == "k" else self.v)[layer]
        R, n_vis, nb = tables.shape
        if unit == self.block_size:
            g = buf.view(buf.shape[0], -1).index_select(0, tables.reshape(-1))
            return g.view(R, n_vis, nb, *buf.shape[1:])
        sp = self.block_size // unit
        return buf.view(buf.shape[0], buf.shape[1], sp, unit, buf.shape[3])[tables // sp, :, tables % sp]

    def slots(self, table: list[int], unit: int, start: int, stop: int) -> torch.Tensor:
        """Flat slot ids (stop - start,) of entries start..stop-1 of a table of `unit`-slot blocks."""
        i = torch.arange(start, stop)
        t = torch.tensor(table, dtype=torch.long)
        return (t[i // unit] * unit + i % unit).to(self.device)


def windows(blocks: torch.Tensor) -> torch.Tensor:
    """Gathered blocks (R, n_vis, nb, Hkv, u, D) -> the per-depth key window (R, Hkv, n_vis, nb * u, D), a copy."""
    R, n_vis, nb, H, u, D = blocks.shape
    return blocks.permute(0, 3, 1, 2, 4, 5).reshape(R, H, n_vis, nb * u, D)


class SeqKV:
    """One request's block tables (per depth) and entry counts (per depth). tables[0] holds pool blocks
    of block_size slots, tables[d0 >= 1] deep blocks of deep_block_size slots (`BlockPool.unit`)."""

    def __init__(self, max_depth: int) -> None:
        self.tables: list[list[int]] = [[] for _ in range(max_depth)]
        self.lengths: list[int] = [0] * max_depth
        self.shared = 0  # leading depth-1 blocks taken from the prefix cache (read-only)

    def blocks(self) -> list[int]:
        """Every block id it holds: its depth-1 (pool) blocks, then its deep blocks."""
        return [b for t in self.tables for b in t]

    def deep_blocks(self) -> list[int]:
        return [b for t in self.tables[1:] for b in t]

    def reset(self) -> None:
        for t in self.tables:
            t.clear()
        self.lengths = [0] * len(self.lengths)
        self.shared = 0


class PagedBatch:
    """One model call's cache over `seqs` (row i = seqs[i]): the TaHCache protocol through block tables.

    Writes beyond a row's blocks allocate from the pool (NoFreeBlocks if it is empty); the scheduler
    allocated every block a decode step needs beforehand, so only a prefill's deeper depths get here.
    A key window over depth 1 alone is gathered in pool blocks; one that includes a deeper depth in
    deep blocks (depth-1 blocks read as block_size / deep_block_size consecutive deep-sized pieces)."""

    def __init__(self, pool: BlockPool, seqs: list[SeqKV], max_depth: int, depth_attention: str) -> None:
        self.pool, self.seqs, self.max_depth, self.depth_attention = pool, seqs, max_depth, depth_attention
        self.num_layers, self.bs, self.dbs = pool.num_layers, pool.block_size, pool.deep_block_size
        self.active = len(seqs)
        self.device = pool.device
        self.lengths = torch.tensor([s.lengths for s in seqs], dtype=torch.long, device=self.device).view(
            len(seqs), max_depth)  # (n, M)

    @property
    def seen_tokens(self) -> torch.Tensor:
        return self.lengths[:, 0]

    def _unit(self, hi: int) -> int:
        """Gather granularity of a window over 0-based depths ..hi."""
        return self.bs if hi == 0 else self.dbs

    def _reserve(self, rows: list[int], d0: int, counts: list[int]) -> torch.Tensor:
        """Append counts[j] entries to rows[j]'s depth d0 table; the flat slot of each, row-major."""
        unit, out = self.pool.unit(d0), []
        for i, c in zip(rows, counts):
            s = self.seqs[i]
            start, need = s.lengths[d0], s.lengths[d0] + c
            have = len(s.tables[d0]) * unit
            if need > have:
                k = -(-(need - have) // unit)
                s.tables[d0] += self.pool.allocate(k) if d0 == 0 else self.pool.allocate_deep(k)
            t = s.tables[d0]
            out += [t[slot // unit] * unit + slot % unit for slot in range(start, need)]
            s.lengths[d0] = need
        return torch.tensor(out, dtype=torch.long, device=self.device)

    def _tables(self, rows: list[int], lo: int, hi: int, width: int, unit: int) -> torch.Tensor:
        """(len(rows), hi - lo + 1, width // unit) ids of `unit`-slot blocks of depths lo..hi (0-based),
        padded with 0."""
        nb, R = width // unit, len(rows)
        out = torch.zeros(R, hi - lo + 1, nb, dtype=torch.long)
        for d in range(lo, hi + 1):
            k = self.pool.unit(d) // unit  # pieces per block: > 1 for depth 1 in a deep-unit window
            nbd = -(-nb // k)
            t = torch.zeros(R, nbd, dtype=torch.long)
            for j, i in enumerate(rows):
                ids = self.seqs[i].tables[d][:nbd]
                if ids:
                    t[j, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            if k > 1:  # pool block b is deep-sized pieces b * k .. b * k + k - 1
                t = (t[:, :, None] * k + torch.arange(k)).reshape(R, nbd * k)[:, :nb]
            out[:, d - lo] = t
        return out.to(self.device)

    def _window(self, rows: list[int], lo: int, hi: int, unit: int) -> int:
        n = max((self.seqs[i].lengths[d] for i in rows for d in range(lo, hi + 1)), default=1)
        return max(1, -(-n // unit)) * unit

    # ------------------------------------------------------------------ forward (prefill) calls
    def begin_depth(self, depth: int, rows: torch.Tensor | None, q_pos: torch.Tensor, q_valid: torch.Tensor,
                    backend: str, counts: Counter, single_step: bool = False) -> "_PagedDepthView":
        """As TaHCache.begin_depth: the valid queries of `rows` at `depth` get entries; keys of the visible
        depths are gathered into (B_d, Hkv, n_vis * W, D)."""
        if not 1 <= depth <= self.max_depth:
            raise ValueError(f"depth {depth} outside 1..{self.max_depth} of this cache")
        row_l = list(range(self.active)) if rows is None else rows.tolist()
        n_new = q_valid.sum(1).tolist()
        slots = self._reserve(row_l, depth - 1, n_new)
        bi, qi = q_valid.nonzero(as_tuple=True)
        self.pool.pos.view(-1)[slots] = q_pos[bi, qi]
        self.lengths[torch.tensor(row_l, dtype=torch.long, device=self.device), depth - 1] += q_valid.sum(1)
        lo, hi = visible_depths(depth, self.depth_attention)
        n_vis, unit = hi - lo + 1, self._unit(hi - 1)
        w = self._window(row_l, lo - 1, hi - 1, unit)
        tables = self._tables(row_l, lo - 1, hi - 1, w, unit)  # (B_d, n_vis, w // unit)
        lens = self.lengths[torch.tensor(row_l, dtype=torch.long, device=self.device), lo - 1:hi]  # (B_d, n_vis)
        k_valid = (torch.arange(w, device=self.device)[None, None, :] < lens[:, :, None]).reshape(len(row_l), -1)
        k_pos = self.pool.pos.view(-1, unit)[tables].reshape(len(row_l), n_vis * w)
        k_self = None
        if self.depth_attention == "first_self" and hi > 1:
            deep = torch.arange(lo, hi + 1, device=self.device)[:, None] > 1
            k_self = deep.expand(n_vis, w).reshape(1, n_vis * w).expand(len(row_l), -1)
        spec = DuoCausalSpec(q_pos=_query_pos(q_pos, q_valid), k_pos=k_pos, k_valid=k_valid, backend=backend,
                             all_keys_precede=single_step, counts=counts, k_self_only=k_self)
        return _PagedDepthView(self, tables, unit, slots, bi, qi, spec)

    # ------------------------------------------------------------------ decode calls
    def begin_mixed(self, depth: torch.Tensor, q_pos: torch.Tensor, counts: Counter,
                    split_deep: bool = False) -> "_PagedMixedView":
        """As TaHCache.begin_mixed: one token per row, row r at depth[r]; keys (n, Hkv, n_vis, W, D)."""
        n = self.active
        depth_l = depth.tolist()
        if any(not 1 <= d <= self.max_depth for d in depth_l):
            raise ValueError(f"depths must be in 1..{self.max_depth}")
        slots = torch.cat([self._reserve([i], d - 1, [1]) for i, d in enumerate(depth_l)])
        self.pool.pos.view(-1)[slots] = q_pos
        d0 = depth - 1
        self.lengths[torch.arange(n, device=self.device), d0] += 1
        rows = list(range(n))
        if split_deep and self.depth_attention in ("duo_causal", "first_self"):
            deep = [i for i in rows if depth_l[i] > 1]
            if 0 < len(deep) < n:
                return self._begin_split(deep, depth_l, q_pos, slots, counts)
        n_vis = 1 if self.depth_attention == "first" else max(depth_l)
        unit = self._unit(n_vis - 1)
        w = self._window(rows, 0, n_vis - 1, unit)
        tables = self._tables(rows, 0, n_vis - 1, w, unit)
        exists = torch.arange(w, device=self.device)[None, None, :] < self.lengths[:, :n_vis, None]
        allowed = mixed_visibility(self.depth_attention, d0, n_vis, lambda: self.pool.pos.view(-1, unit)[tables]
                                   .reshape(n, n_vis, w) == q_pos[:, None, None])
        spec = MixedDecodeSpec(k_valid=exists & allowed, counts=counts, blocked=unit == self.bs and self.pool.blocks_in_place)
        return _PagedMixedView(self, slots, tables, unit, spec)

    def _begin_split(self, deep: list[int], depth_l: list[int], q_pos: torch.Tensor, slots: torch.Tensor,
                     counts: Counter) -> "_PagedMixedView":
        """Split form (TaH2): every row sees its depth-1 window; the deeper rows also depths 2..theirs."""
        n = self.active
        dev = self.device
        rows = list(range(n))
        w = self._window(rows, 0, 0, self.bs)
        tables1 = self._tables(rows, 0, 0, w, self.bs)
        n_vis = max(depth_l[i] for i in deep)
        w2 = self._window(deep, 1, n_vis - 1, self.dbs)
        tables2 = self._tables(deep, 1, n_vis - 1, w2, self.dbs)  # (B_deep, n_vis - 1, w2 // dbs)
        deep_t = torch.tensor(deep, dtype=torch.long, device=dev)
        exists1 = torch.arange(w, device=dev)[None, None, :] < self.lengths[:, :1, None]
        lens = self.lengths.index_select(0, deep_t)[:, 1:n_vis, None]
        exists = torch.arange(w2, device=dev)[None, None, :] < lens
        kd = torch.arange(1, n_vis, device=dev)[None, :, None]
        dd0 = torch.tensor([depth_l[i] - 1 for i in deep], device=dev)
        allowed = kd <= dd0[:, None, None]
        if self.depth_attention == "first_self":
            pos = self.pool.pos.view(-1, self.dbs)[tables2].reshape(len(deep), n_vis - 1, w2)
            allowed = allowed & (pos == q_pos.index_select(0, deep_t)[:, None, None])
        spec = MixedDecodeSpec(k_valid=exists1, counts=counts, deep_rows=deep_t, deep_valid=exists & allowed,
                               blocked=self.pool.blocks_in_place)
        return _PagedMixedView(self, slots, tables1, self.bs, spec, deep_tables=tables2)


class _PagedDepthView(_DepthView):
    def __init__(self, batch: PagedBatch, tables, unit: int, slots, bi, qi, spec: DuoCausalSpec) -> None:
        self.batch, self.tables, self.unit, self.slots, self.bi, self.qi = batch, tables, unit, slots, bi, qi
        self.spec = spec

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        pool = self.batch.pool
        pool.write(layer_idx, self.slots, key_states[self.bi, :, self.qi], value_states[self.bi, :, self.qi])
        k = windows(pool.gather(layer_idx, self.tables, "k", self.unit))
        v = windows(pool.gather(layer_idx, self.tables, "v", self.unit))
        R, H, nv, w, D = k.shape
        return k.reshape(R, H, nv * w, D), v.reshape(R, H, nv * w, D)


class _PagedMixedView(_DepthView):
    def __init__(self, batch: PagedBatch, slots, tables, unit: int, spec: MixedDecodeSpec,
                 deep_tables: torch.Tensor | None = None) -> None:
        self.batch, self.slots, self.tables, self.unit, self.spec = batch, slots, tables, unit, spec
        self.deep_tables = deep_tables

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        pool = self.batch.pool
        pool.write(layer_idx, self.slots, key_states[:, :, 0], value_states[:, :, 0])  # (n, Hkv, D)
        k = pool.gather(layer_idx, self.tables, "k", self.unit)  # (n, n_vis, nb, Hkv, unit, D)
        v = pool.gather(layer_idx, self.tables, "v", self.unit)
        if not self.spec.blocked:  # small units: one window, not many tiny blocks
            k, v = windows(k), windows(v)
        if self.deep_tables is None:
            return k, v
        dbs = pool.deep_block_size  # the deeper rows' deeper keys: few, read as a window
        return ((k, windows(pool.gather(layer_idx, self.deep_tables, "k", dbs))),
                (v, windows(pool.gather(layer_idx, self.deep_tables, "v", dbs))))
