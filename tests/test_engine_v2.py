"""Engine v2 (tah/engine/): paged KV, preemption, admission, prefix caching, and the scheduler and output
processor with a fake runner (no model).

Exactness references are each request run alone in an engine with room for everything, and a prefix-cache
miss (caching off); accounting is checked after every test (no block left held).

    PYTHONPATH=. .venv/bin/python -m pytest -x -q tests/test_engine_v2.py
"""

from __future__ import annotations

import math

import pytest
import torch

from tah.engine import (BlockPool, Engine, EngineConfig, OutputProcessor, Request, RequestError, RequestStats,
                        SamplingParams, Scheduler, SeqKV, TokenEvent)
from tah.engine.kv import DeepPayload, NoFreeBlocks, windows

from .helpers import make
from .test_engine import _model_with_mixed_depths, _prompts
from .test_engine_tah2 import make_tah2, median_threshold


def _alone(model, cfg: EngineConfig, p: list[int], sp: SamplingParams):
    big = EngineConfig(**{**cfg.__dict__, "num_kv_blocks": None, "enable_prefix_caching": False})
    return Engine(model, big).generate([p], sp)[0]


@pytest.mark.parametrize("sampled", [False, True])
def test_too_small_pool_preempts_and_every_request_gets_its_alone_tokens(sampled):
    """A pool of 12 blocks of 4 tokens (48 slots) for 5 requests of up to ~30 tokens each: admission
    waits, decode runs out, the newest is preempted and recomputed; every request still gets exactly
    its tokens alone (greedy, and seeded sampling: its generator is carried over)."""
    model, thr = _model_with_mixed_depths()
    cfg = EngineConfig(max_num_seqs=4, max_model_len=48, threshold=thr, block_size=4, num_kv_blocks=12,
                       enable_prefix_caching=False)
    prompts = _prompts(5, seed=11, lo=6, hi=12)
    params = [SamplingParams(max_tokens=14, temperature=0.9 if sampled else 0.0, top_k=40, seed=7 + i)
              for i in range(5)]
    eng = Engine(model, cfg)
    outs = eng.generate(prompts, params)
    assert eng.scheduler.num_preemptions > 0 and sum(o.stats.preemptions for o in outs) > 0
    for p, sp, o in zip(prompts, params, outs):
        a = _alone(model, cfg, p, sp)
        assert o.token_ids == a.token_ids and o.depths == a.depths and o.finish_reason == "length"
    assert eng.pool.num_used == 0 and not eng.has_work()
    assert sum(o.stats.iterated_tokens for o in outs) > 0


@pytest.mark.parametrize("deep_block_size", [4, 1])
def test_tah2_preempted_mid_token_equals_alone(deep_block_size):
    """TaH2 (M = 3): rows are preempted while mid-token (their mixture is dropped and recomputed); deep
    blocks as large as the pool's (4) and of 1 token (pool blocks split 4 ways)."""
    model = make_tah2(3)
    thr = median_threshold(model)
    # 20 blocks of 4: each request fits alone even with every token at depth 3 (<= 19 x 3 entries).
    cfg = EngineConfig(max_num_seqs=4, max_model_len=40, threshold=thr, block_size=4, num_kv_blocks=20,
                       enable_prefix_caching=False, deep_block_size=deep_block_size)
    prompts = _prompts(4, seed=12, lo=5, hi=10)
    params = [SamplingParams(max_tokens=10, temperature=0.8, seed=3 + i) for i in range(4)]
    eng = Engine(model, cfg)
    outs = eng.generate(prompts, params)
    assert eng.scheduler.num_preemptions > 0
    for p, sp, o in zip(prompts, params, outs):
        a = _alone(model, cfg, p, sp)
        assert o.token_ids == a.token_ids and o.depths == a.depths and o.finish_reason == "length"
    assert eng.pool.num_used == 0 and 3 in {d for o in outs for d in o.depths}


