"""tah/storage.py against an S3 server on 127.0.0.1 and the local filesystem: keys that would escape a
download are refused, S3 publishes are versioned behind a pointer, the local swap survives a crash
between its renames, exclusive creates; and jobs/common's Ray start-up keeps credentials out of
the runtime_env."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tah import storage

BAD_KEYS = ["../../escape.txt", "/etc/escape.txt", "a//escape.txt", "./escape.txt", "a\\..\\..\\escape.txt",
            "nul\0escape.txt", "a/../../escape.txt"]


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _model(tmp_path: Path, name: str, version: str) -> Path:
    d = tmp_path / name
    (d / "sub").mkdir(parents=True)
    (d / "weights.bin").write_text(f"weights {version}")
    (d / "sub" / "extra.txt").write_text(f"extra {version}")
    (d / "config.json").write_text(json.dumps({"version": version}))
    return d


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_keys_that_leave_the_download_dir_are_refused(s3_server, tmp_path, bad):
    """The key is written to the S3 server as it is (S3 takes any string); downloading its prefix fails
    before anything is written, and nothing lands outside (or inside) the target directory."""
    storage.s3_client().create_bucket(Bucket="keys")
    client = storage.s3_client()
    client.put_object(Bucket="keys", Key="model/ok.txt", Body=b"ok")
    client.put_object(Bucket="keys", Key="model/" + bad, Body=b"pwned")
    client.put_object(Bucket="keys", Key="model/folder/", Body=b"")  # a console "folder": skipped, not refused
    target = tmp_path / "work" / "deep" / "download"
    with pytest.raises(storage.UnsafeKeyError, match="refusing S3 key"):
        storage.download_dir("s3://keys/model", target)
    with pytest.raises(storage.UnsafeKeyError):
        storage.local_copy("s3://keys/model", cache_dir=tmp_path / "cache")
    assert _tree(tmp_path) == {}  # no file anywhere under the test's directory
    assert not Path("/etc/escape.txt").exists()
    client.delete_object(Bucket="keys", Key="model/" + bad)
    assert _tree(storage.download_dir("s3://keys/model", target)) == {"ok.txt": b"ok"}


def test_safe_relpath():
    assert storage.safe_relpath("p/a/b.txt", "p/") == "a/b.txt"
    assert storage.safe_relpath("p/..a/b..", "p/") == "..a/b.."  # dots inside a name are fine
    for bad in BAD_KEYS + ["", "a/", "a/./b"]:
        with pytest.raises(storage.UnsafeKeyError):
            storage.safe_relpath("p/" + bad, "p/")
    with pytest.raises(storage.UnsafeKeyError, match="not under"):
        storage.safe_relpath("q/a", "p/")


def test_publish_is_versioned_and_readers_see_one_whole_version(s3_server, tmp_path):
    storage.s3_client().create_bucket(Bucket="pub")
    uri, cache = "s3://pub/runs/model", tmp_path / "cache"
    storage.publish_dir(_model(tmp_path, "v1", "1"), uri, last="config.json")
    v1 = storage.published_version(uri)
    names = {f[len(uri) + 1:] for f in storage.list_files(uri)}
    assert names == {"LATEST", *(f".versions/{v1}/{n}" for n in ("weights.bin", "sub/extra.txt", "config.json"))}
    assert storage.is_published(uri, "config.json") and not storage.is_published("s3://pub/runs/none", "config.json")
    copy1 = storage.local_copy(uri, cache)
    assert json.loads(Path(copy1, "config.json").read_text()) == {"version": "1"}

    # A publish killed half-way (files of a new version uploaded, the pointer not moved): readers
    # still see version 1, whole, from the same cache entry.
    half = storage._new_version()
    storage.upload_dir(_model(tmp_path, "half", "half"), storage.join(uri, ".versions", half))
    assert storage.published_version(uri) == v1 and storage.local_copy(uri, cache) == copy1
    assert json.loads(storage.read_bytes(storage.join(storage.resolve(uri), "config.json"))) == {"version": "1"}

    # Republished under the same URI: seen at once, downloaded afresh; the old copy is left alone.
    storage.publish_dir(_model(tmp_path, "v2", "2"), uri, last="config.json")
    copy2 = storage.local_copy(uri, cache)
    assert copy2 != copy1 and _tree(Path(copy2)) == {**_tree(tmp_path / "v2"),
                                                     ".complete": Path(copy2, ".complete").read_bytes()}
    assert Path(copy1, "weights.bin").read_text() == "weights 1"

    # A third publish retires every version older than the previous one (the half-done one included).
    v2 = storage.published_version(uri)
    storage.publish_dir(_model(tmp_path, "v3", "3"), uri, last="config.json")
    v3 = storage.published_version(uri)
    versions = {f.split("/.versions/")[1].split("/")[0] for f in storage.list_files(uri) if "/.versions/" in f}
    assert versions == {v2, v3}

    # A reader that resolved a version that is deleted before it downloads it resolves again.
    real, calls = storage._current_version, []

    def stale_first(u: str) -> tuple[str, str]:
        calls.append(u)
        return (storage.join(uri, ".versions", v1), f"version:{v1}") if len(calls) == 1 else real(u)

    storage._current_version = stale_first
    try:
        assert Path(storage.local_copy(uri, tmp_path / "cache2"), "weights.bin").read_text() == "weights 3"
    finally:
        storage._current_version = real
    assert len(calls) == 2


def test_unversioned_prefix_is_read_as_is_and_keyed_by_its_etags(s3_server, tmp_path):
    """A prefix uploaded without a pointer (older checkpoints, a tokenizer copied with upload_dir)."""
    storage.s3_client().create_bucket(Bucket="old")
    uri, cache = "s3://old/ckpt", tmp_path / "cache"
    storage.upload_dir(_model(tmp_path, "v1", "1"), uri, last="config.json")
    assert storage.resolve(uri) == uri and storage.is_published(uri, "config.json")
    copy1 = storage.local_copy(uri, cache)
    assert storage.local_copy(uri, cache) == copy1
    storage.write_bytes_atomic(storage.join(uri, "weights.bin"), b"weights 2")  # overwritten in place
    copy2 = storage.local_copy(uri, cache)
    assert copy2 != copy1 and Path(copy2, "weights.bin").read_text() == "weights 2"
    with pytest.raises(FileNotFoundError):
        storage.local_copy("s3://old/missing", cache)


@pytest.mark.parametrize("fail_at", [2, 3])
def test_replace_dir_killed_between_renames_recovers(tmp_path, monkeypatch, fail_at):
    """os.replace fails from its `fail_at`-th call on (2: before the old version moves aside, 3: with
    the target moved aside and the new one not yet in place), recovery included, as a kill would
    leave it. The next reader finds the new version, whole, and no leftovers."""
    target = tmp_path / "ckpt"
    storage.replace_dir(_model(tmp_path, "v1", "1"), target)
    new = _model(tmp_path, "v2", "2")
    expected = _tree(new)
    real, calls = os.replace, []

    def dying(src, dst):
        calls.append((src, dst))
        if len(calls) >= fail_at:
            raise OSError("killed")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", dying)
    with pytest.raises(OSError, match="killed"):
        storage.replace_dir(new, target)
    monkeypatch.setattr(os, "replace", real)
    assert target.exists() == (fail_at == 2)  # the crash window: the target may be missing
    assert storage.resolve(target) == str(target)  # a reader (from_pretrained / local_copy) recovers
    assert _tree(target) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_replace_dir_restores_a_legacy_leftover_and_replaces_again(tmp_path):
    """The swap of earlier versions (target -> .name.old-<pid>, tmp -> target) killed in between: the
    old version goes back; a later replace_dir works as usual."""
    target = tmp_path / "ckpt"
    old = _model(tmp_path, "v1", "1")
    os.replace(old, tmp_path / ".ckpt.old-1234")
    storage.recover_dir(target)
    assert Path(target, "weights.bin").read_text() == "weights 1" and len(_tree(target)) == 3
    storage.publish_dir(_model(tmp_path, "v2", "2"), target, last="config.json")
    assert Path(target, "weights.bin").read_text() == "weights 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "v2"]


def test_create_exclusive(s3_server, tmp_path):
    storage.s3_client().create_bucket(Bucket="lock")
    for uri in ("s3://lock/out/lock.json", str(tmp_path / "out" / "lock.json")):
        assert storage.create_exclusive(uri, b"first")
        assert not storage.create_exclusive(uri, b"second")
        assert storage.read_bytes(uri) == b"first"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["lock.json"]


def _runtime_env_of_a_worker() -> str:
    import ray

    return ray.get_runtime_context().get_runtime_env_string()


def test_ray_workers_get_credentials_from_their_own_environment(monkeypatch):
    """jobs.common.init_ray on a local cluster: a Ray task reads the credentials from the environment
    its process inherited; the job's runtime_env (shown by the dashboard and the state API) holds none."""
    import ray

    from jobs.common import init_ray

    secrets = {"AWS_ACCESS_KEY_ID": "AKIATESTONLY", "AWS_SECRET_ACCESS_KEY": "secret-never-in-runtime-env",
               "AWS_SESSION_TOKEN": "session-never-in-runtime-env"}
    for k, v in {**secrets, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}.items():
        monkeypatch.setenv(k, v)
    assert not ray.is_initialized()
    init_ray(num_cpus=1)
    try:
        seen = ray.get([ray.remote(os.getenv).remote(k) for k in secrets])  # runs os.getenv in the worker
        assert seen == list(secrets.values())
        envs = [json.dumps(ray.get_runtime_context().runtime_env), ray.get_runtime_context().get_runtime_env_string(),
                ray.get(ray.remote(_runtime_env_of_a_worker).remote())]
        for env in envs:
            assert not any(k in env or v in env for k, v in secrets.items()), env
    finally:
        ray.shutdown()


def test_claim_records_once_then_names_what_differs(tmp_path):
    uri = tmp_path / "out" / "identity.json"
    assert storage.claim(uri, {"a": 1, "b": [2]}) == ([], {"a": 1, "b": [2]})
    assert storage.claim(uri, {"a": 1, "b": [2]})[0] == []
    diff, before = storage.claim(uri, {"a": 1, "b": [3], "c": 0})
    assert diff == ["b", "c"] and before == {"a": 1, "b": [2]}
    for hostile in (b"[1, 2]", b"\xff\xfe not json", b'"a string"'):  # never resumed into, never crashes oddly
        uri.write_bytes(hostile)
        with pytest.raises(ValueError, match="not a JSON object"):
            storage.claim(uri, {"a": 1})
