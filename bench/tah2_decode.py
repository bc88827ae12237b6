"""TaH2 decode throughput in the serving engine against Standard, beside the limit the average depth sets.

TaH2 M=2 (`TaHConfig.tah2(max_depth=2)`) and Standard (the same backbone wrapped at max_depth 1: the
plain decode path, no decider, no mixture) run in the same engine, same process, same prompts, the
paper's sampling (temperature 0.6, top-p 0.95, top-k 20, seeded). A token that runs k depths costs k
passes, and a step is one pass whose rows each run one depth, so TaH2 tokens/s ÷ Standard tokens/s
cannot exceed 1 / d̄ (d̄: average depth per generated token); the table prints d̄, that limit, the
ratio and ratio ÷ limit (the authors: 0.71 at batch 1, 0.74 at batch 4 on an A800 at d̄ ~1.44).

Measured: pure decode with every slot busy. `batch` requests are admitted together (one prefill step,
not timed); tokens are counted over the following steps until the first request finishes (every row
decodes in every timed step; TaH2 rows are at mixed depths). The decider of a random model is not
trained: the threshold is calibrated on a warm-up run to send `--share` of generated tokens to depth 2
(a quantile of the depth-1 decider probabilities seen while decoding; the authors' share is 44 %),
and the measured share is printed. Configurations run interleaved (`--repeats`), medians reported.
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


def decider_probs(model, engine_factory, prompts, params) -> torch.Tensor:
    """The decider's probabilities after depth 1 over a warm-up run (every token stops at depth 1)."""
    seen, real = [], model.decode_step_mix

    def spy(ids, depth, cache, hidden=None, decide=None):
        z, h, dec = real(ids, depth, cache, hidden, decide)
        if dec is not None:
            first = (depth.index_select(0, decide) == 1)
            seen.append(torch.sigmoid(dec.float())[first].cpu())
        return z, h, dec

    model.decode_step_mix = spy
    try:
        engine_factory(1.0).generate(prompts, params)
    finally:
        del model.decode_step_mix  # back to the class's method
    return torch.cat(seen)


def timed_decode(eng, prompts, params) -> tuple[int, float, float]:
    """(tokens, summed depths, seconds) over the steps after the prefill until a request finishes."""
    for p, q in zip(prompts, params):
        eng.add_request(p, q)
    eng.step()  # admission and prefill (first tokens): not decode
    n = depth_sum = 0
    t0 = time.perf_counter()
    while True:
        events = eng.step()
        if any(e.finished for e in events) or not events and not eng.has_work():
            break
        n += len(events)
        depth_sum += sum(e.depth for e in events)
    seconds = time.perf_counter() - t0  # (the last step, where a row finished, is timed but not counted:
    # it adds one step to both configurations alike; negligible against --new-tokens steps)
    while eng.has_work():
        eng.step()
    return n, depth_sum, seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=["small", "medium"], choices=list(DIMS))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--share", type=float, default=0.44, help="share of generated tokens sent to depth 2")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
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
    print("| model | batch | Standard tok/s | TaH2 tok/s | share depth 2 | d̄ | limit 1/d̄ | ratio | ratio ÷ limit |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        tah2, std = build(size, dev, dtype)
        vocab = DIMS[size]["vocab_size"]
        for B in args.batches:
            g = torch.Generator().manual_seed(B)
            prompts = torch.randint(3, vocab, (B, args.prompt_len), generator=g).tolist()
            # every request runs past the window: a row finishing ends it (max_tokens staggered by 1
            # so the first finish is one row's, not all at once)
            params = [SP(max_tokens=args.new_tokens + i % 2, ignore_eos=True, seed=i, temperature=args.temperature)
                      for i in range(B)]
            cfg = dict(max_num_seqs=B, max_model_len=args.prompt_len + 2 * args.new_tokens + 2)

            def tah2_engine(thr: float) -> Engine:
                return Engine(tah2, EngineConfig(**cfg, threshold=thr))

            def std_engine() -> Engine:
                return Engine(std, EngineConfig(**cfg))

            probs = decider_probs(tah2, tah2_engine, prompts, params)
            thr = float(torch.quantile(probs, 1 - args.share))
            runs = {"standard": lambda: timed_decode(std_engine(), prompts, params),
                    "tah2": lambda: timed_decode(tah2_engine(thr), prompts, params)}
            for f in runs.values():  # warm-up
                f()
            rates: dict[str, list[float]] = {k: [] for k in runs}
            info: dict[str, tuple] = {}
            for _ in range(args.repeats):
                for k, f in runs.items():
                    info[k] = f()
                    rates[k].append(info[k][0] / info[k][2])
            tps = {k: statistics.median(v) for k, v in rates.items()}
            n, dsum, _ = info["tah2"]
            dbar = dsum / max(n, 1)
            ratio, limit = tps["tah2"] / tps["standard"], 1 / dbar
            print(f"| {size} | {B} | {tps['standard']:.0f} | {tps['tah2']:.0f} | {dbar - 1:.3f} | {dbar:.3f} | "
                  f"{limit:.3f} | {ratio:.3f} | {ratio / limit:.3f} |", flush=True)
            if args.profile:
                profile(tah2_engine(thr), prompts, params, f"{size} batch {B}")


def profile(eng, prompts, params, title: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for p, q in zip(prompts, params):
        eng.add_request(p, q)
    for _ in range(4):
        eng.step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=acts) as prof:
        for _ in range(16):
            eng.step()
    print(f"\n## profile: TaH2 {title}, 16 decode steps\n")
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=18))


if __name__ == "__main__":
    main()
