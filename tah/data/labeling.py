"""The steps of oracle labelling as plain callables over column batches (dict of numpy arrays).

jobs/label.py runs them with Ray Data: `to_raw`, `normalize_batch`, `keep_ids` and `tokenize_batch` as CPU tasks,
`ReferenceLabeler` in a pool of actors (the reference model loaded once per actor), `shard_table`
to assemble one shard's Parquet table. Nothing here imports Ray, so the same code labels samples in
a plain loop (`label_samples`), which is what the tests compare the Ray job against.

    python -c "from tah.data.labeling import SHARD_SCHEMA; print(SHARD_SCHEMA)"
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from .. import storage
from ..oracle import batch_token_stats, labelled_positions, oracle_depths, token_stats
from ..tokenizer import MalformedSample, load_tokenizer, tokenize_chat
from .openr1 import Sample, is_validation, normalize_row

SHARD_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("domain", pa.string()), ("is_validation", pa.bool_()),
    ("input_ids", pa.list_(pa.int32())), ("assistant_mask", pa.list_(pa.int8())),
    ("depth", pa.list_(pa.int8())), ("ref_mismatch", pa.list_(pa.int8())),
    ("ref_ce", pa.list_(pa.float32())), ("ref_entropy", pa.list_(pa.float32())),
    ("num_tokens", pa.int32()), ("num_labelled", pa.int32()), ("num_hard", pa.int32()),
    ("extra", pa.string()),
])


def shard_of(sid: str, num_shards: int) -> int:
    return int(hashlib.sha1(f"shard:{sid}".encode()).hexdigest()[:8], 16) % num_shards


def shard_name(index: int, num_shards: int) -> str:
    return f"shard-{index:05d}-of-{num_shards:05d}.parquet"


def to_raw(batch: dict[str, np.ndarray], domain: str, jsonl: bool) -> dict[str, np.ndarray]:
    """Source rows -> {raw: JSON text of the row, domain}. JSON-lines arrive as a `text` column; a
    line that does not parse becomes '{}' and is counted as malformed downstream."""
    if jsonl:
        raws = []
        for line in batch["text"]:
            try:
                json.loads(line)
                raws.append(str(line))
            except ValueError:
                raws.append("{}")
    else:
        n = len(next(iter(batch.values())))
        raws = [json.dumps({k: _plain(v[i]) for k, v in batch.items()}, ensure_ascii=False, default=str)
                for i in range(n)]
    return {"raw": _objects(raws), "domain": _objects([domain] * len(raws))}


def normalize_batch(batch: dict[str, np.ndarray], num_shards: int, validation_fraction: float) -> dict[str, np.ndarray]:
    """{raw, domain} -> id, domain, shard, is_validation, messages/extra as JSON, status ('' or a reason)."""
    out: dict[str, list] = {k: [] for k in ("id", "domain", "shard", "is_validation", "messages", "extra", "status")}
    for raw, domain in zip(batch["raw"], batch["domain"]):
        s, reason = normalize_row(json.loads(raw), str(domain))
        out["domain"].append(str(domain))
        out["status"].append(reason or "")
        out["id"].append(s.id if s else "")
        out["shard"].append(shard_of(s.id, num_shards) if s else -1)
        out["is_validation"].append(bool(s and is_validation(s.id, validation_fraction)))
        out["messages"].append(json.dumps(s.messages, ensure_ascii=False) if s else "")
        out["extra"].append(json.dumps(s.extra, ensure_ascii=False, default=str, sort_keys=True) if s else "")
    return {k: (np.array(v, dtype=np.int64) if k == "shard" else np.array(v, dtype=bool) if k == "is_validation"
                else _objects(v)) for k, v in out.items()}


def keep_ids(batch: dict[str, np.ndarray], ids: frozenset[str]) -> dict[str, np.ndarray]:
    """Only the rows whose sample id is in `ids` (this wave's selected samples)."""
    sel = np.array([str(i) in ids for i in batch["id"]], dtype=bool)
    return {k: v[sel] for k, v in batch.items()}


def _plain(x: Any) -> Any:
    """numpy/arrow scalars and arrays -> Python objects (Ray hands rows over as numpy)."""
    if isinstance(x, np.ndarray):
        return [_plain(v) for v in x.tolist()] if x.dtype == object else x.tolist()
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, np.generic):
        return x.item()
    return x


