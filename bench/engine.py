"""Decode throughput of the serving engine: TaH vs Standard vs AlwaysThink, and the engine vs HF generate.

One model, one process, the same prompts and the paper's sampling defaults (seeded). The engine is measured in
steady state: a queue of requests that never drains through `batch` slots, tokens produced over a
window of steps once slots are at mixed phases (a single batch run to its end would measure its
slowest row's tail instead). HF generate runs static batches; the engine is also measured that way
("static" rows: the same waves of prompts admitted together, every request new_tokens long, timed from
the prefill to the last token), so that Standard ÷ HF is printed for both settings. The configurations
run interleaved (round-robin over `--repeats`) so machine noise hits them alike, and the median is
reported. TaH uses the decider at
`--threshold`; a random model's decider is not trained, so by default its threshold is calibrated
(`calibrate`) to send `--share` of generated tokens to depth 2 on text TaH itself decodes at the
benchmark's temperature, from prompts of its own (the measured share is printed) -- or pass a trained
checkpoint. Standard and AlwaysThink are the same engine with forced depths; HF is
`model.generate` of the plain backbone (greedy, no EOS).

    python bench/engine.py                                   # small random Qwen3, batch 1 and 32
    python bench/engine.py --checkpoint runs/tiny/train/tah/stage2/model --threshold 0.9
    python bench/engine.py --model $(python -m tah.real_model --path)   # a real HF model, TaH calibrated on it
    python bench/engine.py --size smollm2-135m                         # its shape (Llama), random weights
    python bench/engine.py --batches 32 --profile 40     # where a step's time goes: Standard vs TaH, per op
    python bench/engine.py --batches 32 --parts 100      # the same per engine part, timed without the profiler
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import statistics
import time

import torch


# Random Qwen3 shapes (bench/tah2_decode.py reuses them).
DIMS = {"tiny": dict(vocab_size=1024, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
                     intermediate_size=128),
        "small": dict(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=32,
                      intermediate_size=768),
        "medium": dict(vocab_size=32768, hidden_size=1024, num_layers=8, num_heads=16, num_kv_heads=8,
                       head_dim=64, intermediate_size=3072),
        "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8,
                           head_dim=128, intermediate_size=3072)}
# A real model's shape (SmolLM2-135M: Llama, no q/k norm, untied head in this builder), random weights.
LLAMA_DIMS = {"smollm2-135m": dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                                   intermediate_size=1536)}


def v1_model(hf: torch.nn.Module):
    """The benchmarks' TaH v1 model over a backbone: max depth 2, LoRA r 16 (alpha 32) with random B
    (scale 0.05), decider 64 wide x 2 blocks, eval mode. Seeding is the caller's (bench/engine_v2.py and
    bench/authors_v1.py build the same model)."""
    from tah import TaHConfig, TaHForCausalLM
    from tah.config import DeciderSettings, LoraSettings
    from tah.testing import randomize_lora

    model = TaHForCausalLM.from_backbone(hf, TaHConfig(max_depth=2, lora=LoraSettings(r=16, alpha=32, dropout=0.0),
                                                       decider=DeciderSettings(width=64, blocks=2, dropout=0.0)))
    model.eval()
    randomize_lora(model, scale=0.05)
    return model


def build(args: argparse.Namespace):
    from tah import TaHForCausalLM
    from tah.testing import tiny_qwen3

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    if args.checkpoint:
        model = TaHForCausalLM.from_pretrained(args.checkpoint, dtype=dtype, device=dev)
        from transformers import AutoModelForCausalLM

        from tah import storage

        hf = AutoModelForCausalLM.from_pretrained(storage.local_copy(args.checkpoint), dtype=dtype).to(dev).eval()
        return model, hf, args.threshold, model.backbone.config.vocab_size
    if args.model:  # a plain HF model (e.g. tah.real_model's): TaH's LoRA and decider fresh on top
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(dev).eval()
        dims = {"vocab_size": hf.config.vocab_size}
    elif args.size in LLAMA_DIMS:
        from tah.testing import tiny_llama

        dims = LLAMA_DIMS[args.size]
        hf = tiny_llama(**dims, initializer_range=0.02).to(dev, dtype)
    else:
        dims = DIMS[args.size]  # the shape; weights random
        hf = tiny_qwen3(**dims, initializer_range=0.02).to(dev, dtype)
    ref = copy.deepcopy(hf)
    torch.manual_seed(0)
    model = v1_model(hf)
    # Calibrated on prompts of its own (not the benchmark's), at the benchmark's temperature and lengths.
    thr, _ = calibrate(model, prompts(8, args.prompt_len, dims["vocab_size"], seed=12345), args.new_tokens,
                       args.share, args.temperature)
    return model, ref, thr, dims["vocab_size"]


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """n random prompts of `length` token ids in [3, vocab) (ids 0-2 left to special tokens), seeded."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def calibrate(model, ps: list[list[int]], new_tokens: int, share: float, temperature: float = 0.0,
              rounds: int = 6) -> tuple[float, float]:
    """A threshold at which TaH's own decodes of `ps` iterate `share` of their generated tokens, and the
    share it gave. The one calibration of the benchmarks (engine.py, engine_v2.py, authors_v1.py).

    Start from the (1 - share) quantile of the decider's probabilities at the positions that decide the
    depth of generated tokens (the last prompt token and each generated token fed back) of the Standard
    engine's decodes; then decode with TaH at the threshold, measure the share its own text iterates, and
    move: to that text's quantile, or, once one threshold gave too few and one too many, to their
    midpoint. A token that iterates changes the text after it, and a random model's greedy text repeats
    itself, so the share is a step function of the threshold (4.0 % at 0.7156, 9.6 % at 0.7052 on 32
    prompts) and the depth-1 quantile alone lands far from it. Sampled decodes (temperature > 0) draw
    with seed i for row i, so every round decodes the same draws. The decider reads the depth-1 pass,
    which is the plain model's whatever depths earlier tokens ran (duo-causal), so one parallel forward
    gives its probabilities, and the share is the model's own rule (`goes_deeper`) on them. Thresholds
    are rounded to fp32, so that a checkpoint written for other code (bench/authors_v1.py) compares
    against the same number. Returns the threshold whose measured share came closest."""
    from tah.engine import Engine, EngineConfig
    from tah.engine import SamplingParams as SP

    P, thr, tried = len(ps[0]), None, []  # tried: (share measured, threshold)
    sp = [SP(max_tokens=new_tokens, temperature=temperature, ignore_eos=True, seed=i) for i in range(len(ps))]
    dev = model.backbone.get_input_embeddings().weight.device
    for _ in range(rounds + 1):
        kw = {"depth_policy": "standard"} if thr is None else {"threshold": thr}
        eng = Engine(model, EngineConfig(max_num_seqs=len(ps), max_model_len=P + new_tokens + 1,
                                         enable_prefix_caching=False, **kw))
        outs = eng.generate(ps, sp)
        ids = torch.tensor([p + list(o.token_ids) for p, o in zip(ps, outs)], device=dev)  # (B, P + new)
        with torch.no_grad():  # depth 2 forced, so that the decider runs after depth 1 at every position
            logits = model(ids, depths=torch.full_like(ids, 2)).decider_logits[..., 0]
        g = logits[:, P - 1:P + new_tokens - 1].flatten()  # (B * new,): position t decides the token at t + 1
        if thr is not None:  # the share TaH iterated: the model's own rule on its own text
            tried.append((float(model.goes_deeper(g, thr).float().mean()), thr))
        low = [t for s, t in tried if s < share]  # thresholds too high
        high = [t for s, t in tried if s >= share]
        thr = (min(low) + max(high)) / 2 if low and high else float(torch.quantile(torch.sigmoid(g.float()), 1 - share))
        thr = float(torch.tensor(thr, dtype=torch.float32))
    got, best = min(tried, key=lambda st: abs(st[0] - share))
    return best, got


