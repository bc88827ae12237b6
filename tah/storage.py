"""Local paths and s3:// URIs behind one small API (boto3 / pyarrow with the standard AWS settings).

A custom endpoint (MinIO, moto, ...) comes from AWS_ENDPOINT_URL, as boto3 itself reads it; pyarrow
gets the same endpoint. Credentials come from the process's own environment or instance profile,
never from a job's configuration. Writes are atomic: a local file is written under a temporary name
and renamed; an S3 object becomes visible only when its PUT completes.

A directory published to S3 (`publish_dir`) is versioned, so readers never see two versions mixed:

    s3://bucket/model/.versions/<version>/...   every file of one published version
    s3://bucket/model/LATEST                    {"version": "<version>", ...}, written last

Readers resolve `LATEST` first (`resolve`, `local_copy`, `is_published`) and read only that version; a
prefix without `LATEST` (an older checkpoint, a plain `upload_dir`) is read as it is.

    python -c "from tah.storage import list_files; print(list_files('tah/assets/tinytask', ('.jsonl',))[:3])"
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

VERSIONS_DIR = ".versions"
"""Under a published S3 prefix: one sub-prefix per published version."""
POINTER_NAME = "LATEST"
"""Under a published S3 prefix: names the version readers see; moved only once a version is whole."""
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Local files up to this size are fingerprinted by content, larger ones by size and mtime.
_HASH_LIMIT = 64 << 20


def is_s3(uri: str | Path) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    p = urlparse(uri)
    return p.netloc, p.path.lstrip("/")


def join(base: str | Path, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI."""
    if is_s3(base):
        return "/".join([str(base).rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(base, *parts))


def s3_client():
    import boto3

    return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)


def _error_code(e: BaseException) -> str | None:
    return getattr(e, "response", {}).get("Error", {}).get("Code")


def _not_found(e: BaseException) -> bool:
    return _error_code(e) in ("404", "NoSuchKey", "NotFound")


def pyarrow_fs(uri: str | Path):
    """(pyarrow filesystem, path inside it) for a local path or an s3:// URI."""
    from pyarrow import fs as pafs

    if not is_s3(uri):
        return pafs.LocalFileSystem(), str(Path(uri).resolve())
    kwargs = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        p = urlparse(endpoint)
        kwargs.update(endpoint_override=p.netloc or p.path, scheme=p.scheme or "https")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    bucket, key = split_s3(str(uri))
    return pafs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")


def _list_objects(bucket: str, prefix: str) -> list[dict]:
    """Every object under a key prefix: {Key, Size, ETag, ...} as list_objects_v2 gives them."""
    out: list[dict] = []
    for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += page.get("Contents", [])
    return out


def _dir_prefix(uri: str) -> tuple[str, str]:
    bucket, prefix = split_s3(uri)
    return bucket, prefix.rstrip("/") + "/" if prefix else ""


def list_files(uri: str | Path, suffixes: tuple[str, ...] = ()) -> list[str]:
    """Every file under `uri` (recursively), sorted, as paths/URIs; filtered by suffix if given."""
    if is_s3(uri):
        bucket, prefix = _dir_prefix(str(uri))
        out = [f"s3://{bucket}/{o['Key']}" for o in _list_objects(bucket, prefix)]
    else:
        root = Path(uri)
        out = [str(p) for p in root.rglob("*") if p.is_file()] if root.is_dir() else []
    return sorted(u for u in out if not suffixes or u.endswith(suffixes))


def exists(uri: str | Path) -> bool:
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except Exception as e:  # botocore ClientError 404
            if _not_found(e):
                return False
            raise
    return Path(uri).exists()


def read_bytes(uri: str | Path) -> bytes:
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return Path(uri).read_bytes()


def _read_if_exists(uri: str) -> bytes | None:
    try:
        return read_bytes(uri)
    except FileNotFoundError:
        return None
    except Exception as e:
        if _not_found(e):
            return None
        raise