def _objects(items: list) -> np.ndarray:
    """A 1-D object array (numpy would otherwise try to stack equal-length lists into 2-D)."""
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


def tokenize_batch(batch: dict[str, np.ndarray], tokenizer_path: str, max_response_tokens: int) -> dict[str, np.ndarray]:
    """messages -> input_ids and assistant_mask (object arrays); status set for too-long / template errors."""
    tokenizer = load_tokenizer(tokenizer_path)
    ids, masks, status = [], [], list(batch["status"])
    for i, msgs in enumerate(batch["messages"]):
        a: list[int] = []
        m: list[int] = []
        if not status[i]:
            try:
                a, m = tokenize_chat(tokenizer, json.loads(msgs), max_response_tokens)
            except MalformedSample as e:
                status[i] = e.reason
        ids.append(np.asarray(a, dtype=np.int32))
        masks.append(np.asarray(m, dtype=np.int8))
    out = dict(batch)
    out.update(input_ids=_objects(ids), assistant_mask=_objects(masks), status=_objects(status))
    return out


class ReferenceLabeler:
    """Holds the reference model; labels a batch of tokenized samples with per-token oracle data."""

    def __init__(self, model_path: str, max_depth: int = 2, metric: str = "mismatch", dtype: str = "float32",
                 device: str | None = None, max_batch_tokens: int = 16384) -> None:
        from transformers import AutoModelForCausalLM

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(storage.local_copy(model_path), dtype=getattr(torch, dtype))
        self.model.to(self.device).eval()
        self.max_depth, self.metric, self.max_batch_tokens = max_depth, metric, max_batch_tokens

    def micro_batches(self, seqs: list[np.ndarray]) -> list[list[int]]:
        """Indices grouped by similar length, each group within max_batch_tokens once padded."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        groups, i = [], 0
        while i < len(order):
            j = i + 1
            while j < len(order) and (j + 1 - i) * len(seqs[order[j]]) <= self.max_batch_tokens:
                j += 1
            groups.append(order[i:j])
            i = j
        return groups

    @torch.no_grad()
    def forward(self, seqs: list[np.ndarray], group: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced logits of one micro-batch (right padding): logits (b, T, V), ids (b, T), lengths (b,)."""
        lengths = torch.tensor([len(seqs[g]) for g in group], dtype=torch.long)
        T = int(lengths.max())
        ids = torch.zeros(len(group), T, dtype=torch.long)
        for r, g in enumerate(group):
            ids[r, :len(seqs[g])] = torch.as_tensor(seqs[g], dtype=torch.long)
        mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
        ids, mask, lengths = ids.to(self.device), mask.to(self.device), lengths.to(self.device)
        return self.model(input_ids=ids, attention_mask=mask).logits, ids, lengths

    def logits(self, seqs: list[np.ndarray]) -> list[torch.Tensor]:
        """Each sequence's logits (T_i, V), computed in micro-batches (the plain-forward baseline)."""
        out: list[torch.Tensor | None] = [None] * len(seqs)
        for group in self.micro_batches(seqs):
            logits, _, _ = self.forward(seqs, group)
            for r, g in enumerate(group):
                out[g] = logits[r, :len(seqs[g])]
        return out  # type: ignore[return-value]

    def _finish(self, stats: dict[str, torch.Tensor], assistant_mask: np.ndarray) -> dict[str, Any]:
        """Per-row stats (T,) -> oracle depths and the stored columns."""
        am = torch.as_tensor(np.asarray(assistant_mask), device=stats["ce"].device)
        depth = oracle_depths(stats["mismatch"], stats["ce"], stats["entropy"], am, self.max_depth, self.metric)
        return {"depth": depth.to(torch.int8).cpu().numpy(), "ref_mismatch": stats["mismatch"].to(torch.int8).cpu().numpy(),
                "ref_ce": stats["ce"].cpu().numpy(), "ref_entropy": stats["entropy"].cpu().numpy(),
                "num_labelled": int(labelled_positions(am).sum()), "num_hard": int((depth > 1).sum())}

    def label(self, input_ids: np.ndarray, assistant_mask: np.ndarray, logits: torch.Tensor) -> dict[str, Any]:
        """One sequence's labels from its logits (T, V) (the plain-loop reference path)."""
        ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long, device=logits.device)
        return self._finish(token_stats(logits, ids), assistant_mask)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = [i for i, s in enumerate(batch["status"]) if not s]
        res: list[dict[str, Any] | None] = [None] * len(batch["status"])
        seqs = [np.asarray(batch["input_ids"][i]) for i in ok]
        for group in self.micro_batches(seqs):
            logits, ids, lengths = self.forward(seqs, group)
            st = batch_token_stats(logits, ids, lengths)  # whole micro-batch at once, logits still hot
            for r, g in enumerate(group):
                n = int(lengths[r])
                res[ok[g]] = self._finish({k: v[r, :n] for k, v in st.items()}, batch["assistant_mask"][ok[g]])
        out = dict(batch)
        empty = {"depth": np.zeros(0, np.int8), "ref_mismatch": np.zeros(0, np.int8), "ref_ce": np.zeros(0, np.float32),
                 "ref_entropy": np.zeros(0, np.float32), "num_labelled": 0, "num_hard": 0}
        for key in empty:
            vals = [(r or empty)[key] for r in res]
            out[key] = _objects(vals) if isinstance(empty[key], np.ndarray) else np.array(vals, dtype=np.int64)
        return out