PARTS = ["schedule", "prefill", "decode (all below)", "  decode_step", "    self_attn (all below)",
         "      KV write + gather", "      attention", "    mlp", "    lm_head", "  decider MLP", "sample + outputs"]


@contextlib.contextmanager
def _regions(eng, model, region):
    """Wrap the engine's parts (PARTS) in `region(label)`, a context manager: a profiler region, or a timer.
    Instance attributes over the methods (module functions for attention), removed after. The layers'
    parts are counted inside the decode pass only."""
    import tah.attention as attn
    from tah import hf_adapter
    from tah.engine import kv

    decoding = [False]  # the parts inside decode count only there (prefill runs the same layers)

    def wrap(obj, name, label):
        f = getattr(obj, name)
        inner = label.startswith("    ")

        @functools.wraps(f)
        def run(*a, **k):
            if inner and not decoding[0]:
                return f(*a, **k)
            top = label == "decode (all below)"
            decoding[0] |= top
            try:
                with region(label):
                    return f(*a, **k)
            finally:
                if top:
                    decoding[0] = False
        setattr(obj, name, run)
        return obj, name, f

    parts = hf_adapter.decoder_parts(model.backbone)
    done = [wrap(eng.scheduler, "schedule", "schedule"), wrap(eng.runner, "prefill", "prefill"),
            wrap(eng.runner, "decode", "decode (all below)"), wrap(model, "decode_step", "  decode_step"),
            wrap(model, "decode_step_mix", "  decode_step"), wrap(eng.outputs, "process", "sample + outputs"),
            wrap(parts.lm_head, "forward", "    lm_head"), wrap(attn, "_mixed_decode", "      attention"),
            wrap(attn, "_mixed_decode_split", "      attention"),
            wrap(kv._PagedMixedView, "update", "      KV write + gather")]
    for layer in parts.layers:
        done += [wrap(layer.self_attn, "forward", "    self_attn (all below)"), wrap(layer.mlp, "forward", "    mlp")]
    if model.decider is not None:
        done.append(wrap(model.decider, "forward", "  decider MLP"))
    try:
        yield
    finally:
        for obj, name, f in reversed(done):
            if isinstance(obj, type) or obj is attn:  # a class or module attribute: put the original back
                setattr(obj, name, f)
            else:
                delattr(obj, name)