def test_hostile_sizes_get_a_clear_error_not_a_hang():
    model, _ = make(max_depth=2)
    eng = Engine(model, EngineConfig(max_num_seqs=2, max_model_len=64, block_size=4, num_kv_blocks=3,
                                     depth_policy="always_think"))
    with pytest.raises(RequestError, match="does not fit this server's KV cache"):
        eng.add_request(list(range(3, 20)), SamplingParams(max_tokens=2))
    # Fits at admission (8 tokens = 2 blocks), but every token also runs depth 2: alone it outgrows
    # the pool and ends with an error instead of waiting forever.
    rid = eng.add_request(list(range(3, 11)), SamplingParams(max_tokens=20, temperature=0))
    last = None
    for _ in range(100):
        for ev in eng.step():
            last = ev
        if not eng.has_work():
            break
    assert not eng.has_work() and last.request_id == rid and last.finish_reason == "error"
    assert isinstance(last.error, RequestError)  # the request's size: the client's 400, not a 500
    assert "KV blocks" in str(last.error) and eng.pool.num_used == 0


@pytest.mark.parametrize("tah2", [False, True])
def test_prefix_cache_hit_equals_miss(tah2):
    """Requests sharing a 24-token prefix (3 blocks of 8): the later ones hit the cache (their depth-1
    K/V and the deeper entries the decider wrote are reused) and get the tokens a miss gets."""
    if tah2:
        model = make_tah2(2)
        thr = median_threshold(model)
    else:
        model, thr = _model_with_mixed_depths()
    cfg = EngineConfig(max_num_seqs=4, max_model_len=64, threshold=thr, block_size=8)
    prefix = _prompts(1, seed=13, lo=24, hi=25)[0]
    prompts = [prefix + s for s in _prompts(3, seed=14, lo=2, hi=6)]
    params = [SamplingParams(max_tokens=8, temperature=0.0), SamplingParams(max_tokens=8, temperature=0.7, seed=5),
              SamplingParams(max_tokens=8, temperature=0.0, logprobs=0)]
    eng = Engine(model, cfg)
    first = eng.generate(prompts[:1], params[:1])[0]
    payload = eng.pool.payload_bytes()
    hit = eng.generate(prompts[1:], params[1:], arrivals=[0, 1])
    assert eng.pool.prefix_hits == 2 * 24 and all(o.stats.cached_tokens == 24 for o in hit)
    miss = Engine(model, EngineConfig(**{**cfg.__dict__, "enable_prefix_caching": False}))
    for p, sp, o in zip(prompts, params, [first, *hit]):
        m = miss.generate([p], sp)[0]
        assert o.token_ids == m.token_ids and o.depths == m.depths
        assert o.stats.prompt_depth_counts == m.stats.prompt_depth_counts
    assert torch.allclose(torch.tensor(hit[1].logprobs), torch.tensor(miss.generate([prompts[2]], params[2])[0].logprobs),
                          atol=1e-5)
    assert payload > 0  # the prefix's iterated tokens were cached with it
    assert eng.pool.num_used == 0 and miss.pool.num_used == 0



def test_threshold_changed_mid_prefill_applies_to_later_requests_only():
    """Serve's reconfigure sets engine.threshold from another thread while a step runs. A request keeps
    the threshold it was admitted with (its prefill, its decode, the prefix-cache hash its prompt blocks
    are registered under), so a later request at the new threshold never attends deeper entries the
    old one wrote. Before, the blocks were registered under the new threshold's hash."""
    model, thr = _model_with_mixed_depths()
    cfg = EngineConfig(max_num_seqs=4, max_model_len=64, threshold=thr, block_size=8)
    prefix = _prompts(1, seed=13, lo=24, hi=25)[0]
    a, b = (prefix + s for s in _prompts(2, seed=14, lo=2, hi=6))
    sp = SamplingParams(max_tokens=8, temperature=0.0)
    eng = Engine(model, cfg)
    prefill = eng.runner.prefill

    def then_reconfigure(*args, **kwargs):
        out = prefill(*args, **kwargs)
        eng.threshold = 1.0  # nothing goes deeper from here on
        return out

    eng.runner.prefill = then_reconfigure
    got_a = eng.generate([a], sp)[0]
    eng.runner.prefill = prefill
    got_b = eng.generate([b], sp)[0]
    want_a = _alone(model, cfg, a, sp)
    want_b = _alone(model, EngineConfig(**{**cfg.__dict__, "threshold": 1.0}), b, sp)
    assert 2 in want_a.depths or want_a.stats.prompt_depth_counts.get(2)  # the two thresholds differ here
    for got, want in ((got_a, want_a), (got_b, want_b)):
        assert got.token_ids == want.token_ids and got.depths == want.depths
        assert got.stats.prompt_depth_counts == want.stats.prompt_depth_counts
    assert eng.pool.num_used == 0


