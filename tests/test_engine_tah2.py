"""The serving engine on TaH2 (TaHConfig.tah2) against independent references: the reference generate()
(token by token through forward with a TaHCache), the parallel forward over the final text, a model
built with a smaller M, HF generate of the backbone, each request run alone, and the mixture formula
written out.

    PYTHONPATH=. .venv/bin/python -m pytest -x -q tests/test_engine_tah2.py
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from tah import TaHConfig, TaHForCausalLM
from tah.engine import Engine, EngineConfig, RequestError, SamplingParams
from tah.mixture import MixtureState
from tah.testing import tiny_qwen3

from . import helpers

N_NEW = 10


def make_tah2(max_depth: int = 2, seed: int = 0, **fields) -> TaHForCausalLM:
    model = helpers.make_tah2(max_depth, seed, torch.float32, **fields)
    return model.eval()


def prompts(n: int, seed: int = 0, lo: int = 2, hi: int = 12) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def median_threshold(model: TaHForCausalLM) -> float:
    """The median of the decider's probabilities over every depth of a random text: tokens stop and
    continue at every depth. (Between two probabilities, so that no token sits on the threshold.)"""
    ids = torch.tensor(prompts(1, seed=42, lo=24, hi=25))
    with torch.no_grad():
        logits = model(ids, depths=torch.full_like(ids, model.config.max_depth)).decider_logits
    p = torch.sigmoid(logits.flatten().float()).sort().values
    mid = p.numel() // 2
    return float(p[mid - 1] + p[mid]) / 2


def record_depths(monkeypatch, model: TaHForCausalLM) -> list[list[int]]:
    """Every decode pass's row depths (to check that one pass mixed depths)."""
    seen, real = [], model.decode_step_mix

    def spy(ids, depth, *a, **k):
        seen.append(depth.tolist())
        return real(ids, depth, *a, **k)

    monkeypatch.setattr(model, "decode_step_mix", spy)
    return seen


@pytest.mark.parametrize("max_depth", [2, 4])
def test_greedy_batch_equals_reference_generate(max_depth, monkeypatch):
    """Several requests of different prompt lengths, arriving at different steps, four slots: each
    gets the reference's tokens, depths and log-probs, and some passes hold rows at different depths."""
    model = make_tah2(max_depth)
    thr = median_threshold(model)
    ps = prompts(6, seed=1)
    passes = record_depths(monkeypatch, model)
    eng = Engine(model, EngineConfig(max_num_seqs=4, max_model_len=64, threshold=thr, block_size=8))
    outs = eng.generate(ps, SamplingParams(max_tokens=N_NEW, temperature=0.0, logprobs=0),
                        arrivals=[0, 0, 1, 3, 4, 6])
    deepest = 1
    for p, o in zip(ps, outs):
        ref = model.generate(torch.tensor([p]), max_new_tokens=N_NEW, threshold=thr)
        assert o.token_ids == ref.sequences[0, len(p):].tolist()
        # The depth that produced generated token s + 1 is the depth token s ran when fed back.
        assert o.depths[1:] == ref.depths[0, :N_NEW - 1].tolist()
        assert o.depths[0] == int(ref.prompt_depths[0, -1])
        lp = torch.stack([torch.log_softmax(lg[0], -1)[t] for lg, t in zip(ref.step_logits, o.token_ids)])
        assert torch.allclose(torch.tensor(o.logprobs), lp, atol=1e-5)
        assert o.stats.depth_counts == {d: o.depths.count(d) for d in set(o.depths)}
        assert o.stats.prompt_depth_counts == {int(d): int((ref.prompt_depths[0] == d).sum())
                                               for d in ref.prompt_depths[0].unique().tolist()}
        deepest = max(deepest, *o.depths)
    assert deepest == max_depth  # tokens reached the cap
    assert any(len(set(d)) > 1 for d in passes)  # one pass, rows at different depths
    assert model.attention_paths["mixed_decode_split"] > 0  # depth-1 rows read depth-1 keys only
    assert any(d >= 3 for step in passes for d in step) == (max_depth >= 3)