class _Timer:
    """A region that adds its wall time to acc[label] (inclusive: nested parts are also in their parent)."""

    def __init__(self, acc: dict[str, float]) -> None:
        self.acc, self.stack = acc, []

    def __call__(self, label: str) -> "_Timer":
        self.stack.append((label, time.perf_counter()))
        return self

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        label, t0 = self.stack.pop()
        self.acc[label] = self.acc.get(label, 0.0) + time.perf_counter() - t0


def parts(make_engine, model, steps: int, rounds: int = 4) -> None:
    """Steady-state steps of Standard and TaH timed per part with perf_counter (no profiler: under
    torch.profiler small ops read several times their real cost), interleaved in `rounds`."""
    engines = {"standard": make_engine("standard"), "tah": make_engine("decider")}  # warmed to steady state
    acc: dict[str, dict[str, float]] = {k: {} for k in engines}
    whole = dict.fromkeys(engines, 0.0)
    for r in range(rounds):
        n = steps // rounds + (r < steps % rounds)
        for name, eng in engines.items():
            with _regions(eng, model, _Timer(acc[name])):
                t0 = time.perf_counter()
                for _ in range(n):
                    eng.step()
                whole[name] += time.perf_counter() - t0
    print("| part (inclusive) | Standard ms/step | TaH ms/step |\n|---|---|---|")
    print(f"| whole step | {whole['standard'] / steps * 1e3:.2f} | {whole['tah'] / steps * 1e3:.2f} |")
    for lab in PARTS:
        s, t = (acc[k].get(lab, 0.0) / steps * 1e3 for k in engines)
        print(f"| {lab} | {s:.2f} | {t:.2f} |")