def test_a_failure_caching_prompt_blocks_fails_no_request():
    """Registering prompt blocks in the prefix cache copies their deeper entries (memory can run out);
    a failure there leaves those blocks uncached and every request runs on with its own tokens."""
    model, thr = _model_with_mixed_depths()
    cfg = EngineConfig(max_num_seqs=4, max_model_len=64, threshold=thr, block_size=8)
    prompts = [p + q for p, q in zip(_prompts(2, seed=13, lo=17, hi=25), _prompts(2, seed=14, lo=2, hi=6))]
    sp = SamplingParams(max_tokens=8, temperature=0.0)
    eng = Engine(model, cfg)

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory (injected)")

    eng.pool.snapshot = fail
    outs = eng.generate(prompts, sp, arrivals=[0, 2])
    for p, o in zip(prompts, outs):
        assert o.finish_reason == "length" and o.token_ids == _alone(model, cfg, p, sp).token_ids
    assert eng.pool.payload_bytes() == 0  # nothing was registered
    assert eng.pool.num_used == 0

# ---------------------------------------------------------------------- fake runner: no model
def _req(rid: str, n: int, seq: int, cap: int = 2, max_tokens: int = 8) -> Request:
    return Request(rid, list(range(3, 3 + n)), SamplingParams(max_tokens=max_tokens, temperature=0.0), max_tokens,
                   torch.Generator(),
                   RequestStats(prompt_tokens=n), SeqKV(2), cap=cap, seq=seq)