@pytest.mark.parametrize("policy", ["decider", "always_think"])
def test_greedy_equals_parallel_forward_over_the_final_text(policy):
    """Each generated token is the argmax of one parallel forward over prompt + output, whose decider
    makes the same depth decisions (or which runs the same forced depths); its log-prob is the
    forward's mixture log-prob; the prompt's depths are the forward's."""
    model = make_tah2(3)
    thr = median_threshold(model)
    eng = Engine(model, EngineConfig(max_num_seqs=3, max_model_len=64, threshold=thr, depth_policy=policy))
    ps = prompts(3, seed=2)
    outs = eng.generate(ps, SamplingParams(max_tokens=9, temperature=0.0, logprobs=0))
    for p, o in zip(ps, outs):
        seq = torch.tensor([p + o.token_ids])
        with torch.no_grad():
            full = model(seq, depths=None if policy == "decider" else torch.full_like(seq, 3), threshold=thr)
        n = len(p)
        assert full.logits[0, n - 1:-1].argmax(-1).tolist() == o.token_ids
        assert full.depths[0, n - 1:-1].tolist() == o.depths
        pd = full.depths[0, :n]
        assert o.stats.prompt_depth_counts == {int(d): int((pd == d).sum()) for d in pd.unique().tolist()}
        ref_lp = full.logits[0, n - 1:-1].gather(1, seq[0, n:, None])[:, 0]
        assert torch.allclose(torch.tensor(o.logprobs), ref_lp, atol=1e-5)
        if policy == "always_think":
            assert set(o.depths) == {3}


def _model_with_cap(model: TaHForCausalLM, m: int) -> TaHForCausalLM:
    """An independently built TaH2 model of max_depth m with the same weights."""
    ref = TaHForCausalLM.from_backbone(copy.deepcopy(model.backbone), TaHConfig.tah2(max_depth=m)).eval()
    if m >= 2:
        ref.decider.load_state_dict(model.decider.state_dict())
        ref.updater.load_state_dict(model.updater.state_dict())
    return ref


def test_lowered_max_depth_equals_a_model_with_that_max_depth():
    """max_depth 1, 2, 3 and the model's 4 in one batch: each request gets the tokens of a model built
    with that M (1: HF greedy generate of the plain backbone, the same random weights), and never runs deeper."""
    model = make_tah2(4)
    thr = median_threshold(model)
    ps = prompts(4, seed=3)
    caps = [1, 2, 3, None]
    eng = Engine(model, EngineConfig(max_num_seqs=4, max_model_len=64, threshold=thr, block_size=8))
    outs = eng.generate(ps, [SamplingParams(max_tokens=N_NEW, temperature=0.0, max_depth=m) for m in caps],
                        arrivals=[0, 0, 1, 2])
    for p, m, o in zip(ps, caps, outs):
        ids = torch.tensor([p])
        if m == 1:
            ref = tiny_qwen3().generate(input_ids=ids, max_new_tokens=N_NEW, do_sample=False, eos_token_id=None,
                                          pad_token_id=0, min_new_tokens=N_NEW)[0, len(p):].tolist()
        else:
            ref = _model_with_cap(model, m or 4).generate(ids, max_new_tokens=N_NEW, threshold=thr)
            ref = ref.sequences[0, len(p):].tolist()
        assert o.token_ids == ref
        assert max(o.depths) <= (m or 4) and max(o.stats.prompt_depth_counts) <= (m or 4)
    assert max(outs[1].depths + list(outs[1].stats.prompt_depth_counts)) == 2  # the cap was reached
    with pytest.raises(RequestError, match="max_depth must be at most"):
        eng.add_request([5, 6], SamplingParams(max_tokens=2, max_depth=5))
    for bad in (0, 1.5, True):
        with pytest.raises(RequestError, match="max_depth"):
            eng.add_request([5, 6], SamplingParams(max_tokens=2, max_depth=bad))
    assert not eng.has_work()


