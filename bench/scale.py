"""Scaling on one machine, 1 vs 2 of each Ray unit, measured side by side in one run through the real jobs:
label throughput vs reference actors (jobs/label.py), training tokens/s vs Train workers (jobs/train.py,
DeepSpeed ZeRO-2 over gloo), serving tokens/s vs Serve replicas (serve/tah.py, closed-loop HTTP clients).

    python bench/scale.py                       # a random Qwen3 (hidden 256 x 4 layers), the shipped task
    python bench/scale.py --hidden 512 --layers 8 --samples 96

Prints one table of tokens/s per unit count and the 2 ÷ 1 ratio. On a 2-core machine the ideal ratio
is at most 2 and each unit's torch threads compete for the same cores (the label actors share the CPU
left beside Ray Data's read tasks: 1 x 1 CPU vs 2 x 0.5): read the ratio as what a second unit buys
*here*; on a cluster each unit brings its own GPU (see the README's scale notes).
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

from jobs.common import init_ray  # (before ray: keeps it on 127.0.0.1)
from tah.assets import shipped_task, shipped_tokenizer


def label_tok_s(reference: str, out: Path, actors: int, samples: int, actor_cpus: float) -> float:
    from jobs.label import run
    from jobs.label import LabelConfig

    t0 = time.perf_counter()
    run(LabelConfig(reference_model=reference, source=shipped_task(),
                    tokenizer=shipped_tokenizer(), output=str(out), samples_per_domain=samples,
                    num_shards=4, shards_per_wave=4, num_actors=actors, actor_cpus=actor_cpus, batch_size=16,
                    validation_fraction=0.1))
    seconds = time.perf_counter() - t0
    return json.loads((out / "manifest.json").read_text())["tokens"] / seconds


def train_tok_s(base: str, labels: str, storage: Path, workers: int, steps: int) -> float:
    """Aggregate tokens/s over all workers at the last step (the loop's own counter, warm-up included)."""
    from jobs.train import TrainConfig, run
    from tah.config import from_dict

    cfg = from_dict(TrainConfig, {"method": "standard", "base_model": base, "labels": labels,
                                  "storage_path": str(storage), "name": f"w{workers}", "num_workers": workers,
                                  "global_batch": 8, "micro_batch": 8 // workers, "max_steps": steps,
                                  "eval_every": steps, "checkpoint_every": steps, "max_length": 1024,
                                  "model": {"max_depth": 1}})
    run(cfg)
    last = (storage / f"w{workers}" / "tensorboard" / "standard" / "metrics.jsonl").read_text().splitlines()[-1]
    return json.loads(last)["tokens_per_s"] * workers


def serve_tok_s(ckpt: str, replicas: int, clients: int, requests: int, max_tokens: int) -> float:
    from ray import serve

    from serve.tah import ServeConfig, deployment
    from tah.engine import EngineConfig

    cfg = ServeConfig(model=ckpt, tokenizer=shipped_tokenizer(),
                      engine=EngineConfig(max_num_seqs=clients, max_model_len=64 + max_tokens),
                      min_replicas=replicas, max_replicas=replicas, max_ongoing_requests=clients, num_cpus=1)
    port = 18100 + os.getpid() % 500 + replicas
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(deployment(cfg), name="tah", route_prefix="/")
    body = json.dumps({"model": "tah", "prompt": list(range(5, 21)), "max_tokens": max_tokens,
                       "ignore_eos": True}).encode()

    def one(_: int) -> None:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            r.read()

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(2 * replicas)))  # warm-up: every replica has served
        t0 = time.perf_counter()
        list(pool.map(one, range(requests)))
        seconds = time.perf_counter() - t0
    serve.shutdown()
    return requests * max_tokens / seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=64, help="label samples per domain")
    ap.add_argument("--steps", type=int, default=12, help="training steps per run")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    import ray
    import torch

    from tah import TaHConfig, TaHForCausalLM
    from tah.tokenizer import load_tokenizer
    from tah.testing import tiny_qwen3

    tmp = Path(tempfile.mkdtemp(prefix="tah-scale-"))
    tok = load_tokenizer(shipped_tokenizer())
    h = args.hidden
    base = tiny_qwen3(vocab_size=len(tok), hidden_size=h, num_layers=args.layers, num_heads=8, num_kv_heads=4,
                      head_dim=h // 8, intermediate_size=3 * h, initializer_range=0.02)
    base.save_pretrained(tmp / "base")
    tok.save_pretrained(tmp / "base")
    torch.manual_seed(0)
    TaHForCausalLM.from_backbone(base, TaHConfig(max_depth=2)).save_pretrained(tmp / "tah", tokenizer=tok)
    init_ray(num_cpus=2)
    res: dict[str, dict[int, float]] = {"label (reference actors)": {}, "train (Train workers, ZeRO-2)": {},
                                        "serve (Serve replicas)": {}}
    # The read/tokenize tasks need a CPU beside the actors: on this machine 1 x 1 CPU vs 2 x 0.5 CPU.
    cpus = int(ray.cluster_resources()["CPU"])
    for n in (1, 2):
        res["label (reference actors)"][n] = label_tok_s(str(tmp / "base"), tmp / f"labels{n}", n, args.samples,
                                                         min(1.0, (cpus - 1) / n))
    for n in (1, 2):
        res["train (Train workers, ZeRO-2)"][n] = train_tok_s(str(tmp / "base"), str(tmp / "labels1"), tmp / "runs",
                                                              n, args.steps)
    for n in (1, 2):
        res["serve (Serve replicas)"][n] = serve_tok_s(str(tmp / "tah"), n, args.clients, args.requests,
                                                       args.max_tokens)
    ray.shutdown()
    print(f"\n# scaling 1 -> 2 units on this machine ({os.cpu_count()} CPUs), random Qwen3 hidden {h} x "
          f"{args.layers} layers, vocab {len(tok)}")
    print("| stage | 1 unit tokens/s | 2 units tokens/s | 2 ÷ 1 |\n|---|---|---|---|")
    for k, v in res.items():
        print(f"| {k} | {v[1]:.0f} | {v[2]:.0f} | {v[2] / v[1]:.2f} |")
    print(json.dumps({k: {str(n): x for n, x in v.items()} for k, v in res.items()}))


if __name__ == "__main__":
    main()
