"""TaH2 decode throughput in the serving engine against Standard, beside the limit the average depth sets.

TaH2 M=2 (`TaHConfig.tah2(max_depth=2)`) and Standard (the same backbone wrapped at max_depth 1: the
plain decode path, no decider, no mixture) run in the same engine, same process, same prompts, the
paper's sampling (temperature 0.6, top-p 0.95, top-k 20, seeded). A token that runs k depths costs k
passes, and a step is one pass whose rows each run one depth, so TaH2 tokens/s ÷ Standard tokens/s
cannot exceed 1 / d̄ (d̄: average depth per generated token); the table prints d̄, that limit, the
ratio and ratio ÷ limit (the authors: 0.71 at batch 1, 0.74 at batch 4 on an A800 at d̄ ~1.44).
That limit counts backbone passes only. TaH2 also runs its decider after every depth-1 pass and its
input updater before every deeper pass -- weights the Standard model does not have (on the small model
7.5 % and 6.3 % of the backbone's layer + head weights, on the medium one 4.7 % and 3.9 %). Where a step
costs its weight FLOPs/bytes, the ratio can then reach at most 1 / (d̄ (1 + x)), x = those weights per
row-pass over the backbone's (measured from the run's depth counts): the column "weights limit".

Measured: pure decode with every slot busy. `batch` requests are admitted together (one prefill step,
not timed); tokens are counted over the following steps until the first request finishes (every row
decodes in every timed step; TaH2 rows are at mixed depths); `--waves` such batches one after another.
The decider of a random model is not trained: the threshold is calibrated on a warm-up run to send
`--share` of generated tokens to depth 2 (a quantile of the depth-1 decider probabilities seen while
decoding the same requests, re-taken at that threshold until the share is within a point; the
authors' share is 44 %), and the measured share is printed. The two engines take turns step by step
(a shared machine's load swings fall on both alike); medians of `--repeats` runs.
`--profile` prints torch's profile of a few TaH2 steps (the costly ops).

    python bench/tah2_decode.py                                  # small and medium, batch 1 and 32
    python bench/tah2_decode.py --sizes small --batches 1 --profile
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from engine import DIMS  # bench/engine.py's random Qwen3 shapes


def build(size: str, dev: str, dtype: torch.dtype):
    """(TaH2 M=2 model, Standard model) over the same random backbone weights."""
    from tah import TaHConfig, TaHForCausalLM
    from tah.testing import tiny_qwen3

    hf = tiny_qwen3(**DIMS[size], initializer_range=0.02).to(dev, dtype)
    std = TaHForCausalLM.from_backbone(copy.deepcopy(hf), TaHConfig(max_depth=1)).eval()
    torch.manual_seed(0)
    tah2 = TaHForCausalLM.from_backbone(hf, TaHConfig.tah2(max_depth=2)).eval()
    with torch.no_grad():  # a decider whose probabilities spread (the authors' init starts at p ~ 0.5)
        tah2.decider.score.weight.normal_(0, 0.5)
    return tah2, std


def decider_probs(model, engine, waves) -> tuple[torch.Tensor, float]:
    """(the decider's probabilities after depth 1 of every generated token, the share of them that
    went to depth 2) over a run of `waves` through `engine`."""
    seen, real = [], model.decode_step_mix

    def spy(ids, depth, cache, hidden=None, decide=None):
        z, h, dec = real(ids, depth, cache, hidden, decide)
        if dec is not None:
            first = (depth.index_select(0, decide) == 1)
            seen.append(torch.sigmoid(dec.float())[first].cpu())
        return z, h, dec

    model.decode_step_mix = spy
    try:
        n, depth_sum, _ = timed_decode(engine, waves)
    finally:
        del model.decode_step_mix  # back to the class's method
    return torch.cat(seen), depth_sum / max(n, 1) - 1


def calibrate(model, make_engine, waves, share: float, rounds: int = 6) -> tuple[float, float]:
    """A threshold that sends `share` of the generated tokens to depth 2 on these very requests: the
    (1 - share) quantile of the depth-1 probabilities, re-taken on the run at that threshold (iterating
    tokens change the text, hence the later probabilities) until the share is within 1 point; else
    the closest seen."""
    thr, best = 1.0, (float("inf"), 1.0, 0.0)
    for _ in range(rounds):
        probs, got = decider_probs(model, make_engine(thr), waves)
        if thr < 1.0:
            best = min(best, (abs(got - share), thr, got))
            if best[0] <= 0.01:
                break
        thr = float(torch.quantile(probs, 1 - share))
    return best[1], best[2]


def timed_decode(eng, waves: list[tuple[list, list]]) -> tuple[int, float, float]:
    """(tokens, summed depths, seconds) of one engine (see `interleaved`)."""
    return interleaved({"e": eng}, waves)["e"]


def interleaved(engines: dict, waves: list[tuple[list, list]]) -> dict[str, tuple[int, float, float]]:
    """Per engine (tokens, summed depths, seconds) over each wave's decode steps: after its prefill step
    (not timed), until one of its requests finishes. The engines take turns step by step, so a change
    in the machine's load (a shared machine) falls on them alike."""
    out = {k: [0, 0, 0.0] for k in engines}
    for prompts, params in waves:
        for eng in engines.values():
            for p, q in zip(prompts, params):
                eng.add_request(p, q)
            eng.step()  # admission and prefill (first tokens): not decode
        live = set(engines)
        while live:
            for k in sorted(live):
                t0 = time.perf_counter()
                events = engines[k].step()
                out[k][2] += time.perf_counter() - t0
                # (the step where a row finishes is timed, not counted: one step more for each alike)
                if any(e.finished for e in events) or not events and not engines[k].has_work():
                    live.discard(k)
                    continue
                out[k][0] += len(events)
                out[k][1] += sum(e.depth for e in events)
        for eng in engines.values():
            while eng.has_work():
                eng.step()
    return {k: tuple(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=["small", "medium"], choices=list(DIMS))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--share", type=float, default=0.44, help="share of generated tokens sent to depth 2")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--waves", type=int, default=0, help="batches timed one after another (0: 4 at batch 1, else 1)")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    from tah.engine import Engine, EngineConfig
    from tah.engine import SamplingParams as SP

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    print(f"# TaH2 M=2 engine decode vs Standard, device {dev} ({torch.get_num_threads()} threads), {dtype}, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, temperature {args.temperature}, "
          f"target share at depth 2 {args.share}")
    print("| model | batch | Standard tok/s | TaH2 tok/s | share depth 2 | d̄ | limit 1/d̄ | ratio | ratio ÷ limit "
          "| weights limit | ratio ÷ weights limit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        tah2, std = build(size, dev, dtype)
        vocab = DIMS[size]["vocab_size"]
        for B in args.batches:
            g = torch.Generator().manual_seed(B)
            n_waves = args.waves or (4 if B == 1 else 1)

            def requests(n: int, seed0: int) -> tuple[list, list]:
                # every request runs past the window: a row finishing ends it (max_tokens staggered by 1
                # so the first finish is one row's, not all at once)
                prompts = torch.randint(3, vocab, (n, args.prompt_len), generator=g).tolist()
                return prompts, [SP(max_tokens=args.new_tokens + i % 2, ignore_eos=True, seed=seed0 + i,
                                    temperature=args.temperature) for i in range(n)]

            waves = [requests(B, 1000 * w) for w in range(n_waves)]
            cfg = dict(max_num_seqs=B, max_model_len=args.prompt_len + 2 * args.new_tokens + 2)

            def tah2_engine(thr: float) -> Engine:
                return Engine(tah2, EngineConfig(**cfg, threshold=thr))

            def std_engine() -> Engine:
                return Engine(std, EngineConfig(**cfg))

            thr, _ = calibrate(tah2, tah2_engine, waves, args.share)  # (also the warm-up)
            timed_decode(std_engine(), waves)  # warm-up
            rates: dict[str, list[float]] = {"standard": [], "tah2": []}
            for _ in range(args.repeats):
                info = interleaved({"standard": std_engine(), "tah2": tah2_engine(thr)}, waves)
                for k, (n, _, sec) in info.items():
                    rates[k].append(n / sec)
            tps = {k: statistics.median(v) for k, v in rates.items()}
            ratio = statistics.median(t / s for t, s in zip(rates["tah2"], rates["standard"]))
            n, dsum, _ = info["tah2"]  # (the same tokens and depths in every repeat: seeded)
            dbar = dsum / max(n, 1)
            limit = 1 / dbar
            # row-passes: n at depth 1 (each followed by the decider at M = 2), dsum - n deeper (updater first)
            x = (n * params(tah2.decider) + (dsum - n) * params(tah2.updater)) / (dsum * backbone_params(tah2))
            wlimit = limit / (1 + x)
            print(f"| {size} | {B} | {tps['standard']:.0f} | {tps['tah2']:.0f} | {dbar - 1:.3f} | {dbar:.3f} | "
                  f"{limit:.3f} | {ratio:.3f} | {ratio / limit:.3f} | {wlimit:.3f} | {ratio / wlimit:.3f} |",
                  flush=True)
            if args.profile:
                profile({"tah2": tah2_engine(thr), "standard": std_engine()}, *waves[0], f"{size} batch {B}")


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def backbone_params(model) -> int:
    """The weights one row-pass multiplies: the decoder layers and the head (not the embedding lookup)."""
    from tah import hf_adapter as hf

    return params(hf.decoder_parts(model.backbone).layers) + params(hf.decoder_parts(model.backbone).lm_head)


def profile(engines: dict, prompts, params_: list, title: str, steps: int = 16) -> None:
    """Each engine's self time per op over `steps` decode steps, and TaH2 - Standard per step: the ops
    that make a TaH2 step cost more than a Standard one."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    per_op: dict[str, dict[str, float]] = {}
    for name, eng in engines.items():
        for p, q in zip(prompts, params_):
            eng.add_request(p, q)
        for _ in range(4):
            eng.step()
        with torch_profile(activities=acts) as prof:
            for _ in range(steps):
                eng.step()
        for e in prof.key_averages():
            us = e.self_device_time_total if cuda else e.self_cpu_time_total
            per_op.setdefault(e.key, {})[name] = us / steps
    print(f"\n## profile: {title}, {steps} decode steps, self time per step (us)\n")
    print("| op | TaH2 | Standard | TaH2 - Standard |\n|---|---|---|---|")
    tot = {k: sum(v.get(k, 0.0) for v in per_op.values()) for k in engines}
    rows = sorted(per_op.items(), key=lambda kv: -(kv[1].get("tah2", 0) - kv[1].get("standard", 0)))
    for op, v in rows[:16]:
        a, b = v.get("tah2", 0.0), v.get("standard", 0.0)
        print(f"| {op} | {a:.0f} | {b:.0f} | {a - b:+.0f} |")
    print(f"| (all ops) | {tot['tah2']:.0f} | {tot['standard']:.0f} | {tot['tah2'] - tot['standard']:+.0f} |")


if __name__ == "__main__":
    main()
