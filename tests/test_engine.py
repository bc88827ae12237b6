"""The serving engine against independent references: the reference generate(), the parallel forward,
HF generate, and each request run alone."""

from __future__ import annotations

import pytest
import torch

from tah.engine import Engine, EngineConfig, RequestError, SamplingParams

from .helpers import make

GREEDY = SamplingParams(max_tokens=10, temperature=0.0)


def _prompts(n: int, seed: int = 0, lo: int = 2, hi: int = 12) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _model_with_mixed_depths(max_depth: int = 2, **cfg):
    """A random TaH model and a threshold at the median decider probability: both depths occur."""
    model, _ = make(max_depth=max_depth, **cfg)
    ids = torch.tensor(_prompts(1, seed=42, lo=20, hi=21))
    with torch.no_grad():
        probs = torch.sigmoid(model(ids, depths=torch.full_like(ids, 2)).decider_logits[..., 0])
    return model, float(probs.median())


@pytest.mark.parametrize("topk", [100, 16])  # 16 of 512: the CPU's grouped top-k (decider.topk_logits)
def test_greedy_batch1_equals_reference_generate(topk):
    model, thr = _model_with_mixed_depths(soft_input_topk=topk)
    eng = Engine(model, EngineConfig(max_num_seqs=4, max_model_len=64, threshold=thr, block_size=8))
    iterated = 0
    for p in _prompts(3, seed=1):
        got = eng.generate([p], GREEDY)[0]
        ref = model.generate(torch.tensor([p]), max_new_tokens=10, threshold=thr)
        assert got.token_ids == ref.sequences[0, len(p):].tolist()
        # The depth that produced generated token s+1 is the depth its predecessor ran when fed back.
        assert got.depths[1:] == ref.depths[0, :9].tolist()
        iterated += got.stats.iterated_tokens
    assert iterated > 0


@pytest.mark.parametrize("policy,topk", [("decider", 100), ("always_think", 100), ("decider", 16)])
def test_greedy_equals_argmax_of_full_forward(policy, topk):
    """Each generated token is the argmax of one parallel forward over the final text, which also
    makes the same depth decisions (decider) or runs the same forced depths. (k = 16 of 512: the
    CPU's grouped top-k, decider.topk_logits, over the decode pass's rows too.)"""
    model, thr = _model_with_mixed_depths(soft_input_topk=topk)
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
    if policy == "decider":  # rows at depth 1 and 2 in one pass: depth-1 rows read depth-1 keys only
        assert model.attention_paths["mixed_decode_split"] > 0


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
    cfg = EngineConfig(max_num_seqs=4, max_model_len=48, threshold=thr, block_size=8, max_prefill_tokens=24)
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
    assert eng.num_running == 0 and eng.pool.num_used == 0
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
    eng = Engine(model, EngineConfig(max_num_seqs=3, max_model_len=40, threshold=thr, block_size=8))
    before = eng.pool.nbytes()
    eng.generate(_prompts(6, seed=7), SamplingParams(max_tokens=20, temperature=0), arrivals=[0, 1, 2, 3, 4, 5])
    assert eng.pool.nbytes() == before and eng.pool.num_used == 0


def _drain(eng: Engine, events: dict[str, list] | None = None, max_steps: int = 500) -> dict[str, list]:
    """Step until idle; every event, by request id."""
    events = {} if events is None else events
    for _ in range(max_steps):
        if not eng.has_work():
            return events
        for ev in eng.step():
            events.setdefault(ev.request_id, []).append(ev)
    raise AssertionError("the engine did not go idle")


def _tokens(evs: list) -> list[int]:
    return [e.token_id for e in evs if e.token_id >= 0]


BAD_PARAMS = [
    dict(top_k=2**64), dict(top_k=-1), dict(top_k=1.5), dict(seed=2**70), dict(seed=-(2**63) - 1), dict(seed="7"),
    dict(temperature=float("nan")), dict(temperature=float("inf")), dict(temperature=-0.1), dict(top_p=0.0),
    dict(top_p=float("nan")), dict(min_p=2.0), dict(stop_token_ids=[-1]), dict(stop_token_ids=[10**9]),
    dict(stop_token_ids="12"), dict(stop_token_ids=[1.0]), dict(logprobs=21), dict(logprobs=-1), dict(threshold=1.5),
    dict(max_tokens=0), dict(max_tokens=True), dict(ignore_eos="no"),
]


