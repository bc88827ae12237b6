"""The engine's scheduler: which requests decode, which prompts prefill, which KV blocks move -- a typed
`StepPlan` per step. It knows no model: it reads each request's block tables (`kv.SeqKV`) and the depth
its current token runs next (`Request.next_depth`, which the runner writes), and the pool's free blocks.

Policy (as vLLM v1's, with depth costs):
- **Decode first.** Every running request decodes; the blocks its token needs this step are allocated
  exactly (a new block when its table at that depth is full -- a pool block at depth 1, a deep block of
  `deep_block_size` slots deeper; a deeper table gets its first block when the request's first token
  reaches that depth). When the pool cannot supply them, the newest running
  request is preempted: its blocks are freed, it goes back to the waiting queue in arrival order and is
  recomputed on resume (its prompt plus what it generated is prefilled again; its sampling generator is
  kept, so it draws exactly what it would have drawn alone). No admission in a step that preempted.
- **Admission** in arrival order (FIFO: nothing overtakes the oldest waiting request, so none waits
  forever): a request is admitted when its depth-1 blocks (less prefix-cache hits) plus a reserve for
  its expected deeper-depth entries are free. Deeper entries count in deep blocks, turned into pool
  blocks exactly as the allocator takes them (`BlockPool.blocks_needed`: deep blocks free in split pool
  blocks first, then whole pool blocks split). The reserve per depth d >= 2 is share_d x tokens, where
  share_d is `EngineConfig.deep_reserve` or, by default, the running share of tokens that reached depth
  d (learnt from every token the engine ran; 0.1 before any). A request whose prefill ran out of blocks
  anyway is next admitted alone with the worst case reserved (every token at every depth up to its cap);
  when nothing else runs it is admitted with whatever is free, and fails with a clear error only if it
  cannot fit the whole pool.

    python -m pytest -x -q tests/test_engine_v2.py     # tested with a fake runner (no model)
"""

from __future__ import annotations

import bisect
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..sampling import RequestError, SamplingParams
from .kv import BlockPool, SeqKV, chain_hashes
from .outputs import RequestStats

PRIOR_SHARE = 0.1  # the deeper-depth share assumed before the engine has run any token


@dataclass
class Request:
    """One request as the engine tracks it (scheduler, runner and output processor share it)."""

    rid: str
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    generator: torch.Generator
    stats: RequestStats
    kv: SeqKV
    cap: int = 1
    """The deepest depth its tokens may run."""
    seq: int = 0
    """Arrival order (age): the waiting queue is kept sorted by it."""
    output: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_ids: frozenset[int] = frozenset()
    error: BaseException | None = None
    next_depth: int = 1
    """The depth its current token runs at the next decode step (> 1: mid-token; the runner writes it)."""
    slot: int = -1
    """The runner's per-request state slot (TaH2 mixture) while running."""
    preemptions: int = 0
    worst_case: bool = False
    """Its prefill ran out of blocks: admit it next with the worst case reserved."""
    prompt_logprobs: list | None = None
    """Its prompt scored (SamplingParams.prompt_logprobs), once, before its first prefill."""
    threshold: float = 0.9
    """Its decider threshold, fixed at admission (its own, or the engine's then): a threshold changed
    while it runs (Serve's reconfigure) applies to later requests, so one request's tokens, and the
    prefix-cache entries its prefill registers under that threshold's hash, all come from one threshold."""

    @property
    def tokens(self) -> list[int]:
        """What a (re)prefill feeds: the prompt, plus what it generated if it was preempted."""
        return self.prompt + self.output


@dataclass
class StepPlan:
    """What one step does."""

    decode: list[Request] = field(default_factory=list)
    """Rows decoding, each at its `next_depth` (in this order)."""
    decode_depths: list[int] = field(default_factory=list)
    prefill: list[Request] = field(default_factory=list)
    """Admitted requests to prefill (prompt, or prompt + output on resume), from `cached[rid]` tokens on."""
    cached: dict[str, int] = field(default_factory=dict)
    """Prefix-cache hits: tokens of each admitted request whose depth-1 K/V (and deeper entries) exist."""
    allocated: dict[str, list[int]] = field(default_factory=dict)
    """Depth-1 (pool) blocks allocated this step per request (decode growth and admitted prompts)."""
    allocated_deep: dict[str, list[int]] = field(default_factory=dict)
    """Deep blocks allocated this step per request by decode growth (prefills allocate theirs as they write)."""
    freed: list[int] = field(default_factory=list)
    """Blocks released this step by preemption (depth-1 blocks, then deep blocks, per request)."""
    preempted: list[Request] = field(default_factory=list)
    failed: list[tuple[Request, BaseException]] = field(default_factory=list)
    """Requests that cannot fit the pool at all (a clear error, not a hang)."""