def shard_table(rows: dict[str, np.ndarray]) -> tuple[pa.Table, dict[str, Any]]:
    """One shard's rows (a column batch) -> (Parquet table sorted by sample id, shard stats).

    Rows with a status are counted, not written; repeated ids (identical duplicates) are written once.
    """
    stats: dict[str, Any] = {"malformed": Counter(), "samples": Counter(), "labelled": Counter(), "hard": Counter(),
                             "tokens": 0, "validation": 0}
    keep: dict[str, int] = {}
    for i, sid in enumerate(rows["id"]):
        if rows["status"][i]:
            stats["malformed"][rows["status"][i]] += 1
        elif sid in keep:
            stats["malformed"]["duplicate"] += 1
        else:
            keep[sid] = i
    idx = [keep[s] for s in sorted(keep)]
    cols: dict[str, list] = {name: [] for name in SHARD_SCHEMA.names}
    for i in idx:
        d = str(rows["domain"][i])
        n = len(rows["input_ids"][i])
        cols["sample_id"].append(str(rows["id"][i]))
        cols["domain"].append(d)
        cols["is_validation"].append(bool(rows["is_validation"][i]))
        for k in ("input_ids", "assistant_mask", "depth", "ref_mismatch", "ref_ce", "ref_entropy"):
            cols[k].append(np.asarray(rows[k][i]).tolist())
        cols["num_tokens"].append(n)
        cols["num_labelled"].append(int(rows["num_labelled"][i]))
        cols["num_hard"].append(int(rows["num_hard"][i]))
        cols["extra"].append(str(rows["extra"][i]))
        stats["samples"][d] += 1
        stats["labelled"][d] += int(rows["num_labelled"][i])
        stats["hard"][d] += int(rows["num_hard"][i])
        stats["tokens"] += n
        stats["validation"] += bool(rows["is_validation"][i])
    stats = {k: dict(v) if isinstance(v, Counter) else v for k, v in stats.items()}
    table = pa.Table.from_pydict(cols, schema=SHARD_SCHEMA)
    return table.replace_schema_metadata({"tah_shard_stats": json.dumps(stats, sort_keys=True)}), stats


