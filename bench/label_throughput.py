"""Labelling throughput: one reference-model Ray actor vs a plain forward pass, same model, same batches.

The actor runs what jobs/label.py's actors run (ReferenceLabeler: micro-batched forward, per-token
mismatch / CE / entropy, oracle depths, numpy out) on pre-tokenized batches of the shipped task; the
baseline runs only `model(input_ids, attention_mask)` on the identical micro-batches in this process.
Prints tokens/s of both and the ratio (target >= 0.9).

    python bench/label_throughput.py [--samples 384 --batch-size 32 --hidden 512 --layers 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from jobs.common import init_ray  # (before ray: keeps it on 127.0.0.1)
import numpy as np
import ray
import torch

from tah.assets import shipped_task, shipped_tokenizer
from tah.data.labeling import ReferenceLabeler
from tah.data.openr1 import iter_samples
from tah.testing import tiny_qwen3
from tah.tokenizer import load_tokenizer, tokenize_chat


class ForwardOnly(ReferenceLabeler):
    """The same actor class, but only the forward pass (returns a count, not the logits, so that Ray
    ships nothing big back): isolates what the Ray boundary itself costs."""

    def forward_only(self, seqs: list) -> int:
        return len(self.logits(seqs))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    tok = load_tokenizer(shipped_tokenizer())
    samples = [s for _, s in zip(range(args.samples), iter_samples(shipped_task()))]
    seqs = [tokenize_chat(tok, s.messages) for s in samples]
    batches = []
    for i in range(0, len(seqs), args.batch_size):
        part = seqs[i:i + args.batch_size]
        ids = np.empty(len(part), dtype=object)
        ids[:] = [np.asarray(a, dtype=np.int32) for a, _ in part]
        mask = np.empty(len(part), dtype=object)
        mask[:] = [np.asarray(m, dtype=np.int8) for _, m in part]
        batches.append({"input_ids": ids, "assistant_mask": mask, "status": np.array([""] * len(part), dtype=object)})
    n_tokens = sum(len(a) for a, _ in seqs)
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_qwen3(vocab_size=len(tok), hidden_size=args.hidden, num_layers=args.layers, num_heads=8,
                           num_kv_heads=4, head_dim=args.hidden // 8, intermediate_size=3 * args.hidden)
        model.save_pretrained(tmp)
        init_ray(num_cpus=2)
        # Ray caps an actor's torch threads at its CPU count: give it the same cores as the baseline.
        actor = ray.remote(num_cpus=torch.get_num_threads())(ForwardOnly).remote(tmp)
        ray.get([actor.__call__.remote(b) for b in batches[:1]])  # warm-up (model load, first call)
        plain = ReferenceLabeler(tmp)  # same micro-batching, forward only

        def run_actor() -> float:
            t0 = time.perf_counter()
            ray.get([actor.__call__.remote(b) for b in batches])
            return time.perf_counter() - t0

        def run_actor_forward_only() -> float:
            t0 = time.perf_counter()
            ray.get([actor.forward_only.remote(list(b["input_ids"])) for b in batches])
            return time.perf_counter() - t0

        def run_plain() -> float:
            t0 = time.perf_counter()
            for b in batches:
                plain.logits(list(b["input_ids"]))  # forward only, identical micro-batches
            return time.perf_counter() - t0

        run_plain()
        t_actor = min(run_actor() for _ in range(args.repeats))
        t_plain = min(run_plain() for _ in range(args.repeats))
        t_actor_fwd = min(run_actor_forward_only() for _ in range(args.repeats))
    res = {"samples": len(seqs), "tokens": n_tokens, "actor_tok_s": n_tokens / t_actor,
           "plain_forward_tok_s": n_tokens / t_plain, "actor_forward_only_tok_s": n_tokens / t_actor_fwd,
           "ratio": t_plain / t_actor, "labelling_overhead_inside_actor": t_actor / t_actor_fwd - 1}
    print(f"# labelling throughput, Qwen3 hidden {args.hidden} x {args.layers} layers, vocab {len(tok)}, "
          f"{len(seqs)} samples / {n_tokens} tokens, batches of {args.batch_size}, CPU")
    print("| path | tokens/s |\n|---|---|")
    print(f"| one ReferenceLabeler actor (forward + oracle stats) | {res['actor_tok_s']:.0f} |")
    print(f"| plain forward, same batches, in this process | {res['plain_forward_tok_s']:.0f} |")
    print(f"| the same actor, forward only (Ray's own cost) | {res['actor_forward_only_tok_s']:.0f} |")
    print(f"ratio actor / plain = {res['ratio']:.3f} (target >= 0.9); labelling work inside the actor adds "
          f"{100 * res['labelling_overhead_inside_actor']:.1f}% over its own forward")
    print(json.dumps(res))
    ray.shutdown()


if __name__ == "__main__":
    main()
