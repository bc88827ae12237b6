"""jobs/label.py on local Ray: equal to a plain loop, exactly once across a kill, S3 via a real endpoint;
an output is claimed by one identity (settings + source fingerprint) and refuses any other."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from jobs.label import LabelConfig
from tah.config import to_dict
from tah.data.labeling import ReferenceLabeler, label_samples, read_labels
from tah.tokenizer import load_tokenizer
from tah.data.openr1 import iter_samples, select_balanced
from tah.assets import shipped_task, shipped_tokenizer, shipped_base_model

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = shipped_tokenizer()
DOMAINS = ["math", "code", "science"]


@pytest.fixture(scope="module")
def ref_model() -> str:
    # The shipped base: right on most tokens and wrong on some (a random model can be wrong on all,
    # which leaves nothing easy to check).
    return shipped_base_model()


@pytest.fixture(scope="module")
def ray_session():
    import ray

    from jobs.common import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def _cfg(ref: str, out: Path, **kw) -> LabelConfig:
    base = dict(reference_model=ref, source=shipped_task(), tokenizer=TOKENIZER, output=str(out),
                domains=DOMAINS, samples_per_domain=6, num_shards=3, shards_per_wave=3, batch_size=5)
    return LabelConfig(**{**base, **kw})


def _selected(cfg: LabelConfig):
    samples = list(iter_samples(cfg.source, cfg.domains))
    by = {d: [s.id for s in samples if s.domain == d] for d in cfg.domains}
    pick = select_balanced(by, cfg.samples_per_domain, cfg.seed)
    return [s for s in samples if s.id in pick]


def test_ray_job_equals_plain_loop(ref_model, ray_session, tmp_path):
    from jobs.label import run

    cfg = _cfg(ref_model, tmp_path / "labels")
    manifest = run(cfg)
    table = read_labels(cfg.output).to_pylist()
    plain = label_samples(_selected(cfg), load_tokenizer(TOKENIZER), ReferenceLabeler(ref_model), cfg.max_response_tokens)
    assert sorted(r["sample_id"] for r in table) == sorted(plain)
    for r in table:
        p = plain[r["sample_id"]]
        assert r["input_ids"] == p["input_ids"] and r["assistant_mask"] == p["assistant_mask"]
        assert r["depth"] == p["depth"].tolist() and r["ref_mismatch"] == p["ref_mismatch"].tolist()
        assert np.allclose(r["ref_ce"], p["ref_ce"], atol=1e-4) and np.allclose(r["ref_entropy"], p["ref_entropy"], atol=1e-4)
        assert r["num_hard"] == int((np.array(r["depth"]) > 1).sum())
    assert manifest["samples"] == 18 and manifest["samples_per_domain"] == {d: 6 for d in DOMAINS}
    hard = Counter()
    lab = Counter()
    for r in table:
        hard[r["domain"]] += r["num_hard"]
        lab[r["domain"]] += r["num_labelled"]
    assert manifest["hard_ratio_per_domain"] == pytest.approx({d: hard[d] / lab[d] for d in DOMAINS})
    assert 0 < manifest["hard_ratio"] < 1
    # Same settings again: nothing to do, same result. Other settings into the same output: refused.
    mtimes = {p.name: p.stat().st_mtime_ns for p in Path(cfg.output).glob("shard-*")}
    assert run(cfg)["samples"] == 18
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in Path(cfg.output).glob("shard-*")}
    with pytest.raises(SystemExit, match="different settings"):
        run(_cfg(ref_model, tmp_path / "labels", seed=1))


def test_actors_that_would_hold_every_cpu_are_refused(ref_model, ray_session, tmp_path):
    """2 CPU actors on a 2-CPU cluster leave Ray Data's read tasks no CPU (the job would hang): refused
    before anything is written; 2 actors x 0.5 CPU run and give the same labels as one actor."""
    from jobs.label import run

    with pytest.raises(SystemExit, match="leaving none for Ray Data's read tasks"):
        run(_cfg(ref_model, tmp_path / "refused", num_actors=2))
    assert not (tmp_path / "refused").exists()
    one = run(_cfg(ref_model, tmp_path / "one", samples_per_domain=3, num_shards=1, shards_per_wave=1))
    two = run(_cfg(ref_model, tmp_path / "two", samples_per_domain=3, num_shards=1, shards_per_wave=1,
                   num_actors=2, actor_cpus=0.5))
    assert one["samples"] == two["samples"] == 9
    key = lambda r: r["sample_id"]  # noqa: E731
    a, b = (sorted(read_labels(str(tmp_path / d)).to_pylist(), key=key) for d in ("one", "two"))
    assert [r["depth"] for r in a] == [r["depth"] for r in b]


# The label job in its own process, killed (os._exit: no cleanup, like SIGKILL) by its hook once
# `after` waves are committed.
KILLED_JOB = """
import json, os, sys
from jobs.common import init_ray
from jobs.label import Hooks, LabelConfig, run
init_ray()
after = int(sys.argv[2])
run(LabelConfig(**json.loads(sys.argv[1])), Hooks(after_wave=lambda waves: os._exit(3) if waves >= after else None))
"""


def test_kill_and_resume_is_exactly_once(ref_model, ray_session, tmp_path):
    """Killed after two of four waves, re-run: every sample exactly once. Then the source changes
    under the same output: refused, naming the changed file."""
    from jobs.label import run

    source = tmp_path / "source"  # a copy, to change below
    for d in DOMAINS:
        shutil.copytree(Path(shipped_task()) / d, source / d)
    cfg = _cfg(ref_model, tmp_path / "labels", source=str(source), num_shards=4, shards_per_wave=1)
    proc = subprocess.run([sys.executable, "-c", KILLED_JOB, json.dumps(to_dict(cfg)), "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr[-2000:]
    done = sorted(p.name for p in Path(cfg.output).glob("shard-*.parquet"))
    assert len(done) == 2 and not (Path(cfg.output) / "manifest.json").exists()
    before = {n: (Path(cfg.output) / n).stat().st_mtime_ns for n in done}
    # A write torn by the kill leaves at most a temporary file, which is never read as a shard.
    (Path(cfg.output) / ".shard-00003-of-00004.parquet.tmp-x").write_bytes(b"PAR1 torn")
    manifest = run(cfg)
    ids = [r["sample_id"] for r in read_labels(cfg.output).to_pylist()]
    assert len(ids) == len(set(ids)) == 18  # no duplicate, no gap
    assert set(ids) == {s.id for s in _selected(cfg)}
    assert manifest["samples"] == 18
    assert before == {n: (Path(cfg.output) / n).stat().st_mtime_ns for n in done}  # committed shards kept
    train = source / "math" / "train-00000-of-00001.jsonl"
    train.write_text(train.read_text().replace("1", "2", 1))  # same size, other content
    with pytest.raises(SystemExit, match="different source.*math/train-00000-of-00001.jsonl"):
        run(cfg)


def test_one_fresh_output_admits_one_identity(tmp_path):
    """Jobs started together into one fresh output: exactly one claims it; the others, with other
    settings, are refused; a job with the claimant's identity proceeds (a resume)."""
    from jobs.label import check_output, identity

    cfgs = [_cfg("ref", tmp_path / "out", seed=i) for i in range(6)]
    idents = [identity(c) for c in cfgs]
    start, outcome = threading.Barrier(len(cfgs)), {}

    def claim(i: int) -> None:
        start.wait()
        try:
            check_output(cfgs[i], idents[i])
            outcome[i] = "proceeds"
        except SystemExit as e:
            outcome[i] = str(e)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(cfgs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, o in outcome.items() if o == "proceeds"]
    assert len(winners) == 1 and all("different settings (seed)" in o for i, o in outcome.items() if i not in winners)
    assert json.loads((tmp_path / "out" / "label_config.json").read_text()) == idents[winners[0]]
    check_output(cfgs[winners[0]], idents[winners[0]])  # the same identity again: a resume
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["label_config.json"]  # no temporary left