@pytest.mark.parametrize("bad", BAD_PARAMS, ids=[str(b) for b in BAD_PARAMS])
def test_bad_params_raise_at_add_request(bad):
    """Each bad field is a ValueError (RequestError) from add_request itself, and nothing is queued:
    the top_k = 2**64 that used to overflow inside a batched step never gets that far."""
    model, _ = make(max_depth=2)
    eng = Engine(model, EngineConfig(max_num_seqs=2, max_model_len=32))
    with pytest.raises(ValueError):
        eng.add_request([5, 6, 7], SamplingParams(**{"max_tokens": 4, **bad}))
    assert not eng.has_work()


def test_bad_prompts_and_ids_raise_at_add_request():
    model, _ = make(max_depth=2)
    eng = Engine(model, EngineConfig(max_num_seqs=2, max_model_len=32))
    for prompt in ([], [1.5, 2.0], ["7"], [-1], [eng.vocab_size], [2**70]):
        with pytest.raises(RequestError):
            eng.add_request(prompt, SamplingParams(max_tokens=2))
    eng.add_request([5, 6], SamplingParams(max_tokens=2), "same")
    with pytest.raises(RequestError, match="already in use"):
        eng.add_request([5, 6], SamplingParams(max_tokens=2), "same")
    assert eng.num_waiting == 1
    _drain(eng)
    eng.add_request([5, 6], SamplingParams(max_tokens=2), "same")  # free again once finished
    assert _tokens(_drain(eng)["same"]) and not eng.has_work()


def test_a_request_failing_mid_step_fails_alone():
    """Parameters that slip past validation (set after add_request, as a bug would) break the batched
    sampler and the logprobs of one row each: those two requests end with "error"; the others get
    exactly the tokens they get alone, and the engine serves on."""
    model, thr = _model_with_mixed_depths()
    cfg = EngineConfig(max_num_seqs=4, max_model_len=48, threshold=thr, block_size=8)
    prompts = _prompts(5, seed=8)
    params = [SamplingParams(max_tokens=8, temperature=0.8, top_k=40, seed=10 + i, logprobs=0) for i in range(5)]
    eng = Engine(model, cfg)
    rids = [eng.add_request(p, sp, f"r{i}") for i, (p, sp) in enumerate(zip(prompts, params))]
    eng.waiting[1].params.top_k = 2**64  # torch cannot make a tensor of it
    eng.waiting[3].params.logprobs = 10**6  # topk beyond the vocabulary
    events = _drain(eng)
    for i in (1, 3):
        last = events[rids[i]][-1]
        assert last.finish_reason == "error" and last.error is not None
    for i in (0, 2, 4):
        alone = Engine(model, cfg).generate([prompts[i]], params[i])[0]
        assert _tokens(events[rids[i]]) == alone.token_ids and events[rids[i]][-1].finish_reason == "length"
    assert eng.num_running == 0 and eng.pool.num_used == 0 and not eng._live
    again = eng.generate([prompts[0]], params[0])[0]
    assert again.token_ids == _tokens(events[rids[0]])


