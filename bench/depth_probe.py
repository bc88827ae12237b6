"""Is a task family depth-bound at this scale? Train the same small transformer from scratch on it once
with one pass over its layers and once with two (the layers looped, weights shared: the extra depth
AlwaysThink buys), then compare greedy exact-answer accuracy on unseen questions.

    python bench/depth_probe.py --family mental --ops 2 --steps 1500         # ~4 + ~8 min on 2 CPUs
    python bench/depth_probe.py --family chain --ops 3 --train 8000           # pointer chasing, 4 lookups

    python bench/depth_probe.py --family swaps --ops 12 --train 20000          # state tracking, 12 swaps
    python bench/depth_probe.py --family addn --ops 4 --train 30000           # four 2-digit numbers' sum
    python bench/depth_probe.py --family addn --ops 4 --train 30000 --steps 4000 --finetune-steps 300

`--finetune-steps N` trains as the pipeline trains AlwaysThink: one pass for --steps (the Standard
base), then N steps more from those weights with one pass and with two (Standard's and AT's SFT).

Families: `mental` = the shipped positive control's arithmetic (`tah.data.tinytask.make_mental`, answer
emitted directly); `chain` = shuffled variable assignments `c=b;a=7;b=a;c?` (answer = the value reached
after `ops + 1` lookups; one distractor pair, so chance is about 0.5); `swaps` = a ball under one of three
cups after `ops` swaps (`a:ab ca bc?`, chance 1/3); `addn` = the sum of `ops` two-digit numbers, most
significant digit first (`47+85+36+12=180;`). Character-level, 8 pre-norm layers of
width 96 (the shipped base's shape), AdamW, cosine schedule. It prints one line per pass count and the
difference; what it measured is in docs/results.md (§ Setup C, What was tried).
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import time
from typing import NamedTuple

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


def addn(rng: random.Random, ops: int) -> tuple[str, str]:
    """The sum of `ops` two-digit numbers, written most significant digit first: the first digit needs
    every carry, so it is the whole computation; the space (90^ops questions) is too big to memorise."""
    xs = [rng.randint(10, 99) for _ in range(ops)]
    return "+".join(map(str, xs)) + "=", f"{sum(xs)};"


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


class Data(NamedTuple):
    train: list[tuple[str, str]]
    test: list[tuple[str, str]]
    chars: list[str]
    stoi: dict[str, int]
    T: int
    """The longest question + answer, plus one."""


def data(args: argparse.Namespace) -> Data:
    make = {"mental": mental, "chain": chain, "swaps": swaps, "addn": addn}[args.family]
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
    return Data(train, test, chars, stoi, max(len(q + a) for q, a in train + test) + 1)


def fresh_model(args: argparse.Namespace, d: Data, passes: int) -> Looped:
    torch.manual_seed(args.seed)
    return Looped(len(d.chars) + 1, args.width, args.layers, passes, d.T)


def train_steps(model: Looped, args: argparse.Namespace, d: Data, steps: int, lr: float, offset: int = 0) -> float:
    """AdamW with warmup and a cosine decay over `steps`; the loss on the answer only. Returns the last loss."""
    train, stoi, T = d.train, d.stoi, d.T
    opt = torch.optim.AdamW(model.parameters(), lr, weight_decay=0.01)
    B, loss = args.batch, torch.zeros(())
    model.train()
    for step in range(steps):
        batch = random.Random(offset + step + 1000 * args.seed).sample(train, B)
        x, y = torch.zeros(B, T, dtype=torch.long), torch.full((B, T), -100)
        for i, (q, a) in enumerate(batch):
            ids = [stoi[c] for c in q + a]
            x[i, :len(ids)] = torch.tensor(ids)
            y[i, len(q) - 1:len(ids) - 1] = torch.tensor(ids[len(q):])
        for g in opt.param_groups:
            g["lr"] = lr * min(1, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def accuracy(model: Looped, d: Data) -> float:
    """Greedy exact answers on the unseen questions."""
    test, chars, stoi = d.test, d.chars, d.stoi
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
    return correct / len(test)


def run(args: argparse.Namespace, passes: int) -> float:
    d = data(args)
    model = fresh_model(args, d, passes)
    t0 = time.time()
    loss = train_steps(model, args, d, args.steps, args.lr)
    acc = accuracy(model, d)
    print(f"{args.family} ops={args.ops} passes={passes}: train {len(d.train)} questions, final loss "
          f"{loss:.3f}, exact answers {acc:.3f} of {len(d.test)} unseen ({time.time() - t0:.0f} s)", flush=True)
    return acc


def finetune(args: argparse.Namespace) -> None:
    """As the pipeline trains AlwaysThink: one pass for --steps (the Standard base), then --finetune-steps
    more at lr --finetune-lr once with one pass (Standard's SFT) and once with the layers looped twice
    (AlwaysThink's SFT, every weight trained), from the same weights."""
    d = data(args)
    base = fresh_model(args, d, 1)
    t0 = time.time()
    loss = train_steps(base, args, d, args.steps, args.lr)
    print(f"{args.family} ops={args.ops} base (one pass, {args.steps} steps): loss {loss:.3f}, exact answers "
          f"{accuracy(base, d):.3f} ({time.time() - t0:.0f} s)", flush=True)
    accs = {}
    for passes in (1, 2):
        m = copy.deepcopy(base)
        m.passes = passes
        loss = train_steps(m, args, d, args.finetune_steps, args.finetune_lr, offset=10 ** 6)
        accs[passes] = accuracy(m, d)
        print(f"  + {args.finetune_steps} steps with {passes} pass(es): loss {loss:.3f}, exact answers "
              f"{accs[passes]:.3f}", flush=True)
    print(f"fine-tuned two passes - one pass: {accs[2] - accs[1]:+.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", choices=("mental", "chain", "swaps", "addn"), default="mental")
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
    ap.add_argument("--finetune-steps", type=int, default=0,
                    help="instead: pretrain one pass, then fine-tune this many steps with one and with two passes")
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.finetune_steps:
        return finetune(args)
    one, two = run(args, 1), run(args, 2)
    print(f"two passes - one pass: {two - one:+.3f} (a depth-bound family at this scale shows a clear gain)")


if __name__ == "__main__":
    main()
