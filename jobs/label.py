"""Oracle labels with Ray Data: read -> tokenize (CPU tasks) -> reference-model actors -> Parquet shards.

    python jobs/label.py --config jobs/configs/label/tiny.yaml reference_model=runs/sft
    ray job submit -- python jobs/label.py --config jobs/configs/label/tiny.yaml \
        source=open-r1/Mixture-of-Thoughts reference_model=s3://bucket/sft output=s3://bucket/labels \
        num_actors=8 use_gpu=true samples_per_domain=33000

Exactly once and resumable: samples are split into `num_shards` shards by a hash of their id; each
shard is written as one object that becomes visible only when complete, and a re-run with the same
output skips the shards already there. Shards are processed `shards_per_wave` at a time, so a killed
job loses at most the wave in flight. `manifest.json` (counts, hard ratio per domain, malformed rows,
settings) is written when every shard is present.

The output is claimed first: `label_config.json` (the settings that determine the labels plus a
fingerprint of the source: its files' names and sizes/checksums/ETags, or the hub revision) is created
only if absent, atomically. A re-run with the same identity resumes; any other job into that output,
including one over a changed source, is refused, so labels of two sources or settings never mix.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from jobs.common import init_ray, parse  # (first: sets Ray's loopback switch before ray is imported)
import numpy as np
import ray
from ray.data import ActorPoolStrategy
from tqdm import tqdm

from tah import storage
from tah.assets import shipped_task, shipped_tokenizer
from tah.config import check_choices, to_dict
from tah.data import labeling as L
from tah.data.openr1 import is_hub_id, select_balanced, source_files

CONFIG_NAME = "label_config.json"
MANIFEST_NAME = "manifest.json"


@dataclass
class LabelConfig:
    """jobs/label.py: oracle labels of a Mixture-of-Thoughts-format source with a reference model."""

    reference_model: str = ""
    """The reference SFT model: local dir, hub id or s3:// checkpoint (plain HF causal LM)."""
    source: str = field(default_factory=shipped_task)
    """Hub id (open-r1/Mixture-of-Thoughts), local directory or s3:// prefix (default: the shipped task)."""
    tokenizer: str = field(default_factory=shipped_tokenizer)
    """Tokenizer with the chat template (usually the reference model's own)."""
    output: str = "runs/labels"
    """Local directory or s3:// prefix for the Parquet shards and manifest.json."""
    domains: list[str] = field(default_factory=lambda: ["math", "code", "science"])
    split: str = "train"
    samples_per_domain: int | None = None
    """Balanced sampling: this many per domain (seeded), or all."""
    seed: int = 0
    max_response_tokens: int = 8192
    validation_fraction: float = 0.01
    num_shards: int = 8
    """Deterministic shards (by hash of the sample id); the unit of exactly-once commit."""
    shards_per_wave: int = 8
    """Shards processed (and committed) per pass of the Ray Data pipeline."""
    num_actors: int = 1
    """Reference-model actors (one GPU each when use_gpu)."""
    actor_cpus: float = 1.0
    """CPUs each reference actor reserves (CPU runs): the actors together must leave at least one CPU
    for Ray Data's read and tokenize tasks, e.g. 2 actors x 0.5 on a 2-CPU machine."""
    batch_size: int = 16
    """Samples per actor call."""
    use_gpu: bool = False
    dtype: str = "float32"
    max_depth: int = 2
    """Depths written in the `depth` column (CE and entropy are stored for re-binning later)."""
    metric: Literal["mismatch", "entropy", "ce"] = "mismatch"
    """mismatch | entropy | ce (the latter two at the mismatch count's hard ratio per sample)."""

    def __post_init__(self) -> None:
        check_choices(self)
        if self.num_shards < 1 or self.shards_per_wave < 1 or self.num_actors < 1 or self.batch_size < 1:
            raise ValueError("num_shards, shards_per_wave, num_actors and batch_size must be >= 1")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError("validation_fraction must be in [0, 1)")
        if self.max_depth < 1:
            raise ValueError("max_depth must be >= 1")

    def identity(self) -> dict[str, Any]:
        """The settings that determine the labels; a re-run into the same output must match them."""
        d = to_dict(self)
        for k in ("output", "shards_per_wave", "num_actors", "actor_cpus", "batch_size", "use_gpu"):
            d.pop(k)
        return d


@dataclass
class Hooks:
    """Where tests step into a run (production runs pass none)."""

    after_wave: Callable[[int], None] | None = None
    """Called in the driver with the number of waves committed so far, after each wave's shards are
    written (the crash-resume test kills the process there)."""