def test_per_request_threshold_in_one_batch():
    """Threshold 1 never iterates (= max_depth 1 = the backbone), threshold 0 always does (= the
    always_think policy), a third request at the engine's threshold between them."""
    model = make_tah2(2)
    thr = median_threshold(model)
    ps = prompts(3, seed=5)
    cfg = dict(max_num_seqs=4, max_model_len=48, threshold=thr)
    sp = [SamplingParams(max_tokens=8, temperature=0, threshold=t) for t in (1.0, 0.0, None)]
    both = Engine(model, EngineConfig(**cfg)).generate(ps, sp)
    std = Engine(model, EngineConfig(**cfg, depth_policy="standard")).generate([ps[0]], sp[2])[0]
    always = Engine(model, EngineConfig(**cfg, depth_policy="always_think")).generate([ps[1]], sp[2])[0]
    mid = model.generate(torch.tensor([ps[2]]), max_new_tokens=8, threshold=thr).sequences[0, len(ps[2]):]
    assert both[0].token_ids == std.token_ids and set(both[0].depths) == {1} == set(std.depths)
    assert both[1].token_ids == always.token_ids and set(both[1].depths) == {2}
    assert both[2].token_ids == mid.tolist()


@pytest.mark.parametrize("max_depth", [2, 4])
def test_seeded_sampling_batched_equals_alone(max_depth):
    """Sampled requests with seeds, staggered arrivals, more requests than slots, different lengths (rows
    finish and slots are compacted while others are mid-token): each gets the tokens it gets alone,
    and the same seed gives the same tokens again."""
    model = make_tah2(max_depth)
    thr = median_threshold(model)
    cfg = EngineConfig(max_num_seqs=3, max_model_len=48, threshold=thr, block_size=8, max_prefill_tokens=24)
    ps = prompts(7, seed=4)
    params = [SamplingParams(max_tokens=3 + 2 * i, temperature=0.9, top_k=50, top_p=0.95, seed=100 + i)
              for i in range(7)]
    together = Engine(model, cfg).generate(ps, params, arrivals=[0, 0, 1, 1, 2, 5, 6])
    alone = Engine(model, cfg)
    iterated = 0
    for p, sp, t in zip(ps, params, together):
        a = alone.generate([p], sp)[0]
        assert t.token_ids == a.token_ids and t.depths == a.depths
        assert len(t.token_ids) == sp.max_tokens
        iterated += t.stats.iterated_tokens
    assert iterated > 0
    again = Engine(model, cfg).generate(ps[:2], params[:2])
    assert [o.token_ids for o in again] == [o.token_ids for o in together[:2]]
    other = Engine(model, cfg).generate([ps[6]], dataclasses.replace(params[6], seed=7))[0]
    assert other.token_ids != together[6].token_ids  # the seed matters


def test_even_mix_and_first_self_equal_reference_generate():
    model = make_tah2(3, combine="even_mix", depth_attention="first_self")
    thr = median_threshold(model)
    ps = prompts(3, seed=6)
    outs = Engine(model, EngineConfig(max_num_seqs=2, max_model_len=48, threshold=thr)).generate(
        ps, SamplingParams(max_tokens=N_NEW, temperature=0.0), arrivals=[0, 1, 2])
    for p, o in zip(ps, outs):
        ref = model.generate(torch.tensor([p]), max_new_tokens=N_NEW, threshold=thr)
        assert o.token_ids == ref.sequences[0, len(p):].tolist()
        assert o.depths[1:] == ref.depths[0, :N_NEW - 1].tolist()
    assert any(o.stats.iterated_tokens for o in outs) and model.attention_paths["mixed_decode_split"] > 0