def _write_temp_beside(path: Path, data: bytes) -> str:
    """A fully written, fsynced temporary file in path's directory (for a rename or link into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def write_bytes_atomic(uri: str | Path, data: bytes) -> None:
    """Write so that readers see either nothing or the whole object, never a part of it."""
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    tmp = _write_temp_beside(Path(uri), data)
    try:
        os.replace(tmp, uri)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def create_exclusive(uri: str | Path, data: bytes) -> bool:
    """Create an object only if nothing exists under that name: True if this call created it, False if
    it was there already. Of any number of concurrent callers exactly one gets True (a lock).

    Locally a complete temporary file is hard-linked into place (link fails if the name exists, and
    readers never see a partial file); on S3 a conditional PUT (If-None-Match: *), which S3 applies
    atomically."""
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        client = s3_client()
        for attempt in range(5):
            try:
                client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                return True
            except Exception as e:
                if _error_code(e) == "PreconditionFailed":
                    return False
                # S3 answers 409 to a conditional write racing another one on the same key: retry.
                if _error_code(e) != "ConditionalRequestConflict" or attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
    path = Path(uri)
    tmp = _write_temp_beside(path, data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        Path(tmp).unlink(missing_ok=True)


def claim(uri: str | Path, ident: dict) -> tuple[list[str], dict]:
    """Record `ident` (a JSON object) at `uri` if nothing is there (exclusively, see create_exclusive),
    else compare with what is recorded. Returns the top-level keys whose values differ ([] when this
    call recorded it, or it is equal) and the recorded object. How a job guards an output it resumes
    into against other inputs or settings."""
    if create_exclusive(uri, (json.dumps(ident, indent=2, sort_keys=True) + "\n").encode()):
        return [], ident
    try:
        before = json.loads(read_bytes(uri))
    except ValueError:
        before = None
    if not isinstance(before, dict):  # a damaged or foreign record: not ours to resume into
        raise ValueError(f"{uri} exists but is not a JSON object recorded by a job; remove it or use a new output")
    return sorted(k for k in set(before) | set(ident) if before.get(k) != ident.get(k)), before


def remove(uri: str | Path) -> None:
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        s3_client().delete_object(Bucket=bucket, Key=key)
    else:
        Path(uri).unlink(missing_ok=True)


def file_tag(uri: str | Path) -> str:
    """A short description of one file's current content, for fingerprints of inputs: on S3 its size
    and ETag; locally its size and SHA-256 (files over 64 MiB: size and modification time)."""
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        head = s3_client().head_object(Bucket=bucket, Key=key)
        return f"{head['ContentLength']}:etag:{head['ETag'].strip(chr(34))}"
    st = Path(uri).stat()
    if st.st_size > _HASH_LIMIT:
        return f"{st.st_size}:mtime:{st.st_mtime_ns}"
    h = hashlib.sha256()
    with open(uri, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"{st.st_size}:sha256:{h.hexdigest()}"


# ---------------------------------------------------------------------------------- S3 -> local


class UnsafeKeyError(ValueError):
    """An S3 key that would not land inside the local directory it is downloaded into."""


def safe_relpath(key: str, prefix: str) -> str:
    """The part of `key` below `prefix`, as a relative path that stays inside any directory it is
    joined onto: keys with `..` or `.` segments, empty segments (`a//b`), a leading `/`, backslashes
    or NUL are refused (S3 stores them as plain strings; a local filesystem would follow them)."""
    if not key.startswith(prefix):
        raise UnsafeKeyError(f"S3 key {key!r} is not under {prefix!r}")
    rel = key[len(prefix):]
    bad = (not rel or rel.startswith("/") or "\\" in rel or "\0" in rel
           or any(seg in ("", ".", "..") for seg in rel.split("/")))
    if bad:
        raise UnsafeKeyError(f"refusing S3 key {key!r}: below {prefix!r} it is {rel!r}, which is not a plain "
                             "relative path (an empty, '.' or '..' segment, a leading '/', a backslash or NUL)")
    return rel


def download_dir(uri: str, local: str | Path) -> Path:
    """Copy every object under an s3:// prefix into a local directory (mirroring the layout).

    Every key is checked (`safe_relpath`) before anything is written: one that would resolve outside
    `local` fails the whole download with UnsafeKeyError. Zero-byte "folder" objects (keys ending in
    `/`, as the S3 console makes them) hold no file and are skipped."""
    local = Path(local)
    bucket, prefix = _dir_prefix(uri)
    objects = _list_objects(bucket, prefix)
    if not objects:
        raise FileNotFoundError(f"nothing under {uri}")
    root = local.resolve()
    plan: list[tuple[str, Path]] = []
    for o in objects:
        key = o["Key"]
        if key.endswith("/") and not o.get("Size"):
            continue
        dest = local / safe_relpath(key, prefix)
        # Also refuses a path that a symlink already inside `local` would carry elsewhere.
        if not dest.resolve().is_relative_to(root):
            raise UnsafeKeyError(f"refusing S3 key {key!r}: {dest} resolves outside {local}")
        plan.append((key, dest))
    client = s3_client()
    for key, dest in plan:
        dest.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(dest))
    return local


def upload_dir(local: str | Path, uri: str, last: str | None = None) -> None:
    """Copy a local directory to an s3:// prefix; the file named `last` (a completeness marker such
    as a config that readers look for first) is uploaded after all the others."""
    bucket, prefix = split_s3(uri)
    client = s3_client()
    files = sorted((p for p in Path(local).rglob("*") if p.is_file()), key=lambda p: p.name == last)
    for p in files:
        client.upload_file(str(p), bucket, "/".join(x for x in (prefix.rstrip("/"), p.relative_to(local).as_posix()) if x))


# ---------------------------------------------------------------------------------- published directories


def published_version(uri: str | Path) -> str | None:
    """The version an s3:// prefix's pointer names, or None (no pointer: unversioned, or local)."""
    if not is_s3(uri):
        return None
    data = _read_if_exists(join(uri, POINTER_NAME))
    if data is None:
        return None
    version = json.loads(data)["version"]
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise ValueError(f"{join(uri, POINTER_NAME)} names an invalid version {version!r}")
    return version