def test_label_job_reads_and_writes_s3(ref_model, s3_server, tmp_path):
    """Source, tokenizer, reference model and output all on an S3-compatible server on 127.0.0.1."""
    from tah import storage

    storage.s3_client().create_bucket(Bucket="tah")
    for d in DOMAINS:
        storage.upload_dir(Path(shipped_task()) / d, f"s3://tah/data/{d}")
    storage.upload_dir(TOKENIZER, "s3://tah/tokenizer")
    storage.upload_dir(ref_model, "s3://tah/ref")
    env = {**os.environ, **s3_server, "TAH_CACHE": str(tmp_path / "cache")}
    args = [sys.executable, str(ROOT / "jobs/label.py"), "source=s3://tah/data", "tokenizer=s3://tah/tokenizer",
            "reference_model=s3://tah/ref", "output=s3://tah/labels", "samples_per_domain=4", "num_shards=2"]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_labels("s3://tah/labels").to_pylist()
    assert len(rows) == 12 and len({r["sample_id"] for r in rows}) == 12
    manifest = json.loads(storage.read_bytes("s3://tah/labels/manifest.json"))
    assert manifest["samples"] == 12 and manifest["reference_model"] == "s3://tah/ref"
    assert all(len(r["depth"]) == len(r["input_ids"]) for r in rows)
    # The output was claimed on S3 with the source's ETags: an object of the source replaced by other
    # content, and the same job is refused; another job into a fresh S3 output claims it exactly once.
    from jobs.label import check_output, identity

    cfg = _cfg("s3://tah/ref", "s3://tah/labels", source="s3://tah/data", tokenizer="s3://tah/tokenizer",
               samples_per_domain=4, num_shards=2, shards_per_wave=8, batch_size=16)
    check_output(cfg, identity(cfg))
    storage.write_bytes_atomic("s3://tah/data/code/train-00000-of-00001.jsonl", b'{"messages": []}\n')
    with pytest.raises(SystemExit, match="different source.*code/train-00000-of-00001.jsonl"):
        check_output(cfg, identity(cfg))
    fresh = [_cfg("ref", "s3://tah/fresh", source="s3://tah/data", seed=i) for i in range(2)]
    check_output(fresh[0], identity(fresh[0]))
    with pytest.raises(SystemExit, match="different settings"):
        check_output(fresh[1], identity(fresh[1]))
