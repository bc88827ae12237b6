"""Batches from oracle-label rows: depths per method, labels, length buckets and packing.

A label row (jobs/label.py's Parquet) holds input_ids, assistant_mask and the reference statistics;
depths come from the rules in tah.oracle (row_depths), so one labelled set serves every method and max depth:
standard -> all 1; always_think -> every token (the prompt too) at max depth; tah -> the oracle's depths
(re-binned from the stored CE for max_depth > 2, or another metric).

Padding wastes compute, so batches are built either by length buckets (similar lengths together,
within a token budget) or by packing several samples into one row with `segment_ids` (attention
and targets never cross samples; tested in tests/test_model.py).

    python -c "from tah.train.batching import length_buckets; print(length_buckets([5, 9, 6, 30, 31], 64))"
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import torch

from ..oracle import labelled_positions, row_depths, row_labels

def sorted_windows(order: Sequence[int], lengths: Sequence[int], window: int) -> list[list[int]]:
    """`order` cut into windows of `window` indices, each sorted by length: the one length-bucketing
    rule (similar lengths batched together while an epoch still mixes across windows)."""
    return [sorted(order[w:w + window], key=lambda i: lengths[i]) for w in range(0, len(order), window)]


def length_buckets(lengths: Sequence[int], max_batch_tokens: int, seed: int = 0,
                   window: int = 256) -> list[list[int]]:
    """Index batches of similar lengths whose padded size fits `max_batch_tokens`; batch order
    shuffled by `seed`. Sorting happens within windows of `window` samples, so an epoch still mixes."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches: list[list[int]] = []
    for chunk in sorted_windows(order, lengths, window):
        cur: list[int] = []
        for i in chunk:
            if lengths[i] > max_batch_tokens:
                raise ValueError(f"sample {i} has {lengths[i]} tokens > max_batch_tokens={max_batch_tokens}")
            if cur and (len(cur) + 1) * lengths[i] > max_batch_tokens:
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
    rng.shuffle(batches)
    return batches


def pack(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """First-fit-decreasing packing of samples into rows of at most `row_tokens` tokens."""
    rows: list[list[int]] = []
    space: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > row_tokens:
            raise ValueError(f"sample {i} has {lengths[i]} tokens > row_tokens={row_tokens}")
        for r, free in enumerate(space):
            if lengths[i] <= free:
                rows[r].append(i)
                space[r] -= lengths[i]
                break
        else:
            rows.append([i])
            space.append(row_tokens - lengths[i])
    return rows


def collate(rows: Sequence[dict[str, Any]], method: str, max_depth: int, metric: str = "mismatch",
            packed_rows: list[list[int]] | None = None, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Label rows -> right-padded tensors: input_ids, attention_mask, labels, depths, positions
    (the labelled positions, for the decider loss) and, when `packed_rows` groups samples into
    rows, segment_ids."""
    groups = packed_rows if packed_rows is not None else [[i] for i in range(len(rows))]
    per = []
    for g in groups:
        parts = [(torch.as_tensor(rows[i]["input_ids"], dtype=torch.long), row_labels(rows[i]),
                  row_depths(rows[i], method, max_depth, metric),
                  labelled_positions(torch.as_tensor(rows[i]["assistant_mask"])), torch.full(
                      (len(rows[i]["input_ids"]),), k, dtype=torch.long)) for k, i in enumerate(g)]
        per.append([torch.cat(cols) for cols in zip(*parts)])
    B, T = len(per), max(len(p[0]) for p in per)
    out = {"input_ids": torch.full((B, T), pad_id, dtype=torch.long),
           "attention_mask": torch.zeros(B, T, dtype=torch.long), "labels": torch.full((B, T), -100, dtype=torch.long),
           "depths": torch.ones(B, T, dtype=torch.long), "positions": torch.zeros(B, T, dtype=torch.bool),
           "segment_ids": torch.full((B, T), -1, dtype=torch.long)}
    for b, (ids, lab, dep, pos, seg) in enumerate(per):
        n = len(ids)
        out["input_ids"][b, :n], out["labels"][b, :n], out["depths"][b, :n] = ids, lab, dep
        out["attention_mask"][b, :n], out["positions"][b, :n], out["segment_ids"][b, :n] = 1, pos, seg
    if packed_rows is None:
        del out["segment_ids"]
    return out