def test_a_failed_pass_fails_its_rows_and_the_engine_goes_on(monkeypatch):
    """A decode pass that raises fails the rows it ran (their K/V may be half written), not the waiting
    requests; a prefill that raises fails only the requests it admitted (running rows are not written
    by it). Everything after gets the tokens it gets alone."""
    model, thr = _model_with_mixed_depths()
    cfg = EngineConfig(max_num_seqs=2, max_model_len=48, threshold=thr, block_size=8)
    prompts = _prompts(4, seed=9)
    sp = SamplingParams(max_tokens=6, temperature=0.0)
    alone = [Engine(model, cfg).generate([p], sp)[0].token_ids for p in prompts]

    eng = Engine(model, cfg)
    real_decode = model.decode_step
    calls = {"n": 0}

    def flaky_decode(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected decode failure")
        return real_decode(*a, **k)

    monkeypatch.setattr(model, "decode_step", flaky_decode)
    for i in range(4):  # two run, two wait for their slots
        eng.add_request(prompts[i], sp, f"d{i}")
    events = _drain(eng)
    assert [events[f"d{i}"][-1].finish_reason for i in range(4)] == ["error", "error", "length", "length"]
    assert [_tokens(events[f"d{i}"]) for i in (2, 3)] == alone[2:]
    monkeypatch.setattr(model, "decode_step", real_decode)

    eng = Engine(model, cfg)
    eng.add_request(prompts[0], sp, "running")
    events = {}
    for ev in eng.step():  # prompt 0 is prefilled and decoding
        events.setdefault(ev.request_id, []).append(ev)
    real_forward = model.forward

    def failing_forward(*a, **k):
        raise RuntimeError("injected prefill failure")

    monkeypatch.setattr(model, "forward", failing_forward)
    eng.add_request(prompts[1], sp, "admitted")
    for ev in eng.step():
        events.setdefault(ev.request_id, []).append(ev)
    monkeypatch.setattr(model, "forward", real_forward)
    eng.add_request(prompts[2], sp, "later")
    _drain(eng, events)
    assert events["admitted"][-1].finish_reason == "error"
    assert _tokens(events["running"]) == alone[0] and _tokens(events["later"]) == alone[2]
    assert eng.num_running == 0 and eng.pool.num_used == 0


def test_per_request_max_depth_v1():
    """max_depth 1 is the plain backbone (HF generate) while a neighbour in the same batch iterates;
    max_depth 2 of a model of M = 3 never runs depth 3 and equals the model capped there."""
    model, ref = make(max_depth=3)
    with torch.no_grad():
        ids = torch.tensor(_prompts(1, seed=42, lo=20, hi=21))
        thr = float(torch.sigmoid(model(ids, depths=torch.full_like(ids, 3)).decider_logits).median())
    p = _prompts(3, seed=10)
    eng = Engine(model, EngineConfig(max_num_seqs=4, max_model_len=48, threshold=thr))
    outs = eng.generate(p, [SamplingParams(max_tokens=8, temperature=0, max_depth=m) for m in (1, 2, None)])
    hf = ref.generate(input_ids=torch.tensor([p[0]]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                      pad_token_id=0, min_new_tokens=8)
    assert outs[0].token_ids == hf[0, len(p[0]):].tolist() and set(outs[0].depths) == {1}
    with model.depth_capped(2):
        capped = model.generate(torch.tensor([p[1]]), max_new_tokens=8, threshold=thr)
    assert outs[1].token_ids == capped.sequences[0, len(p[1]):].tolist() and max(outs[1].depths) == 2
    alone = Engine(model, EngineConfig(max_num_seqs=4, max_model_len=48, threshold=thr)).generate([p[2]], GREEDY)[0]
    assert outs[2].token_ids == alone.token_ids[:8] and 3 in outs[2].depths
    with pytest.raises(RequestError, match="at most this model's maximum depth 3"):
        eng.add_request(p[0], SamplingParams(max_tokens=2, max_depth=4))


@pytest.mark.parametrize("policy", ["decider", "standard"])
def test_prompt_logprobs_agree_with_the_prefill_and_the_backbone(policy):
    """Scoring (OpenAI echo + logprobs): scoring prompt + [its first greedy token] gives that token the
    log-probability the cached prefill gave it when it was sampled (two independent paths: parallel
    forward of the prompt alone vs the batched prefill into the cache); under the Standard policy every
    prompt logprob is the HF backbone's own log_softmax."""
    model, thr = _model_with_mixed_depths()
    eng = Engine(model, EngineConfig(max_num_seqs=4, max_model_len=64, threshold=thr, depth_policy=policy))
    prompts = _prompts(3, seed=5, lo=6, hi=14)
    first = eng.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0, logprobs=0))
    scored = eng.generate([p + o.token_ids for p, o in zip(prompts, first)],
                          SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=3))
    for p, f, s in zip(prompts, first, scored):
        plp = s.prompt_logprobs
        assert len(plp) == len(p) + 1 and plp[0] is None
        assert abs(plp[-1][0] - f.logprobs[0]) <= 1e-5
        assert all(len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1] for _, top in plp[1:])
        assert all(lp <= top[0][1] + 1e-6 for lp, top in plp[1:])
        if policy == "standard":
            ids = torch.tensor([p + f.token_ids])
            with torch.no_grad():
                ref = torch.log_softmax(model.backbone(ids).logits[0, :-1].float(), -1)
            want = ref.gather(1, ids[0, 1:, None])[:, 0]
            assert torch.allclose(torch.tensor([x[0] for x in plp[1:]]), want, atol=1e-5)
    assert eng.num_running == 0 and eng.pool.num_used == 0
    with pytest.raises(RequestError, match="prompt_logprobs"):
        eng.add_request([1, 2, 3], SamplingParams(prompt_logprobs=21))
