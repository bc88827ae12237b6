"""The serving engine against independent references: the reference generate(), the parallel forward,
HF generate, and each request run alone."""

from __future__ import annotations

import pytest
import torch

from tah.engine import Engine, EngineConfig, RequestError, SamplingParams

from .test_model import make

GREEDY = SamplingParams(max_tokens=10, temperature=0.0)


def _prompts(n: int, seed: int = 0, lo: int = 2, hi: int = 12) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _model_with_mixed_depths(max_depth: int = 2):
    """A random TaH model and a threshold at the median decider probability: both depths occur."""
    model, _ = make(max_depth=max_depth)
    ids = torch.tensor(_prompts(1, seed=42, lo=20, hi=21))
    with torch.no_grad():
        probs = torch.sigmoid(model(ids, depths=torch.full_like(ids, 2)).decider_logits[..., 0])
    return model, float(probs.median())


def test_greedy_batch1_equals_reference_generate():
    model, thr = _model_with_mixed_depths()
    eng = Engine(model, EngineConfig(max_num_seqs=4, max_model_len=64, threshold=thr, chunk=8))
    iterated = 0
    for p in _prompts(3, seed=1):
        got = eng.generate([p], GREEDY)[0]
        ref = model.generate(torch.tensor([p]), max_new_tokens=10, threshold=thr)
        assert got.token_ids == ref.sequences[0, len(p):].tolist()
        # The depth that produced generated token s+1 is the depth its predecessor ran when fed back.
        assert got.depths[1:] == ref.depths[0, :9].tolist()
        iterated += got.stats.iterated_tokens
    assert iterated > 0


@pytest.mark.parametrize("policy", ["decider", "always_think"])
def test_greedy_equals_argmax_of_full_forward(policy):
    """Each generated token is the argmax of one parallel forward over the final text, which also
    makes the same depth decisions (decider) or runs the same forced depths."""
    model, thr = _model_with_mixed_depths()
    eng = Engine(model, EngineConfig(max_num_seqs=4, max_model_len=64, threshold=thr, depth_policy=policy))
    prompts = _prompts(3, seed=2)
    outs = eng.generate(prompts, SamplingParams(max_tokens=9, temperature=0.0, logprobs=0))
    for p, o in zip(prompts, outs):
        seq = torch.tensor([p + o.token_ids])
        depths = None if policy == "decider" else torch.full_like(seq, 2)
        with torch.no_grad():
            full = model(seq, depths=depths, threshold=thr)
        n = len(p)
        assert full.logits[0, n - 1:-1].argmax(-1).tolist() == o.token_ids
        assert full.depths[0, n - 1:-1].tolist() == o.depths
        ref_lp = torch.log_softmax(full.logits[0, n - 1:-1], -1).gather(1, seq[0, n:, None])[:, 0]
        assert torch.allclose(torch.tensor(o.logprobs), ref_lp, atol=1e-4)


def test_standard_policy_equals_hf_generate():
    model, ref = make(max_depth=2)
    eng = Engine(model, EngineConfig(max_num_seqs=2, max_model_len=64, depth_policy="standard"))
    for p in _prompts(2, seed=3):
        got = eng.generate([p], SamplingParams(max_tokens=8, temperature=0.0))[0]
        hf = ref.generate(input_ids=torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                          pad_token_id=0, min_new_tokens=8)
        assert got.token_ids == hf[0, len(p):].tolist()
        assert got.stats.depth_counts == {1: 8}