def read_normalized(cfg: LabelConfig, revision: str | None = None) -> ray.data.Dataset:
    """Every domain's rows as {id, domain, shard, is_validation, messages, extra, status}; a hub
    source is read at `revision` (the one fingerprinted) when given."""
    parts = []
    for domain in cfg.domains:
        if is_hub_id(cfg.source):
            import datasets

            ds = ray.data.from_huggingface(datasets.load_dataset(cfg.source, name=domain, split=cfg.split,
                                                                 revision=revision))
            jsonl = False
        else:
            files = source_files(cfg.source, domain, cfg.split)
            if not files:
                raise FileNotFoundError(f"no {cfg.split} files for domain {domain!r} under {cfg.source}")
            fs, _ = storage.pyarrow_fs(files[0])
            paths = [storage.pyarrow_fs(f)[1] for f in files]
            jsonl = not files[0].endswith(".parquet")
            ds = ray.data.read_text(paths, filesystem=fs) if jsonl else ray.data.read_parquet(paths, filesystem=fs)
        parts.append(ds.map_batches(L.to_raw, fn_kwargs={"domain": domain, "jsonl": jsonl}, batch_format="numpy"))
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return ds.map_batches(L.normalize_batch, batch_format="numpy",
                          fn_kwargs={"num_shards": cfg.num_shards, "validation_fraction": cfg.validation_fraction})