def test_standard_policy_is_the_backbone():
    model = make_tah2(2)
    eng = Engine(model, EngineConfig(max_num_seqs=2, max_model_len=48, depth_policy="standard"))
    for p in prompts(2, seed=7):
        got = eng.generate([p], SamplingParams(max_tokens=8, temperature=0.0))[0]
        hf = tiny_qwen3().generate(input_ids=torch.tensor([p]), max_new_tokens=8, do_sample=False,
                                     eos_token_id=None, pad_token_id=0, min_new_tokens=8)
        assert got.token_ids == hf[0, len(p):].tolist() and got.stats.depth_counts == {1: 8}


def test_mixture_state_against_the_formula():
    """Two rows through MixtureState by hand: row 0 runs depths 1, 2, 3 (continues, continues, stops),
    row 1 stops at depth 1; the output is log(sum_d w_d p_d) with w = (1-c1), c1(1-c2), c1 c2."""
    V = 7
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(2, V, generator=g, dtype=torch.float64) for _ in range(3)]
    c1, c2 = 0.7, 0.4
    st = MixtureState(4, V, 3, "stop_prob_mix", torch.float64, torch.float64, "cpu")
    h = torch.randn(2, 3, dtype=torch.float64, generator=g)
    out, stop = st.step([1, 1], z[0], h, [True, False], torch.tensor([c1, 0.9], dtype=torch.float64))
    assert stop == [1] and torch.allclose(out[0], torch.log_softmax(z[0][1], -1))
    assert torch.equal(st.hidden(torch.tensor([0])), h[:1]) and float(st.R[0]) == pytest.approx(c1)
    # rows are slots: the next steps run row 0 alone
    out, stop = st.step([2], z[1][:1], h[:1], [True], torch.tensor([c2], dtype=torch.float64))
    assert stop == [] and out.shape == (0, V)
    out, stop = st.step([3], z[2][:1], h[:1], [False], None)
    p = [torch.softmax(zz[0], -1) for zz in z]
    want = torch.log((1 - c1) * p[0] + c1 * (1 - c2) * p[1] + c1 * c2 * p[2])
    assert stop == [0] and torch.allclose(out[0], want, atol=1e-12)
    even = MixtureState(2, V, 3, "even_mix", torch.float64, torch.float64, "cpu")
    even.step([1], z[0][:1], h[:1], [True], None)
    out, _ = even.step([2], z[1][:1], h[:1], [False], None)
    assert torch.allclose(out[0], torch.log((p[0] + p[1]) / 2), atol=1e-12)
    with pytest.raises(ValueError, match="mixes"):
        MixtureState(2, V, 3, "logit_residual", torch.float32, torch.float32, "cpu")


def test_kv_and_mixture_memory_are_reserved_once():
    model = make_tah2(2)
    thr = median_threshold(model)
    eng = Engine(model, EngineConfig(max_num_seqs=3, max_model_len=40, threshold=thr, block_size=8))
    before = eng.pool.nbytes(), eng.runner.mix.nbytes()
    assert before[1] >= 3 * 512 * 4  # (slots, V) fp32 accumulator
    eng.generate(prompts(6, seed=8), SamplingParams(max_tokens=16, temperature=0), arrivals=[0, 1, 2, 3, 4, 5])
    assert (eng.pool.nbytes(), eng.runner.mix.nbytes()) == before and eng.pool.num_used == 0


def test_decode_step_kinds_refuse_the_other_configuration():
    from .helpers import make

    tah2, (v1, _) = make_tah2(2), make(max_depth=2)
    z = torch.zeros(1, dtype=torch.long)
    with pytest.raises(NotImplementedError, match="decode_step_mix"):
        tah2.decode_step(z, torch.ones(1, dtype=torch.long), tah2.new_cache(1))
    with pytest.raises(NotImplementedError, match="TaH2"):
        v1.decode_step_mix(z, torch.ones(1, dtype=torch.long), v1.new_cache(1))
    with pytest.raises(NotImplementedError, match="input_rule, combine"):
        Engine(make_tah2(2, combine="logit_residual"))
    assert math.isfinite(median_threshold(tah2))