class FakeRunner:
    """Writes what a runner would into the block tables: prefill n tokens at depth 1, decode one token
    at each row's depth, and sends every third decoded token to depth 2."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool, self.t = pool, 0

    def prefill(self, reqs: list[Request]) -> None:
        for r in reqs:
            r.kv.lengths[0] = len(r.tokens)
            r.output.append(1)

    def decode(self, reqs: list[Request]) -> None:
        for r in reqs:
            d0 = r.next_depth - 1
            assert r.kv.lengths[d0] < len(r.kv.tables[d0]) * self.pool.block_size  # the plan allocated it
            r.kv.lengths[d0] += 1
            self.t += 1
            if r.next_depth == 1 and self.t % 3 == 0:
                r.next_depth = 2
            else:
                r.next_depth = 1
                r.output.append(1)


def test_scheduler_plans_with_a_fake_runner():
    pool = BlockPool(10, 4, 1, 1, 2, torch.float32, "cpu")
    s = Scheduler(pool, max_num_seqs=3, max_prefill_tokens=64, deep_reserve=0.0, prefix_caching=False)
    run = FakeRunner(pool)
    reqs = [_req(f"r{i}", n, i) for i, n in enumerate((7, 5, 9, 3))]
    for r in reqs:
        s.add(r)
    plan = s.schedule(lambda r: "")
    # FIFO within blocks: r0 (2 blocks), r1 (2), r2 (3) -> 7 of 10; r3 would fit but max_num_seqs = 3.
    assert [r.rid for r in plan.prefill] == ["r0", "r1", "r2"] and not plan.decode
    assert {k: len(v) for k, v in plan.allocated.items()} == {"r0": 2, "r1": 2, "r2": 3}
    assert pool.num_used == 7
    run.prefill(plan.prefill)
    seen_preempt = []
    for _ in range(40):
        plan = s.schedule(lambda r: "")
        seen_preempt += [r.rid for r in plan.preempted]
        for r in plan.preempted:  # the newest running goes first, blocks freed, back in age order
            assert r.kv.blocks() == [] and r in s.waiting
        assert [w.seq for w in s.waiting] == sorted(w.seq for w in s.waiting)
        assert pool.num_used == sum(len(r.kv.blocks()) for r in s.running)
        run.decode(plan.decode)
        run.prefill(plan.prefill)
        for r in list(s.running):
            if len(r.output) >= r.max_tokens:
                s.finish(r)
        if not s.has_work():
            break
    assert not s.has_work() and pool.num_used == 0 and seen_preempt and s.num_preemptions == len(seen_preempt)
    assert seen_preempt[0] == "r2"


def test_scheduler_admission_reserves_deeper_blocks_and_refuses_what_cannot_fit():
    pool = BlockPool(6, 4, 1, 1, 2, torch.float32, "cpu")
    s = Scheduler(pool, max_num_seqs=4, max_prefill_tokens=64, deep_reserve=0.5, prefix_caching=False)
    a, b = _req("a", 8, 0), _req("b", 8, 1)
    s.add(a)
    s.add(b)
    plan = s.schedule(lambda r: "")
    # a: 2 depth-1 blocks + ceil(0.5 * 8 / 4) = 1 reserved; b would need 3 more of the 3 left after a's
    # reserve... 6 - 2 - 1 = 3 -> admitted; both hold 2 blocks, 2 stay free for the reserves.
    assert [r.rid for r in plan.prefill] == ["a", "b"] and pool.num_free == 2
    c = _req("c", 4, 2)
    s.add(c)
    plan = s.schedule(lambda r: "")  # 1 block and its own reserve of 1 are free
    assert [r.rid for r in plan.prefill] == ["c"] and pool.num_free == 1
    d = _req("d", 4, 3)
    s.add(d)
    assert not s.schedule(lambda r: "").prefill  # 1 + 1 reserved > 1 free: the oldest waits
    for r in (a, b, c):
        s.finish(r)
    assert [r.rid for r in s.schedule(lambda r: "").prefill] == ["d"]
    s.finish(d)
    s.add(_req("big", 30, 4))  # 8 blocks > 6: refused with a clear error when it is alone
    plan = s.schedule(lambda r: "")
    assert [r.rid for r, _ in plan.failed] == ["big"] and "pool holds 6" in str(plan.failed[0][1])
    assert pool.num_used == 0 and not s.has_work()
    with pytest.raises(NoFreeBlocks):
        pool.allocate(7)


def test_block_pool_prefix_cache_lru_and_refcounts():
    pool = BlockPool(4, 2, 1, 1, 2, torch.float32, "cpu")
    from tah.engine.kv import chain_hashes
    h = chain_hashes([1, 2, 3, 4], 2, 2, "s")
    assert h == chain_hashes([1, 2, 3, 4, 9], 2, 2, "s") and h[0] != chain_hashes([1, 2], 2, 1, "t")[0]
    b = pool.allocate(2)
    pool.register(b[0], h[0], DeepPayload())
    pool.register(b[1], h[1], DeepPayload())
    pool.free(b)
    assert pool.num_free == 4 and pool.lookup(h) == b
    pool.take(b[:1])
    assert pool.num_free == 3 and pool.ref[b[0]] == 1
    got = pool.allocate(3)  # two plain free blocks, then the LRU cached one (b[1]) is evicted
    assert b[1] in got and pool.lookup(h) == b[:1]
    pool.free(got)
    pool.free(b[:1])
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free(b[:1])
    assert pool.num_used == 0



@pytest.mark.parametrize("prompt_only", [False, True])
def test_prefix_lookup_stops_at_the_prompt_when_prompts_run_at_depth_1(prompt_only):
    """Under prompt_depth="depth1" a cached block ran its tokens as a prompt (depth 1), but a resumed
    request's generated tokens ran the decider: its lookup covers its prompt only."""
    from tah.engine.kv import chain_hashes

    pool = BlockPool(8, 4, 1, 1, 2, torch.float32, "cpu")
    s = Scheduler(pool, max_num_seqs=2, max_prefill_tokens=64, deep_reserve=0.0, prompt_only_hits=prompt_only)
    r = _req("r", 8, 0)
    r.output = [50, 51, 52, 53, 54]  # resumed after preemption: 13 tokens to feed again
    cached = pool.allocate(3)  # another request's prompt == r's prompt + its first 4 generated tokens
    for b, h in zip(cached, chain_hashes(r.tokens, 4, 3, "seed")):
        pool.register(b, h, DeepPayload())
    pool.free(cached)
    s.add(r)
    plan = s.schedule(lambda r: "seed")
    assert plan.prefill == [r] and r.kv.shared == (2 if prompt_only else 3)
    s.finish(r)
    assert pool.num_used == 0