def check_cpus(cfg: LabelConfig) -> None:
    """CPU actors that reserve every CPU of the cluster leave none for the read and tokenize tasks
    that feed them: the job would wait forever, so it is refused up front."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    held = 0 if cfg.use_gpu else cfg.num_actors * cfg.actor_cpus
    if not cfg.use_gpu and cpus and held > cpus - 1:
        raise SystemExit(f"num_actors={cfg.num_actors} x actor_cpus={cfg.actor_cpus} would hold {held:g} of the "
                         f"cluster's {cpus:g} CPUs, leaving none for Ray Data's read tasks (the job would hang): "
                         f"lower num_actors or set actor_cpus <= {max(cpus - 1, 0) / cfg.num_actors:g}")


def source_fingerprint(cfg: LabelConfig) -> dict[str, Any]:
    """What the labels are read from: {"files": {relative name: size and SHA-256 (local) or ETag
    (s3)}} over the data files of every domain, or {"hub": id, "revision": commit} for a hub dataset
    (revision None when the hub cannot be asked; the dataset is then read at its default revision)."""
    if is_hub_id(cfg.source):
        try:
            from huggingface_hub import HfApi

            return {"hub": cfg.source, "revision": HfApi().dataset_info(cfg.source).sha}
        except Exception as e:  # offline: the datasets cache may still serve it
            print(f"[label] could not resolve the revision of {cfg.source} ({type(e).__name__}); "
                  "fingerprinting it by name only", flush=True)
            return {"hub": cfg.source, "revision": None}
    root = str(cfg.source).rstrip("/") + "/"
    files = {}
    for domain in cfg.domains:
        for f in source_files(cfg.source, domain, cfg.split):
            name = f[len(root):] if f.startswith(root) else str(Path(f).relative_to(Path(cfg.source)))
            files[name] = storage.file_tag(f)
    return {"files": files}


def identity(cfg: LabelConfig) -> dict[str, Any]:
    """The settings that determine the labels and the fingerprint of the source they are made from."""
    return {**cfg.identity(), "source_fingerprint": source_fingerprint(cfg)}


def _source_change(before: Any, now: dict[str, Any]) -> str:
    if not isinstance(before, dict):
        return "the output records no source fingerprint (started by an older version of this job)"
    if "files" in before and "files" in now:
        changed = sorted(k for k in set(before["files"]) | set(now["files"])
                         if before["files"].get(k) != now["files"].get(k))
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        return f"changed, added or removed since: {', '.join(changed[:5])}{more}"
    return f"was {before}, is now {now}"


def check_output(cfg: LabelConfig, ident: dict[str, Any]) -> None:
    """Claim the output for `ident`, or check that it was claimed with exactly `ident` (a resume).

    The identity object is created only if absent (exclusively, see storage.create_exclusive), so of
    jobs started together into one fresh output exactly one claims it and any other with different
    settings or source is refused. Two jobs with equal identity may both run: they write the same
    shards, each committed whole, so the output is still exactly once."""
    diff, before = storage.claim(storage.join(cfg.output, CONFIG_NAME), ident)
    if not diff:
        return
    if diff == ["source_fingerprint"]:
        raise SystemExit(f"{cfg.output} holds labels of a different source than {cfg.source} now is: "
                         f"{_source_change(before.get('source_fingerprint'), ident['source_fingerprint'])}; "
                         "use a new output (or restore the source)")
    raise SystemExit(f"{cfg.output} holds labels made with different settings ({', '.join(diff)}); "
                     "use a new output")


def run(cfg: LabelConfig, hooks: Hooks | None = None) -> dict:
    """Label every pending shard and write the manifest; returns the manifest."""
    if not cfg.reference_model:
        raise SystemExit("reference_model is required (a local dir, hub id or s3:// checkpoint)")
    hooks = hooks or Hooks()
    check_cpus(cfg)
    t0 = time.time()
    ident = identity(cfg)
    check_output(cfg, ident)
    revision = ident["source_fingerprint"].get("revision")
    index = read_normalized(cfg, revision).select_columns(["id", "domain", "shard", "status"]).to_pandas()
    malformed = Counter(index.loc[index.status != "", "status"])
    ok = index[index.status == ""]
    malformed["duplicate"] += int(ok.id.duplicated().sum())
    ok = ok.drop_duplicates("id")
    by_domain = {d: sorted(g.id) for d, g in ok.groupby("domain")}
    selected = select_balanced(by_domain, cfg.samples_per_domain, cfg.seed)
    ok = ok[ok.id.isin(selected)]
    names = [L.shard_name(i, cfg.num_shards) for i in range(cfg.num_shards)]
    present = {Path(f).name for f in storage.list_files(cfg.output, (".parquet",))}
    pending = [i for i in range(cfg.num_shards) if names[i] not in present]
    print(f"[label] {len(ok)} samples selected in {cfg.num_shards} shards ({len(pending)} to do); "
          f"malformed rows skipped: {dict(malformed) or 0}", flush=True)

    waves = [pending[i:i + cfg.shards_per_wave] for i in range(0, len(pending), cfg.shards_per_wave)]
    for w, wave in enumerate(tqdm(waves, desc="label waves", unit="wave")):
        ids = frozenset(ok.id[ok.shard.isin(wave)])
        buffers: dict[int, list[dict[str, np.ndarray]]] = {shard: [] for shard in wave}
        if ids:
            ds = (read_normalized(cfg, revision)
                  .map_batches(L.keep_ids, fn_kwargs={"ids": ids}, batch_format="numpy")
                  .map_batches(L.tokenize_batch, batch_format="numpy",
                               fn_kwargs={"tokenizer_path": cfg.tokenizer, "max_response_tokens": cfg.max_response_tokens})
                  .map_batches(L.ReferenceLabeler, batch_format="numpy", batch_size=cfg.batch_size,
                               compute=ActorPoolStrategy(size=cfg.num_actors), num_gpus=1 if cfg.use_gpu else 0,
                               num_cpus=cfg.actor_cpus,
                               fn_constructor_kwargs={"model_path": cfg.reference_model, "max_depth": cfg.max_depth,
                                                      "metric": cfg.metric, "dtype": cfg.dtype}))
            # The driver gathers the wave by shard and commits each shard as one object. (A Ray groupby
            # would do the same on workers, but its hash shuffle fails on empty partitions in 2.60.)
            for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
                for shard in np.unique(batch["shard"]):
                    sel = batch["shard"] == shard
                    buffers[int(shard)].append({k: v[sel] for k, v in batch.items()})
        for shard, parts in buffers.items():
            rows = L.concat_batches(parts) if parts else L.empty_shard_batch()
            L.write_shard({**rows, "shard": np.full(max(len(rows["id"]), 1), shard)}, cfg.output, cfg.num_shards)
        if hooks.after_wave is not None:
            hooks.after_wave(w + 1)

    manifest = build_manifest(cfg, names, malformed, time.time() - t0, ident["source_fingerprint"])
    storage.write_bytes_atomic(storage.join(cfg.output, MANIFEST_NAME), json.dumps(manifest, indent=2).encode())
    print(f"[label] done: {manifest['samples']} samples, {manifest['tokens']} tokens, hard ratio "
          f"{manifest['hard_ratio']:.3f} ({manifest['hard_ratio_per_domain']}) -> {cfg.output}", flush=True)
    return manifest


def build_manifest(cfg: LabelConfig, names: list[str], malformed: Counter, seconds: float,
                   fingerprint: dict[str, Any]) -> dict:
    samples, labelled, hard, tok_malformed = Counter(), Counter(), Counter(), Counter()
    tokens = validation = 0
    for name in names:
        st = L.read_shard_stats(storage.join(cfg.output, name))
        samples.update(st["samples"])
        labelled.update(st["labelled"])
        hard.update(st["hard"])
        tok_malformed.update(st["malformed"])
        tokens += st["tokens"]
        validation += st["validation"]
    return {
        "samples": sum(samples.values()), "samples_per_domain": dict(samples), "validation_samples": validation,
        "tokens": tokens, "labelled_positions": sum(labelled.values()), "hard_positions": sum(hard.values()),
        "hard_ratio": sum(hard.values()) / max(sum(labelled.values()), 1),
        "hard_ratio_per_domain": {d: hard[d] / max(labelled[d], 1) for d in sorted(labelled)},
        "malformed": dict(malformed + tok_malformed), "shards": names,
        "reference_model": cfg.reference_model, "settings": to_dict(cfg), "source_fingerprint": fingerprint,
        "seconds_last_run": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    cfg = parse(LabelConfig, argv, __doc__.split("\n")[0])
    init_ray(output=cfg.output)
    return run(cfg)


if __name__ == "__main__":
    from jobs.label import main as package_main  # the package's copy (see jobs/train.py)

    package_main()
