"""Serving over HTTP: request throughput and p50/p99 latency at 1, 8 and 32 concurrent clients through
Ray Serve, side by side with the same closed-loop workload on the engine called directly (in the
same process, no HTTP) -- the difference is the HTTP + Serve path's overhead.

    python bench/serve.py                                  # a tiny random TaH checkpoint, CPU
    python bench/serve.py --checkpoint runs/tiny/train/tah/stage2/model --requests 64

Each client sends a request, waits for the whole response, and sends the next (closed loop);
completions of `--max-tokens` tokens (EOS ignored, so every request has the same length).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tah.assets import shipped_tokenizer

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def http_run(url: str, clients: int, n: int, prompt: list[int], max_tokens: int) -> tuple[float, list[float]]:
    body = json.dumps({"model": "tah", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}).encode()

    def one(_: int) -> float:
        t = time.perf_counter()
        req = urllib.request.Request(url + "/v1/completions", data=body, headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            json.loads(r.read())
        return time.perf_counter() - t

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        lat = list(pool.map(one, range(n)))
    return time.perf_counter() - t0, lat


def direct_run(engine, clients: int, n: int, prompt: list[int], max_tokens: int) -> tuple[float, list[float]]:
    """The same closed loop against the engine in this process (one thread steps it)."""
    from tah.engine import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    started: dict[str, float] = {}
    lat: list[float] = []
    sent = 0
    t0 = time.perf_counter()
    for _ in range(min(clients, n)):
        started[engine.add_request(prompt, sp)] = time.perf_counter()
        sent += 1
    while engine.has_work():
        for ev in engine.step():
            if ev.finished:
                lat.append(time.perf_counter() - started.pop(ev.request_id))
                if sent < n:
                    started[engine.add_request(prompt, sp)] = time.perf_counter()
                    sent += 1
    return time.perf_counter() - t0, lat


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=48, help="per concurrency level (at least 2 x clients)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    args = ap.parse_args()
    import ray
    import torch
    from ray import serve

    from jobs.common import init_ray
    from serve.tah import ServeConfig, deployment
    from tah import TaHConfig, TaHForCausalLM
    from tah.engine import Engine, EngineConfig
    from tah.testing import tiny_qwen3

    tmp = tempfile.TemporaryDirectory()
    ckpt = args.checkpoint
    if ckpt is None:
        from tah.tokenizer import load_tokenizer

        tok = load_tokenizer(shipped_tokenizer())
        torch.manual_seed(0)
        model = TaHForCausalLM.from_backbone(tiny_qwen3(vocab_size=len(tok)), TaHConfig(max_depth=2))
        ckpt = str(Path(tmp.name) / "model")
        model.save_pretrained(ckpt, tokenizer=tok)
    slots = max(args.clients)
    engine_cfg = EngineConfig(max_num_seqs=slots, max_model_len=args.prompt_len + args.max_tokens + 8)
    cfg = ServeConfig(model=ckpt, engine=engine_cfg, max_ongoing_requests=2 * slots, max_queued_requests=4 * slots)
    init_ray()
    port = 18000 + os.getpid() % 1000
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(deployment(cfg), name="tah", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    engine = Engine(TaHForCausalLM.from_pretrained(ckpt), engine_cfg)
    prompt = list(range(5, 5 + args.prompt_len))
    http_run(url, 2, 4, prompt, args.max_tokens)  # warm-up
    direct_run(engine, 2, 4, prompt, args.max_tokens)
    print(f"# serving, {ckpt if args.checkpoint else 'tiny random TaH'}, {args.max_tokens} tokens per request, "
          f"prompt {args.prompt_len}, {slots} slots, 1 replica, CPU threads {torch.get_num_threads()}")
    print("| clients | path | req/s | tokens/s | p50 s | p99 s | HTTP ÷ direct throughput |")
    print("|---|---|---|---|---|---|---|")
    for c in args.clients:
        n = max(args.requests, 2 * c)
        res = {"direct": direct_run(engine, c, n, prompt, args.max_tokens),
               "http": http_run(url, c, n, prompt, args.max_tokens)}
        rate = {k: n / v[0] for k, v in res.items()}
        for k, (wall, lat) in res.items():
            print(f"| {c} | {k} | {rate[k]:.2f} | {rate[k] * args.max_tokens:.0f} | {pct(lat, 0.5):.3f} | "
                  f"{pct(lat, 0.99):.3f} | {rate['http'] / rate['direct']:.2f} |", flush=True)
    serve.shutdown()
    ray.shutdown()
    tmp.cleanup()


if __name__ == "__main__":
    main()
