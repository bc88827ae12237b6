"""Is a task family depth-bound at this scale? Train the same small transformer from scratch on it once
with one pass over its layers and once with two (the layers looped, weights shared: the extra depth
AlwaysThink buys), then compare greedy exact-answer accuracy on unseen questions.

    python bench/depth_probe.py --family mental --ops 2 --steps 1500         # ~4 + ~8 min on 2 CPUs
    python bench/depth_probe.py --family chain --ops 3 --train 8000           # pointer chasing, 4 lookups

    python bench/depth_probe.py --family swaps --ops 12 --train 20000          # state tracking, 12 swaps

Families: `mental` = the shipped positive control's arithmetic (`tah.data.tinytask.make_mental`, answer
emitted directly); `chain` = shuffled variable assignments `c=b;a=7;b=a;c?` (answer = the value reached
after `ops + 1` lookups; one distractor pair, so chance is about 0.5); `swaps` = a ball under one of three
cups after `ops` swaps (`a:ab ca bc?`, chance 1/3). Character-level, 8 pre-norm layers of
width 96 (the shipped base's shape), AdamW, cosine schedule. It prints one line per pass count and the
difference; what it measured is in docs/results.md (§ Setup C, What was tried).
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from tah.data.tinytask import make_mental


def mental(rng: random.Random, ops: int) -> tuple[str, str]:
    ex = make_mental(rng, ops, 1)
    return ex["question"].removeprefix("Compute ").split(" in your head")[0] + "=", ex["answer"] + ";"


def chain(rng: random.Random, ops: int) -> tuple[str, str]:
    names = rng.sample("abcdefghjkmnpqrstuvwxyz", ops + 3)
    path, value = names[:ops + 1], rng.randint(0, 9)
    st = [f"{path[0]}={value}"] + [f"{path[i + 1]}={path[i]}" for i in range(ops)]
    st += [f"{names[ops + 1]}={rng.randint(0, 9)}", f"{names[ops + 2]}={names[ops + 1]}"]
    rng.shuffle(st)
    return ";".join(st) + f";{path[-1]}?", f"{value};"


def swaps(rng: random.Random, ops: int) -> tuple[str, str]:
    """Three cups a, b, c; the ball starts under one; `ops` swaps of two cups; which cup holds it? State
    tracking: each swap needs the state before it, so the answer is a chain of `ops` dependent steps."""
    ball, moves = rng.choice("abc"), []
    start = ball
    for _ in range(ops):
        x, y = rng.sample("abc", 2)
        moves.append(x + y)
        ball = y if ball == x else x if ball == y else ball
    return f"{start}:{' '.join(moves)}?", f"{ball};"


class Looped(nn.Module):
    """Pre-norm causal transformer whose layer stack runs `passes` times per forward."""

    def __init__(self, vocab: int, width: int, layers: int, passes: int, max_len: int):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, width), nn.Embedding(max_len, width)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(width, 4, 8 * width // 3, 0.0, batch_first=True,
                                                               norm_first=True) for _ in range(layers))
        self.norm, self.passes = nn.LayerNorm(width), passes

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        h = self.emb(x) + self.pos(torch.arange(x.shape[1]))
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        for _ in range(self.passes):
            for layer in self.layers:
                h = layer(h, src_mask=mask, is_causal=True)
        return self.norm(h) @ self.emb.weight.T


def run(args: argparse.Namespace, passes: int) -> float:
    make = {"mental": mental, "chain": chain, "swaps": swaps}[args.family]
    rng, seen, test, train, misses = random.Random(args.seed), set(), [], [], 0
    while len(test) < args.test or (len(train) < args.train and misses < 20 * args.train):
        # test questions at --ops; training ones at --ops-min .. --ops when given (a curriculum in the data)
        q, a = make(rng, args.ops if len(test) < args.test or args.ops_min is None
                    else rng.randint(args.ops_min, args.ops))
        if q in seen:
            misses += 1
            continue
        seen.add(q)
        (test if len(test) < args.test else train).append((q, a))
    chars = sorted({c for q, a in train + test for c in q + a})
    stoi = {c: i + 1 for i, c in enumerate(chars)}
    T = max(len(q + a) for q, a in train + test) + 1
    torch.manual_seed(args.seed)
    model = Looped(len(chars) + 1, args.width, args.layers, passes, T)
    opt = torch.optim.AdamW(model.parameters(), args.lr, weight_decay=0.01)
    t0, B = time.time(), args.batch
    for step in range(args.steps):
        batch = random.Random(step + 1000 * args.seed).sample(train, B)
        x, y = torch.zeros(B, T, dtype=torch.long), torch.full((B, T), -100)
        for i, (q, a) in enumerate(batch):  # loss on the answer only
            ids = [stoi[c] for c in q + a]
            x[i, :len(ids)] = torch.tensor(ids)
            y[i, len(q) - 1:len(ids) - 1] = torch.tensor(ids[len(q):])
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for q, a in test:
            ids, out = [stoi[c] for c in q], ""
            while len(out) < len(a) + 2 and not out.endswith(";"):
                nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
                out += chars[nxt - 1] if nxt else "?"
                ids.append(nxt)
            correct += out == a
    acc = correct / len(test)
    print(f"{args.family} ops={args.ops} passes={passes}: train {len(train)} questions, final loss "
          f"{loss.item():.3f}, exact answers {acc:.3f} of {len(test)} unseen ({time.time() - t0:.0f} s)", flush=True)
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", choices=("mental", "chain", "swaps"), default="mental")
    ap.add_argument("--ops", type=int, default=2)
    ap.add_argument("--ops-min", type=int, default=None, help="train on ops-min .. ops steps (test: ops)")
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=96)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    one, two = run(args, 1), run(args, 2)
    print(f"two passes - one pass: {two - one:+.3f} (a depth-bound family at this scale shows a clear gain)")


if __name__ == "__main__":
    main()