class Scheduler:
    """Waiting queue (by age), running list (by admission; the last is the newest), and the pool."""

    def __init__(self, pool: BlockPool, max_num_seqs: int, max_prefill_tokens: int,
                 deep_reserve: float | None = None, prefix_caching: bool = True,
                 prompt_only_hits: bool = False) -> None:
        self.pool, self.max_num_seqs, self.max_prefill_tokens = pool, max_num_seqs, max_prefill_tokens
        self.deep_reserve, self.prefix_caching = deep_reserve, prefix_caching
        self.prompt_only_hits = prompt_only_hits
        """Look the cache up over a request's prompt only (not a resumed request's generated tokens)."""
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.depth_tokens: Counter = Counter()  # tokens run by depth (learns the deeper share)
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queue
    def add(self, r: Request) -> None:
        """Into the waiting queue at its age (a preempted request goes back before younger ones)."""
        keys = [w.seq for w in self.waiting]
        self.waiting.insert(bisect.bisect(keys, r.seq), r)

    def share(self, d: int) -> float:
        """Expected share of tokens that run depth d (>= 2)."""
        if self.deep_reserve is not None:
            return self.deep_reserve
        total = self.depth_tokens.get(1, 0)
        if total == 0:
            return PRIOR_SHARE
        return self.depth_tokens.get(d, 0) / total  # depth_tokens[d]: tokens that reached depth d

    def reserve_blocks(self, r: Request, n_tokens: int) -> int:
        """Deep blocks to reserve for a request's deeper entries over n_tokens tokens."""
        dbs = self.pool.deep_block_size
        if r.worst_case:
            return (r.cap - 1) * math.ceil(n_tokens / dbs)
        return sum(math.ceil(self.share(d) * n_tokens / dbs) for d in range(2, r.cap + 1))

    def prefix_seed(self, r: Request, policy: str, threshold: float) -> str:
        """What the cached entries depend on besides the tokens: policy, cap, threshold (decider); a
        prompt run at depth 1 (prompt_only_hits) depends on neither cap nor threshold."""
        if self.prompt_only_hits:
            return f"{policy}|1|"
        return f"{policy}|{r.cap}|{threshold if policy == 'decider' and r.cap > 1 else ''}"

    # ------------------------------------------------------------------ blocks
    def release(self, r: Request) -> list[int]:
        """Free a request's blocks (finished, failed or preempted)."""
        blocks = r.kv.blocks()
        self.pool.free(r.kv.tables[0])
        self.pool.free_deep(r.kv.deep_blocks())
        r.kv.reset()
        return blocks

    def finish(self, r: Request) -> None:
        if r in self.running:
            self.running.remove(r)
        self.release(r)

    def _preempt(self, r: Request, plan: StepPlan) -> None:
        self.running.remove(r)
        plan.freed += self.release(r)
        r.next_depth, r.preemptions = 1, r.preemptions + 1
        self.num_preemptions += 1
        plan.preempted.append(r)
        self.add(r)

    def _decode_need(self, r: Request) -> tuple[int, int]:
        """(depth-1 blocks, deep blocks) its next token needs: one when its table at that depth is full."""
        d0 = r.next_depth - 1
        full = int(r.kv.lengths[d0] >= len(r.kv.tables[d0]) * self.pool.unit(d0))
        return (full, 0) if d0 == 0 else (0, full)

    def _decode_fits(self) -> bool:
        needs = [self._decode_need(r) for r in self.running]
        return self.pool.fits(sum(n for n, _ in needs), sum(n for _, n in needs))

    # ------------------------------------------------------------------ the plan
    def schedule(self, seed_of) -> StepPlan:
        """This step's plan. seed_of(request) -> its prefix-cache hash seed."""
        plan = StepPlan()
        while self.running and not self._decode_fits():
            if len(self.running) == 1:  # alone and still out of blocks: it cannot fit this pool
                r = self.running.pop()
                plan.freed += self.release(r)
                plan.failed.append((r, RequestError(  # the request's size, not a fault: the client's 400
                    f"request {r.rid} needs more KV blocks than the pool holds ({self.pool.num_blocks} blocks "
                    f"of {self.pool.block_size} tokens)")))
                break
            self._preempt(self.running[-1], plan)
        for r in self.running:
            n, n_deep = self._decode_need(r)
            if n:
                b = self.pool.allocate(1)
                r.kv.tables[0] += b
                plan.allocated.setdefault(r.rid, []).extend(b)
            elif n_deep:
                b = self.pool.allocate_deep(1)
                r.kv.tables[r.next_depth - 1] += b
                plan.allocated_deep.setdefault(r.rid, []).extend(b)
            plan.decode.append(r)
            plan.decode_depths.append(r.next_depth)
        if not plan.preempted:
            self._admit(plan, seed_of)
        return plan

    def _admit(self, plan: StepPlan, seed_of) -> None:
        budget, bs, dbs, pool = self.max_prefill_tokens, self.pool.block_size, self.pool.deep_block_size, self.pool
        reserved = 0  # deep blocks reserved by this step's admissions
        while self.waiting and len(self.running) < self.max_num_seqs:
            r = self.waiting[0]
            if r.worst_case and plan.prefill:
                break  # a request that ran out of blocks before prefills alone
            toks = r.tokens
            n = len(toks)
            if plan.prefill and n > budget:
                break
            hashes, hits = [], []
            if self.prefix_caching:  # the last token is always run
                upto = min(n - 1, len(r.prompt)) if self.prompt_only_hits else n - 1
                hashes = chain_hashes(toks, bs, upto // bs, seed_of(r))
                hits = self.pool.lookup(hashes)
            deep_entries = self._payload_entries(hashes[:len(hits)], r.cap)
            hit_free = sum(1 for b in hits if pool.ref[b] == 0)  # counted in num_free until taken
            need = math.ceil(n / bs) - len(hits) + hit_free  # depth-1 pool blocks
            need_deep = sum(math.ceil(e / dbs) for e in deep_entries.values())  # the hits' deeper entries
            reserve = self.reserve_blocks(r, n)
            alone = not self.running and not plan.prefill
            if not pool.fits(need, need_deep + reserved + reserve) and not (alone and pool.fits(need, need_deep)):
                whole = need - hit_free + math.ceil(need_deep / pool.split)
                if alone and whole > pool.num_blocks:
                    self.waiting.pop(0)
                    plan.failed.append((r, RequestError(
                        f"request {r.rid} needs {whole} KV blocks of {bs} tokens for {n} tokens; the pool holds "
                        f"{pool.num_blocks}")))
                    continue
                break  # the oldest waits for blocks; nothing younger overtakes it
            self.waiting.pop(0)
            self.pool.take(hits)
            r.kv.tables[0] = list(hits)
            r.kv.lengths[0] = len(hits) * bs
            r.kv.shared = len(hits)
            if hits:
                self.pool.restore(r.kv, [self.pool.payload[h] for h in hashes[:len(hits)]])
            fresh = self.pool.allocate(math.ceil(n / bs) - len(hits))
            r.kv.tables[0] += fresh
            plan.allocated.setdefault(r.rid, []).extend(fresh)
            reserved += reserve
            budget -= n - len(hits) * bs
            plan.cached[r.rid] = len(hits) * bs
            self.pool.prefix_queries += n if self.prefix_caching else 0
            self.pool.prefix_hits += len(hits) * bs
            self.running.append(r)
            plan.prefill.append(r)
            if r.worst_case:
                break

    def _payload_entries(self, hashes: list[bytes], cap: int) -> dict[int, int]:
        """Deeper entries per depth that the hit blocks' payloads carry."""
        out: Counter = Counter()
        for h in hashes:
            for d, pos in self.pool.payload[h].pos.items():
                out[d] += pos.numel()
        return dict(out)

    def requeue(self, reqs: list[Request]) -> None:
        """Prefilled requests whose prefill ran out of blocks: back to the queue, worst case reserved."""
        for r in reqs:
            if r in self.running:
                self.running.remove(r)
            self.release(r)
            r.worst_case = True
            self.add(r)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def oldest_wait(self) -> float:
        return time.perf_counter() - self.waiting[0].stats.arrival if self.waiting else 0.0
