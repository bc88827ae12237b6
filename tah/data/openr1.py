"""Reading Open-R1 Mixture-of-Thoughts (and anything in its format) from a hub id, a local directory
or an s3:// prefix, through the same code path once the rows are in hand.

Layout (as published): `<root>/<domain>/<split>-XXXXX-of-YYYYY.parquet` with domains math / code /
science; `.jsonl` files in the same layout work too (the shipped task, tah/assets/tinytask). Each row holds
`messages`: a list of {role, content}; the assistant turn holds <think>...</think> then the answer.

Rows are normalised into `Sample`s; a malformed row is skipped and counted under its reason
(MALFORMED_REASONS), never raised. A sample's id is a hash of its domain and messages, so it is
stable across runs, machines and worker counts; the 1% validation split is a hash of that id.

    python -c "from tah.data.openr1 import iter_samples; s = next(iter_samples('tah/assets/tinytask', ['math'])); print(s)"
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .. import storage

DOMAINS = ("math", "code", "science")
ROLES = ("system", "user", "assistant")
MALFORMED_REASONS = ("no_messages", "bad_message", "bad_role", "no_user", "no_assistant", "empty_assistant",
                     "undecodable", "duplicate", "template_not_prefix", "too_long")
DATA_SUFFIXES = (".parquet", ".jsonl", ".json")


@dataclass
class Sample:
    """One conversation, normalised."""

    id: str
    domain: str
    messages: list[dict[str, str]]
    extra: dict[str, Any] = field(default_factory=dict)
    """Other columns of the row that graders may need (answer, tests, source, num_tokens)."""


def sample_id(domain: str, messages: list[dict[str, str]]) -> str:
    payload = json.dumps([domain, messages], sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(payload.encode("utf-8")).hexdigest()[:16]


def _hash_unit(text: str) -> float:
    """A stable pseudo-uniform number in [0, 1) from a string."""
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:12], 16) / 16**12


def is_validation(sid: str, fraction: float = 0.01) -> bool:
    """Deterministic held-out split by the sample id (the same for every run and worker count)."""
    return _hash_unit("val:" + sid) < fraction


def normalize_row(row: dict[str, Any], domain: str) -> tuple[Sample | None, str | None]:
    """A raw row -> (Sample, None) or (None, reason)."""
    msgs = row.get("messages")
    if isinstance(msgs, str):  # some exports store the list as a JSON string
        try:
            msgs = json.loads(msgs)
        except ValueError:
            return None, "no_messages"
    if not isinstance(msgs, (list, tuple)) or not msgs:
        return None, "no_messages"
    clean = []
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
            return None, "bad_message"
        if m["role"] not in ROLES:
            return None, "bad_role"
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from a broken decode
            return None, "undecodable"
        if "\ufffd" in m["content"]:
            return None, "undecodable"
        clean.append({"role": m["role"], "content": m["content"]})
    roles = [m["role"] for m in clean]
    if "user" not in roles:
        return None, "no_user"
    if roles[-1] != "assistant":
        return None, "no_assistant"
    if any(m["role"] == "assistant" and not m["content"].strip() for m in clean):
        return None, "empty_assistant"
    extra = {k: v for k, v in row.items() if k != "messages"}
    return Sample(sample_id(domain, clean), domain, clean, extra), None


def is_hub_id(source: str) -> bool:
    return not storage.is_s3(source) and not Path(source).exists() and source.count("/") == 1


def source_files(source: str, domain: str, split: str = "train") -> list[str]:
    """Data files of one domain and split under a local directory or s3:// prefix."""
    files = storage.list_files(storage.join(source, domain), DATA_SUFFIXES)
    picked = [f for f in files if Path(f).name.startswith(f"{split}-") or Path(f).stem == split]
    if not picked and split == "train":
        picked = [f for f in files if not Path(f).name.startswith(("validation", "test"))]
    return picked


def read_file_rows(uri: str) -> Iterator[dict[str, Any]]:
    """Rows of one Parquet or JSON-lines file (local or s3://). Unparseable JSON lines are yielded
    as {} so that they are counted as malformed rather than aborting the read."""
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq

        fs, path = storage.pyarrow_fs(uri)
        yield from pq.read_table(path, filesystem=fs).to_pylist()
        return
    text = storage.read_bytes(uri).decode("utf-8", errors="replace")
    for line in text.splitlines():
        if line.strip():
            try:
                yield json.loads(line)
            except ValueError:
                yield {}


def iter_raw(source: str, domains: list[str] | tuple[str, ...] = DOMAINS, split: str = "train"
             ) -> Iterator[tuple[str, dict[str, Any]]]:
    """(domain, raw row) in a deterministic order: domains as given, files sorted, rows in order."""
    for domain in domains:
        if is_hub_id(source):
            import datasets

            for row in datasets.load_dataset(source, name=domain, split=split, streaming=True):
                yield domain, row
            continue
        files = source_files(source, domain, split)
        if not files:
            raise FileNotFoundError(f"no {split} data files for domain {domain!r} under {source}")
        for f in files:
            for row in read_file_rows(f):
                yield domain, row


def iter_samples(source: str, domains: list[str] | tuple[str, ...] = DOMAINS, split: str = "train",
                 counts: Counter | None = None) -> Iterator[Sample]:
    """Normalised, de-duplicated samples; skipped rows are tallied in `counts` by reason."""
    seen: set[str] = set()
    for domain, row in iter_raw(source, domains, split):
        s, reason = normalize_row(row, domain)
        if s is not None and s.id in seen:
            s, reason = None, "duplicate"
        if s is None:
            if counts is not None:
                counts[reason] += 1
            continue
        seen.add(s.id)
        yield s


def select_balanced(ids_by_domain: dict[str, list[str]], per_domain: int | None, seed: int = 0) -> set[str]:
    """N ids per domain chosen by a seeded hash (bottom-N), independent of input order; all if None."""
    out: set[str] = set()
    for domain, ids in ids_by_domain.items():
        if per_domain is None:
            out.update(ids)
        else:
            out.update(sorted(ids, key=lambda i: _hash_unit(f"{seed}:{i}"))[:per_domain])
    return out