def resolve(uri: str | Path) -> str:
    """Where to read a published directory: the version its pointer names (s3://), the prefix itself
    when it has no pointer, a local directory after finishing any swap a killed writer left."""
    if not is_s3(uri):
        _recover_quietly(uri)
        return str(uri)
    version = published_version(uri)
    return join(uri, VERSIONS_DIR, version) if version else str(uri)


def is_published(uri: str | Path, marker: str) -> bool:
    """Whether a published directory exists whole: its current version holds the marker file."""
    return exists(join(resolve(uri), marker))


def _new_version() -> str:
    # Sorts by publication time (old versions are retired by that order); the random tail keeps two
    # publishers in the same nanosecond apart.
    ns = time.time_ns()
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(ns // 10**9))}.{ns % 10**9:09d}Z-{secrets.token_hex(3)}"


def _retire_versions(uri: str, keep: set[str]) -> None:
    """Delete the versions older than every kept one. The previous version is kept, so a reader that
    resolved it just before the pointer moved can still finish (local_copy retries once it is gone)."""
    bucket, prefix = _dir_prefix(join(uri, VERSIONS_DIR))
    oldest_kept = min(keep)
    stale = [o["Key"] for o in _list_objects(bucket, prefix) if o["Key"][len(prefix):].split("/", 1)[0] < oldest_kept]
    client = s3_client()
    for i in range(0, len(stale), 1000):
        client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in stale[i:i + 1000]], "Quiet": True})


def publish_dir(local: str | Path, uri: str | Path, last: str) -> None:
    """Copy a finished directory to a local path or s3:// prefix so that readers see the old version
    or the new one, whole, never a mix.

    On S3: uploaded to a fresh `<uri>/.versions/<version>/`, then the small pointer `<uri>/LATEST` is
    moved onto it (the commit), then versions older than the previous one are deleted. One publisher
    per URI at a time. Locally: copied beside the target and swapped in (`replace_dir`). `last` is the
    file readers check for (`is_published`)."""
    if is_s3(uri):
        previous = published_version(uri)
        version = _new_version()
        upload_dir(local, join(uri, VERSIONS_DIR, version), last=last)
        published = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        pointer = {"version": version, "marker": last, "published": published}
        write_bytes_atomic(join(uri, POINTER_NAME), json.dumps(pointer).encode())
        _retire_versions(str(uri), {version} | ({previous} if previous else set()))
        return
    target = Path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        shutil.copytree(local, tmp, dirs_exist_ok=True)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------- local directory swap


def _swap_names(target: Path) -> tuple[Path, Path]:
    return target.with_name(f".{target.name}.new"), target.with_name(f".{target.name}.old")


@contextlib.contextmanager
def _parent_lock(target: Path) -> Iterator[None]:
    """An exclusive flock on target's parent directory: swaps and recoveries of one target never
    interleave, and a killed holder's lock is released by the kernel. Where the filesystem has no
    flock (some network mounts) the swap runs unlocked: it is then safe for one writer at a time."""
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _leftovers(target: Path) -> list[Path]:
    new, old = _swap_names(target)
    legacy = sorted(target.parent.glob(f".{glob.escape(target.name)}.old-*"))  # earlier replace_dir's names
    return [p for p in (new, old, *legacy) if p.exists()]