@pytest.mark.parametrize("sampled", [False, True])
def test_continuous_batching_equals_each_request_alone(sampled):
    """Staggered arrivals, more requests than slots (some wait), different lengths (rows finish and
    slots are compacted mid-run): every request gets exactly the tokens it gets alone."""
    model, thr = _model_with_mixed_depths()
    cfg = EngineConfig(max_num_seqs=4, max_model_len=48, threshold=thr, chunk=8, max_prefill_tokens=24)
    prompts = _prompts(9, seed=4)
    params = [SamplingParams(max_tokens=4 + 2 * i, temperature=0.8 if sampled else 0.0, top_k=50, top_p=0.9,
                             seed=100 + i) for i in range(9)]
    # Step 1: two requests join two running ones in one prefill; later ones wait for free slots.
    together = Engine(model, cfg).generate(prompts, params, arrivals=[0, 0, 1, 1, 1, 2, 2, 5, 9])
    alone = Engine(model, cfg)
    depth2 = 0
    for p, sp, t in zip(prompts, params, together):
        a = alone.generate([p], sp)[0]
        assert t.token_ids == a.token_ids and t.depths == a.depths
        assert len(t.token_ids) == sp.max_tokens and t.finish_reason == "length"
        depth2 += t.stats.iterated_tokens
    assert depth2 > 0


def test_per_request_threshold():
    """Threshold 1 never iterates (= Standard), threshold 0 always does (= AlwaysThink); one batch."""
    model, _ = _model_with_mixed_depths()
    cfg = dict(max_num_seqs=4, max_model_len=48)
    p = _prompts(2, seed=5)
    both = Engine(model, EngineConfig(**cfg)).generate(
        p, [SamplingParams(max_tokens=8, temperature=0, threshold=1.0),
            SamplingParams(max_tokens=8, temperature=0, threshold=0.0)])
    std = Engine(model, EngineConfig(**cfg, depth_policy="standard")).generate([p[0]], GREEDY)[0]
    always = Engine(model, EngineConfig(**cfg, depth_policy="always_think")).generate([p[1]], GREEDY)[0]
    assert both[0].token_ids == std.token_ids[:8] and set(both[0].depths) == {1}
    assert both[1].token_ids == always.token_ids[:8] and set(both[1].depths) == {2}


def test_stops_aborts_and_limits():
    model, _ = make(max_depth=2)
    eng = Engine(model, EngineConfig(max_num_seqs=2, max_model_len=32), eos_token_ids=[])
    p = _prompts(1, seed=6)[0]
    free = eng.generate([p], GREEDY)[0].token_ids
    stop_at = free[3]
    first = free.index(stop_at)
    out = eng.generate([p], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_at]))[0]
    assert out.token_ids == free[:first + 1] and out.finish_reason == "stop"
    eos_eng = Engine(model, EngineConfig(max_num_seqs=2, max_model_len=32), eos_token_ids=[stop_at])
    assert eos_eng.generate([p], GREEDY)[0].token_ids == free[:first + 1]
    assert eos_eng.generate([p], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0].token_ids == free
    # Abort: the running row is freed and the waiting request takes its slot.
    rid = eng.add_request(p, SamplingParams(max_tokens=20, temperature=0))
    eng.step()
    eng.abort(rid)
    events = eng.step()
    assert any(e.request_id == rid and e.finish_reason == "abort" for e in events)
    assert eng.num_running == 0 and eng.cache.active == 0
    # Context window: a clear message, nothing queued.
    with pytest.raises(RequestError, match="maximum context length is 32 tokens"):
        eng.add_request(list(range(3, 30)), SamplingParams(max_tokens=10))
    with pytest.raises(RequestError, match="maximum context length"):
        eng.add_request(list(range(3, 40)))
    with pytest.raises(RequestError, match="max_tokens"):
        eng.add_request(p, SamplingParams(max_tokens=0))
    assert not eng.has_work()
    # Without max_tokens a request runs to the end of the window.
    out = eng.generate([p], SamplingParams(temperature=0))[0]
    assert len(p) + len(out.token_ids) == 32 and out.finish_reason == "length"


def test_kv_memory_is_reserved_once():
    model, thr = _model_with_mixed_depths()
    eng = Engine(model, EngineConfig(max_num_seqs=3, max_model_len=40, threshold=thr, chunk=8))
    before = eng.cache.nbytes()
    eng.generate(_prompts(6, seed=7), SamplingParams(max_tokens=20, temperature=0), arrivals=[0, 1, 2, 3, 4, 5])
    assert eng.cache.nbytes() == before and eng.cache.grow_events == 0