def test_output_processor_stops_lengths_and_logprobs():
    failed = []
    proc = OutputProcessor({2}, max_model_len=12, fail=lambda rs, e, ev: failed.extend(rs))
    r_eos, r_stop, r_len = _req("e", 3, 0), _req("s", 3, 1), _req("l", 3, 2, max_tokens=1)
    r_stop.stop_ids = frozenset({5})
    r_len.params = SamplingParams(max_tokens=1, logprobs=2, temperature=0.0)
    logits = torch.full((3, 8), -5.0)
    logits[0, 2] = logits[1, 5] = logits[2, 6] = 5.0
    logits[2, 1] = 4.0
    events: list[TokenEvent] = []
    proc.process(logits, [1, 2, 1], [r_eos, r_stop, r_len], events)
    assert [(e.token_id, e.finish_reason, e.depth) for e in events] == [(2, "stop", 1), (5, "stop", 2), (6, "length", 1)]
    want = logits[2] - torch.logsumexp(logits[2], 0)
    assert math.isclose(events[2].logprob, float(want[6]), rel_tol=1e-6)
    assert [t for t, _ in events[2].top_logprobs] == [6, 1] and not failed
    assert r_stop.stats.depth_counts == {2: 1} and r_len.stats.generated_tokens == 1


# ---------------------------------------------------------------------- deep blocks (deep_block_size)
@pytest.mark.parametrize("dbs", [1, 4, 16])
@pytest.mark.parametrize("tah2", [False, True])
def test_deep_blocks_hold_exactly_the_tokens_that_ran_each_depth(tah2, dbs):
    """Pool blocks of 16, deep blocks of 1, 4 and 16 tokens, four requests (two join later): greedy
    tokens and depths equal the reference generate; after every step each running request between
    tokens holds at depth d exactly the positions of the tokens that ran depth d (by the reference's
    depths) in ceil(n / dbs) deep blocks; the pool's counts of both kinds equal what the tables hold;
    nothing is held at the end."""
    if tah2:
        model = make_tah2(4)
        thr = median_threshold(model)
    else:
        model, thr = _model_with_mixed_depths()
    M, n_new, bs = model.config.max_depth, 12, 16
    ps = _prompts(4, seed=21, lo=5, hi=30)
    refs = [model.generate(torch.tensor([p]), max_new_tokens=n_new, threshold=thr) for p in ps]
    eng = Engine(model, EngineConfig(max_num_seqs=4, max_model_len=64, threshold=thr, block_size=bs,
                                     deep_block_size=dbs, enable_prefix_caching=False))
    pool, k = eng.pool, bs // dbs
    sp = SamplingParams(max_tokens=n_new, temperature=0.0)
    reqs, deepest = {}, 0
    for step in range(200):
        for i in {0: [0, 1], 3: [2, 3]}.get(step, []):
            eng.add_request(ps[i], sp, request_id=str(i))
            reqs[i] = eng.waiting[-1]
        eng.step()
        for r in eng.running:
            ref = refs[int(r.rid)]
            fed = ref.prompt_depths[0].tolist() + ref.depths[0].tolist()[:len(r.output) - 1]  # depth each fed token ran
            if r.next_depth == 1:  # between tokens: every fed token has run all its depths
                assert r.kv.lengths[0] == len(fed) and len(r.kv.tables[0]) == math.ceil(len(fed) / bs)
                for d in range(2, M + 1):
                    want = [t for t, dt in enumerate(fed) if dt >= d]
                    n, table = r.kv.lengths[d - 1], r.kv.tables[d - 1]
                    assert n == len(want) and len(table) == math.ceil(n / dbs)
                    # deep block s is pool block s // k, slots (s % k) * dbs ..; entry j is in table[j // dbs]
                    got = [int(pool.pos[table[j // dbs] // k, (table[j // dbs] % k) * dbs + j % dbs]) for j in range(n)]
                    assert got == want
                    deepest = max(deepest, n)
        held_deep = sum(len(r.kv.deep_blocks()) for r in eng.running)
        assert pool.num_deep_used == held_deep == eng.stats()["kv_deep_blocks_used"]
        assert pool.num_used == sum(len(r.kv.tables[0]) for r in eng.running) + pool.num_split
        assert pool.num_deep_free == pool.num_split * k - held_deep >= 0
        if step > 3 and not eng.has_work():
            break
    for i, r in reqs.items():
        assert r.output == refs[i].sequences[0, len(ps[i]):].tolist()
        assert r.depths[1:] == refs[i].depths[0, :n_new - 1].tolist()
    assert deepest > 0
    st = eng.stats()
    assert (pool.num_used, pool.num_split, pool.num_deep_used, pool.num_deep_free) == (0, 0, 0, 0)
    assert st["kv_blocks_used"] == st["kv_deep_blocks_used"] == st["kv_blocks_split"] == 0


def test_block_pool_deep_blocks_split_return_and_address_the_same_memory():
    pool = BlockPool(4, 8, 2, 1, 2, torch.float32, "cpu", deep_block_size=2)  # 4 deep blocks per pool block
    cached = pool.allocate(1)
    pool.register(cached[0], b"h", DeepPayload())
    pool.free(cached)  # free but cached: the last to be split
    a = pool.allocate_deep(1)
    assert pool.num_used == 1 and pool.num_split == 1 and pool.num_deep_free == 3 and pool.num_deep_used == 1
    b = pool.allocate_deep(4)  # 3 from the split block, then a second one is split
    assert pool.num_used == 2 and pool.num_deep_free == 3 and len(set(a + b)) == 5
    assert pool.blocks_needed(1, 3) == 1 and pool.blocks_needed(1, 4) == 2 and pool.blocks_needed(0, 8) == 2
    assert pool.fits(2, 3) and not pool.fits(2, 4)
    d1 = pool.allocate(1)
    pool.allocate_deep(4)  # 3 free deep blocks, then the cached block is evicted and split
    assert pool.lookup([b"h"]) == [] and pool.num_free == 0 and pool.num_deep_free == 3
    with pytest.raises(NoFreeBlocks):
        pool.allocate_deep(4)
    # Both kinds address one memory: deep block s, slot j is pool block s // 4, slot (s % 4) * 2 + j.
    x = torch.randn(2, 1, 2)  # (slots, Hkv, D)
    s = b[-1]
    slots = torch.tensor([s * 2, s * 2 + 1])
    pool.write(1, slots, x, -x)  # the pool is (blocks, Hkv, slots, D)
    assert torch.equal(pool.k[1][s // 4, :, (s % 4) * 2:(s % 4) * 2 + 2], x.transpose(0, 1))
    assert torch.equal(pool.v[1][s // 4, :, (s % 4) * 2:(s % 4) * 2 + 2], -x.transpose(0, 1))
    assert torch.equal(pool.read(1, "k", slots), x) and torch.equal(pool.read(1, "v", slots), -x)
    g = pool.gather(1, torch.tensor([[[s]]]), "k", 2)  # (1, 1, 1, Hkv, 2, D)
    assert torch.equal(g[0, 0, 0], x.transpose(0, 1))
    y = torch.randn(8, 1, 2)
    pool.write(0, torch.arange(8) + d1[0] * 8, y, y)
    whole = windows(pool.gather(0, torch.tensor([[d1]]), "k", 8))  # (1, Hkv, 1, 8, D)
    pieces = windows(pool.gather(0, torch.tensor([[[d1[0] * 4 + p for p in range(4)]]]), "k", 2))
    assert torch.equal(whole, pieces) and torch.equal(whole[0, :, 0], y.transpose(0, 1))
    # A split block goes back to the pool when its last deep block is freed, not before.
    first = [x for x in a + b if x // 4 == a[0] // 4]
    pool.free_deep(first[:-1])
    assert pool.num_free == 0
    pool.free_deep(first[-1:])
    assert pool.num_free == 1 and pool.num_split == 2
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free_deep(first[-1:])
    with pytest.raises(ValueError, match="divisor"):
        BlockPool(4, 8, 1, 1, 2, torch.float32, "cpu", deep_block_size=3)
    with pytest.raises(ValueError, match="divisor"):
        EngineConfig(block_size=16, deep_block_size=6)


def test_scheduler_reserves_deep_blocks_in_deep_units():
    """Pool of 6 blocks of 4, deep blocks of 1 token (4 per pool block), reserve 0.5 of a prompt per
    deeper depth: a prompt of 8 needs 2 blocks + 4 deep blocks = 3 pool blocks."""
    pool = BlockPool(6, 4, 1, 1, 2, torch.float32, "cpu", deep_block_size=1)
    s = Scheduler(pool, max_num_seqs=4, max_prefill_tokens=64, deep_reserve=0.5, prefix_caching=False)
    a, b, c = _req("a", 8, 0), _req("b", 8, 1), _req("c", 4, 2)
    for r in (a, b, c):
        s.add(r)
    plan = s.schedule(lambda r: "")
    # a: 2 + ceil(4 / 4) = 3 <= 6; b: 2 + ceil((4 + 4) / 4) = 4 <= 4 free; c: 1 + ceil(10 / 4) = 4 > 2.
    assert [r.rid for r in plan.prefill] == ["a", "b"] and pool.num_free == 2
    a.kv.tables[1] = pool.allocate_deep(3)  # a's prefill wrote 3 deeper entries: one pool block split
    a.kv.lengths[1] = 3
    assert pool.num_free == 1 and pool.num_deep_free == 1
    for r in (a, b):
        r.kv.lengths[0] = 8
        r.output.append(1)
        r.next_depth = 2
    plan = s.schedule(lambda r: "")  # a's depth-2 token takes the split block's free deep block; b splits one
    assert {r: len(v) for r, v in plan.allocated_deep.items()} == {"a": 1, "b": 1} and not plan.allocated
    assert a.kv.tables[1][3] // 4 == a.kv.tables[1][0] // 4 != b.kv.tables[1][0] // 4
    assert pool.num_free == 0 and pool.num_deep_free == 3 and not plan.prefill and not plan.preempted
    s.finish(a)
    s.finish(b)
    assert pool.num_free == 6 and pool.num_split == 0
    plan = s.schedule(lambda r: "")
    assert [r.rid for r in plan.prefill] == ["c"]
    s.finish(c)
    assert pool.num_used == 0 and not s.has_work()


def test_block_pool_random_churn_never_hands_out_a_slot_twice():
    """Random allocate / free of both kinds: the slots held (depth-1 blocks' and deep blocks') never
    overlap, the counts match a plain tally, and every block comes back."""
    pool = BlockPool(6, 8, 1, 1, 2, torch.float32, "cpu", deep_block_size=2)
    g = torch.Generator().manual_seed(0)
    big, deep = [], []
    for _ in range(600):
        op = int(torch.randint(4, (1,), generator=g))
        n = int(torch.randint(1, 4, (1,), generator=g))
        try:
            if op == 0:
                big += pool.allocate(n)
            elif op == 1:
                deep += pool.allocate_deep(n)
        except NoFreeBlocks:
            assert not pool.fits(n if op == 0 else 0, n if op == 1 else 0)
        if op == 2 and big:
            pool.free([big.pop(int(torch.randint(len(big), (1,), generator=g)))])
        if op == 3 and deep:
            pool.free_deep([deep.pop(int(torch.randint(len(deep), (1,), generator=g)))])
        slots = [b * 8 + j for b in big for j in range(8)] + [s * 2 + j for s in deep for j in range(2)]
        assert len(slots) == len(set(slots))
        assert pool.num_used == len(big) + len({s // 4 for s in deep}) == len(big) + pool.num_split
        assert pool.num_deep_used == len(deep) and pool.num_deep_free == 4 * pool.num_split - len(deep)
    pool.free(big)
    pool.free_deep(deep)
    assert pool.num_free == 6 and pool.num_split == pool.num_deep_free == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_attention_reads_the_pool_exactly(dtype):
    """Two rows of 7 and 13 depth-1 entries in 4-slot blocks (several blocks, a partial last one), one new
    token each: the decode pass's keys read through the block tables, then attention, equal softmax
    attention over each row's own keys written out here. fp32 pools are multiplied block by block in
    place; half-precision pools read a window (one rounding of the weighted sum)."""
    from collections import Counter

    from tah.attention import _mixed_decode
    from tah.engine.kv import PagedBatch, SeqKV

    from .test_attention import _loop_decode

    g = torch.Generator().manual_seed(0)
    Hkv, H, D, lens = 2, 4, 8, [7, 13]
    pool = BlockPool(16, 4, 1, Hkv, D, dtype, "cpu")
    seqs = [SeqKV(1), SeqKV(1)]
    keys, values = [], []
    fill = PagedBatch(pool, seqs, 1, "duo_causal")
    for i, n in enumerate(lens):
        k, v = torch.randn(2, n + 1, Hkv, D, generator=g).to(dtype)
        keys.append(k), values.append(v)
        slots = fill._reserve([i], 0, [n])
        pool.write(0, slots, k[:n], v[:n])
        pool.pos.view(-1)[slots] = torch.arange(n)
    batch = PagedBatch(pool, seqs, 1, "duo_causal")
    view = batch.begin_mixed(torch.tensor([1, 1]), torch.tensor(lens), Counter(), split_deep=True)
    assert view.spec.blocked == (dtype == torch.float32)
    new_k = torch.stack([k[-1] for k in keys])[:, :, None]  # (2, Hkv, 1, D)
    new_v = torch.stack([v[-1] for v in values])[:, :, None]
    k, v = view.update(new_k, new_v, 0)
    q = torch.randn(2, H, 1, D, generator=g).to(dtype)
    got = _mixed_decode(q, k, v, view.spec, 0.3)[:, :, 0].double()  # (2, H, D)
    # every key each row has (n + 1, Hkv, D), all visible
    want = _loop_decode(q[:, :, 0], keys, values, [torch.ones(n + 1, dtype=torch.bool) for n in lens], 0.3)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert pool.num_used == 2 + 4  # ceil(8 / 4) + ceil(14 / 4) blocks held


def test_prompt_depth1_runs_the_prompt_at_depth_1_and_the_rest_by_the_decider():
    """EngineConfig.prompt_depth="depth1" (the prompt as TaH v1 trains it): each generated token is the
    argmax of one parallel forward over the final text run at forced depths -- the prompt at 1, each
    generated token at the depth the engine reports -- and the engine's depth decisions are that
    forward's decider's (`goes_deeper`). Preempted-and-resumed (a pool too small) and prefix-cache hits
    (a shared 24-token prefix) give the tokens each request gets alone; scoring matches the prefill."""
    model, thr = _model_with_mixed_depths()
    cfg = EngineConfig(max_num_seqs=4, max_model_len=64, threshold=thr, block_size=8, prompt_depth="depth1")
    prefix = _prompts(1, seed=13, lo=24, hi=25)[0]
    prompts = [prefix + s for s in _prompts(3, seed=14, lo=2, hi=6)]
    sp = SamplingParams(max_tokens=10, temperature=0.0, logprobs=0)
    eng = Engine(model, cfg)
    outs = eng.generate(prompts, sp, arrivals=[0, 1, 1])
    assert eng.pool.prefix_hits >= 24
    for p, o in zip(prompts, outs):
        n = len(p)
        assert o.stats.prompt_depth_counts == {1: n} and o.depths[0] == 1
        seq = torch.tensor([p + o.token_ids])
        depths = torch.tensor([[1] * n + o.depths[1:] + [1]])
        with torch.no_grad():
            full = model(seq, depths=depths, threshold=thr)
        assert full.logits[0, n - 1:-1].argmax(-1).tolist() == o.token_ids
        went = model.goes_deeper(full.decider_logits[0, n:-1, 0], thr).tolist()
        assert went == [d == 2 for d in o.depths[1:]]
        lp = torch.log_softmax(full.logits[0, n - 1:-1], -1).gather(1, seq[0, n:, None])[:, 0]
        assert torch.allclose(torch.tensor(o.logprobs), lp, atol=1e-4)
        alone = Engine(model, EngineConfig(**{**cfg.__dict__, "enable_prefix_caching": False})).generate([p], sp)[0]
        assert o.token_ids == alone.token_ids and o.depths == alone.depths
    assert any(2 in o.depths for o in outs)  # the decider still iterates generated tokens
    # the same model under the default (the decider on the prompt too) runs some prompt tokens deeper
    assert any(Engine(model, EngineConfig(**{**cfg.__dict__, "prompt_depth": "decider"})).generate(
        [p], sp)[0].stats.prompt_depth_counts.get(2, 0) for p in prompts)
    # a pool too small: preempted and resumed (prompt at depth 1, its generated tokens by the decider)
    small = EngineConfig(**{**cfg.__dict__, "block_size": 4, "num_kv_blocks": 16, "max_model_len": 48})
    short = _prompts(5, seed=11, lo=6, hi=12)
    eng = Engine(model, small)
    got = eng.generate(short, SamplingParams(max_tokens=14, temperature=0.0))
    assert eng.scheduler.num_preemptions > 0
    for p, o in zip(short, got):
        a = _alone(model, small, p, SamplingParams(max_tokens=14, temperature=0.0))
        assert o.token_ids == a.token_ids and o.depths == a.depths
    # scoring (echo) runs the prompt as the prefill does: its last logprob is the first token's
    scored = Engine(model, cfg).generate([prompts[0] + outs[0].token_ids[:1]],
                                         SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))[0]
    assert abs(scored.prompt_logprobs[-1][0] - outs[0].logprobs[0]) <= 1e-5
    assert eng.pool.num_used == 0