def table_bytes(table: pa.Table) -> bytes:
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def label_samples(samples: list[Sample], tokenizer: Any, labeler: ReferenceLabeler,
                  max_response_tokens: int = 8192) -> dict[str, dict[str, Any]]:
    """The plain-loop reference: {sample id: labels} for samples in hand, one forward per sample."""
    out = {}
    for s in samples:
        try:
            ids, mask = tokenize_chat(tokenizer, s.messages, max_response_tokens)
        except MalformedSample:
            continue
        with torch.no_grad():
            t = torch.tensor([ids], device=labeler.device)
            logits = labeler.model(input_ids=t).logits[0]
        out[s.id] = {"input_ids": ids, "assistant_mask": mask, **labeler.label(np.array(ids), np.array(mask), logits)}
    return out


def concat_batches(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Column batches -> one batch. Per-token columns become 1-D object arrays of rows: Ray hands a
    ragged column back as a 2-D array when all of a batch's rows happen to have the same length."""
    out = {}
    for k in parts[0]:
        vals = [p[k] for p in parts]
        ragged = any(v.dtype == object or v.ndim > 1 for v in vals)
        out[k] = _objects([row for v in vals for row in v]) if ragged else np.concatenate(vals)
    return out


def write_shard(batch: dict[str, np.ndarray], output: str, num_shards: int) -> dict[str, np.ndarray]:
    """All rows of one shard -> one Parquet object, committed atomically (visible only when complete)."""
    shard = int(batch["shard"][0])
    if not (batch["shard"] == shard).all():
        raise ValueError("write_shard got rows of several shards")
    table, stats = shard_table(batch)
    storage.write_bytes_atomic(storage.join(output, shard_name(shard, num_shards)), table_bytes(table))
    return {"shard": np.array([shard]), "stats": _objects([json.dumps(stats, sort_keys=True)])}


def empty_shard_batch() -> dict[str, np.ndarray]:
    cols = ("id", "domain", "status", "is_validation", "input_ids", "assistant_mask", "depth", "ref_mismatch",
            "ref_ce", "ref_entropy", "num_labelled", "num_hard", "extra")
    return {k: _objects([]) for k in cols}


def read_shard_stats(uri: str) -> dict[str, Any]:
    """The stats a committed shard carries in its Parquet metadata."""
    import pyarrow.parquet as pq

    fs, path = storage.pyarrow_fs(uri)
    meta = pq.read_schema(path, filesystem=fs).metadata or {}
    return json.loads(meta[b"tah_shard_stats"])


def label_files(output: str) -> list[str]:
    """The committed shard files of a label output, in name order."""
    return sorted(f for f in storage.list_files(output, (".parquet",)) if "/shard-" in f.replace("\\", "/"))


def read_labels(output: str) -> pa.Table:
    """Every committed shard of a label output as one table (pruning's calibration, analysis)."""
    import pyarrow.parquet as pq

    files = label_files(output)
    if not files:
        return SHARD_SCHEMA.empty_table()
    tables = []
    for f in files:
        fs, path = storage.pyarrow_fs(f)
        tables.append(pq.read_table(path, filesystem=fs).replace_schema_metadata(None))
    return pa.concat_tables(tables)


def read_validation_rows(output: str, max_tokens: int | None = None) -> list[dict[str, Any]]:
    """The validation rows of a label output as dicts, in sample-id order (the same rows every
    time, whatever the shard layout), optionally only those of at most `max_tokens` tokens."""
    rows = sorted((r for r in read_labels(output).to_pylist() if r["is_validation"]), key=lambda r: r["sample_id"])
    return [r for r in rows if max_tokens is None or len(r["input_ids"]) <= max_tokens]