def profile(make_engine, model, steps: int, rounds: int = 4, top: int = 18) -> None:
    """Steady-state steps of Standard and TaH under torch.profiler, interleaved in `rounds` so that machine
    noise hits both alike: ms/step per engine part and per op (self CPU time, summed over the op's calls),
    TaH's costliest ops first with Standard beside them."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    engines = {"standard": make_engine("standard"), "tah": make_engine("decider")}  # warmed to steady state
    res: dict[str, dict[str, list[float]]] = {k: {} for k in engines}  # op -> [total ms, self ms, calls]
    for r in range(rounds):
        n = steps // rounds + (r < steps % rounds)
        for name, eng in engines.items():
            with _regions(eng, model, record_function), torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(n):
                    eng.step()
            for e in prof.key_averages():
                acc = res[name].setdefault(e.key, [0.0, 0.0, 0.0])
                acc[0] += e.cpu_time_total / steps / 1e3
                acc[1] += e.self_cpu_time_total / steps / 1e3
                acc[2] += e.count / steps
    labels = PARTS
    total = {k: sum(v[1] for v in r.values()) for k, r in res.items()}
    print("| part | Standard ms/step | TaH ms/step |\n|---|---|---|")
    print(f"| whole step (profiled) | {total['standard']:.2f} | {total['tah']:.2f} |")
    for lab in labels:
        s, t = (res[k].get(lab, (0.0,))[0] for k in ("standard", "tah"))
        print(f"| {lab} | {s:.2f} | {t:.2f} |")
    ops = sorted((k for k in res["tah"] if k.startswith("aten::")), key=lambda k: -res["tah"][k][1])[:top]
    print("\n| op (self CPU) | Standard ms/step | TaH ms/step | TaH - Standard | TaH calls/step |")
    print("|---|---|---|---|---|")
    for k in ops:
        s, t = res["standard"].get(k, (0, 0, 0))[1], res["tah"][k][1]
        print(f"| {k} | {s:.2f} | {t:.2f} | {t - s:+.2f} | {res['tah'][k][2]:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small", choices=[*DIMS, *LLAMA_DIMS])
    ap.add_argument("--checkpoint", help="a trained TaH checkpoint (its own decider and threshold)")
    ap.add_argument("--model", help="a plain HF causal LM directory: TaH (random LoRA, calibrated decider) over it")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--share", type=float, default=0.07, help="random model: share of tokens sent to depth 2")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--waves", type=int, default=8, help="requests queued = waves x batch, through batch slots")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="instead of timing: profile STEPS steady-state steps of Standard and TaH per batch")
    ap.add_argument("--parts", type=int, default=0, metavar="STEPS",
                    help="instead of timing: STEPS steady-state steps of Standard and TaH timed per part, no profiler")
    args = ap.parse_args()
    from tah.engine import Engine, EngineConfig
    from tah.engine import SamplingParams as SP

    model, hf, thr, vocab = build(args)
    dev = model.backbone.get_input_embeddings().weight.device
    what = args.checkpoint or args.model or f"{args.size} random {'Llama' if args.size in LLAMA_DIMS else 'Qwen3'}"
    print(f"# engine decode, {what}, device {dev}, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.waves} x batch requests, "
          f"temperature {args.temperature}, TaH threshold {thr:.4f}")
    if not (args.profile or args.parts):
        print("| batch | method | tokens/s | share depth 2 | ÷ Standard | ")
        print("|---|---|---|---|---|")
    for B in args.batches:
        g = torch.Generator().manual_seed(B)
        n_req = B * args.waves
        reqs = torch.randint(3, vocab, (n_req, args.prompt_len), generator=g).tolist()
        # Lengths vary (new_tokens/2 .. 3 new_tokens/2) so that under every policy slots free and refill
        # at staggered steps, as in serving; the same lengths for every policy.
        lens = torch.randint(args.new_tokens // 2, 3 * args.new_tokens // 2 + 1, (n_req,), generator=g).tolist()
        sp = [SP(max_tokens=m, ignore_eos=True, seed=i, temperature=args.temperature) for i, m in enumerate(lens)]

        def steady_engine(policy):
            """A queue that never drains, `batch` slots, after new_tokens steps (so slots are at mixed
            phases and refilled as they free)."""
            eng = Engine(model, EngineConfig(max_num_seqs=B, max_model_len=args.prompt_len + 2 * args.new_tokens,
                                             depth_policy=policy, threshold=thr))
            for p, q in zip(reqs, sp):
                eng.add_request(p, q)
            for _ in range(args.new_tokens):
                eng.step()
            return eng

        if args.profile or args.parts:
            print(f"\n## batch {B}: {args.profile or args.parts} steady-state steps\n")
            if args.parts:
                parts(steady_engine, model, args.parts)
            else:
                profile(steady_engine, model, args.profile)
            continue

        def run_engine(policy):
            """Steady state: tokens over 2 x new_tokens steps of `steady_engine`."""
            eng = steady_engine(policy)
            t0, n, deep = time.perf_counter(), 0, 0
            for _ in range(2 * args.new_tokens):
                for e in eng.step():
                    n += e.token_id >= 0
                    deep += e.depth >= 2
            return n, deep / max(n, 1), time.perf_counter() - t0

        def run_hf():  # static batches of B, the paper's sampling defaults
            n, t0 = 0, time.perf_counter()
            for w in range(min(3, args.waves)):  # (the queue holds `waves` batches)
                ids = torch.tensor(reqs[w * B:(w + 1) * B], device=dev)
                with torch.no_grad():
                    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                      do_sample=args.temperature > 0, temperature=args.temperature or None,
                                      top_p=0.95, top_k=20, eos_token_id=None, pad_token_id=0)
                n += out[:, args.prompt_len:].numel()
            return n, 0.0, time.perf_counter() - t0

        def run_static(policy):
            """Static batches, as HF generate runs them: the same waves of B prompts, every request
            new_tokens long, admitted together and timed from the prefill to the last token."""
            n, deep, t0 = 0, 0, time.perf_counter()
            for w in range(min(3, args.waves)):
                eng = Engine(model, EngineConfig(max_num_seqs=B, max_model_len=args.prompt_len + args.new_tokens,
                                                 depth_policy=policy, threshold=thr))
                for i, p in enumerate(reqs[w * B:(w + 1) * B]):
                    eng.add_request(p, SP(max_tokens=args.new_tokens, ignore_eos=True, seed=w * B + i,
                                          temperature=args.temperature))
                while eng.has_work():
                    for e in eng.step():
                        n += e.token_id >= 0
                        deep += e.depth >= 2
            return n, deep / max(n, 1), time.perf_counter() - t0

        runs = {"standard": lambda: run_engine("standard"), "tah": lambda: run_engine("decider"),
                "always_think": lambda: run_engine("always_think"), "hf_generate": run_hf,
                "standard static": lambda: run_static("standard"), "tah static": lambda: run_static("decider")}
        rates: dict[str, list[float]] = {k: [] for k in runs}  # tokens/s per repeat
        info: dict[str, tuple] = {}
        for k, f in runs.items():  # warm-up
            f()
        for _ in range(args.repeats):
            for k, f in runs.items():
                info[k] = f()  # (tokens, share at depth 2, seconds); .tolist() in each step syncs CUDA
                rates[k].append(info[k][0] / info[k][2])
        tps = {k: statistics.median(v) for k, v in rates.items()}
        for k in runs:  # static rows against the static Standard (HF generate's own setting)
            ref = tps["standard static"] if k.endswith("static") else tps["standard"]
            print(f"| {B} | {k} | {tps[k]:.0f} | {info[k][1]:.3f} | {tps[k] / ref:.2f} |", flush=True)
        print(f"| {B} | Standard ÷ HF generate: steady state {tps['standard'] / tps['hf_generate']:.2f}, static batch "
              f"{tps['standard static'] / tps['hf_generate']:.2f} | | | |", flush=True)


if __name__ == "__main__":
    main()