def _recover_locked(target: Path) -> None:
    new, old = _swap_names(target)
    if new.exists():  # the new directory was complete before the swap started: finish the swap
        if target.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(new, target)
    legacy = sorted(target.parent.glob(f".{glob.escape(target.name)}.old-*"), key=lambda p: p.stat().st_mtime_ns)
    if not target.exists():  # killed between the old code's two renames: the old version goes back
        candidates = ([old] if old.exists() else []) + legacy[::-1]
        if candidates:
            os.replace(candidates[0], target)
    for p in [old, *legacy]:
        if p.exists():
            shutil.rmtree(p, ignore_errors=True)


def recover_dir(target: str | Path) -> None:
    """Finish or undo a `replace_dir` that a killed process left half done (a no-op, with no writes,
    when nothing was left). Called by replace_dir itself and by readers (`resolve`, `local_copy`)."""
    target = Path(target)
    if target.name in ("", ".", "..") or not target.parent.is_dir() or not _leftovers(target):
        return
    with _parent_lock(target):
        _recover_locked(target)


def _recover_quietly(path: str | Path) -> None:
    with contextlib.suppress(OSError):  # a reader without write access still reads what is there
        recover_dir(path)


def replace_dir(tmp: str | Path, target: str | Path) -> None:
    """Move a finished local directory into place; an existing one is swapped out, then deleted.

    Three renames under fixed names, so a process killed anywhere in between leaves a state the next
    call (or reader, see recover_dir) completes: tmp -> `.name.new` (the commit: from here the new
    version wins), target -> `.name.old`, `.name.new` -> target; then `.name.old` is deleted."""
    tmp, target = Path(tmp), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    new, old = _swap_names(target)
    with _parent_lock(target):
        _recover_locked(target)
        os.replace(tmp, new)
        try:
            if target.exists():
                os.replace(target, old)
            os.replace(new, target)
        except BaseException:
            with contextlib.suppress(Exception):  # best effort now; the next call tries again
                _recover_locked(target)
            raise
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(uri: str | Path, prefix: str = "tah-") -> Iterator[Path]:
    """A local directory for files a person reads (tables, plots, records) that belong under uri:
    uri itself when local; for s3:// a scratch directory whose files are uploaded when the block
    ends without an error (a failed job uploads nothing half-written), then removed."""
    if not is_s3(uri):
        Path(uri).mkdir(parents=True, exist_ok=True)
        yield Path(uri)
        return
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield tmp
        upload_dir(tmp, str(uri))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _current_version(uri: str) -> tuple[str, str]:
    """(prefix to download, tag of its content) for an s3:// model location: the pointer's version,
    or for an unversioned prefix a digest of its objects' names, sizes and ETags."""
    version = published_version(uri)
    if version:
        return join(uri, VERSIONS_DIR, version), f"version:{version}"
    bucket, prefix = _dir_prefix(uri)
    # A first publish still uploading (no pointer yet) is not part of the unversioned content.
    objects = [o for o in _list_objects(bucket, prefix) if not o["Key"][len(prefix):].startswith(VERSIONS_DIR + "/")]
    if not objects:
        raise FileNotFoundError(f"nothing published under {uri}")
    listing = sorted((o["Key"][len(prefix):], o["Size"], o["ETag"]) for o in objects)
    return uri, "listing:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def local_copy(uri: str | Path, cache_dir: str | Path | None = None) -> str:
    """A local directory for a model/tokenizer location: s3:// is downloaded into a cache keyed by
    the URI and the published version (a republished model is downloaded again); local paths and hub
    ids are returned unchanged (HF resolves hub ids itself).

    The download goes to a temporary directory renamed into place when whole, so concurrent callers
    (several actors on one node) never read a partial copy."""
    if not is_s3(uri):
        _recover_quietly(uri)
        return str(uri)
    root = Path(cache_dir or os.environ.get("TAH_CACHE", Path.home() / ".cache" / "tah"))
    root.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):
        source, tag = _current_version(str(uri))
        digest = lambda s: hashlib.sha1(s.encode()).hexdigest()[:16]  # noqa: E731
        dest = root / f"{digest(str(uri))}-{digest(tag)}"
        if (dest / ".complete").exists():
            return str(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=root))
        try:
            download_dir(source, tmp)
            (tmp / ".complete").write_text(json.dumps({"uri": str(uri), "version": tag}))
            try:
                os.rename(tmp, dest)
            except OSError:
                if not (dest / ".complete").exists():  # not another process's finished copy
                    raise
            return str(dest)
        except Exception as e:
            # The version was retired by newer publishes while it downloaded: resolve again.
            if not (_not_found(e) or isinstance(e, FileNotFoundError)) or attempt == 2:
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    raise AssertionError("unreachable")
