"""Local paths and s3:// URIs behind one small API (boto3 / pyarrow with the standard AWS settings).

A custom endpoint (MinIO, moto, ...) comes from AWS_ENDPOINT_URL, as boto3 itself reads it; pyarrow
gets the same endpoint. Writes are atomic: a local file is written under a temporary name and
renamed; an S3 object becomes visible only when its PUT completes.

    python -c "from tah.storage import list_files; print(list_files('data/tinytask', ('.jsonl',))[:3])"
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse


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


def list_files(uri: str | Path, suffixes: tuple[str, ...] = ()) -> list[str]:
    """Every file under `uri` (recursively), sorted, as paths/URIs; filtered by suffix if given."""
    if is_s3(uri):
        bucket, prefix = split_s3(str(uri))
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        out = []
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += [f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", [])]
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
            if getattr(e, "response", {}).get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
    return Path(uri).exists()


def read_bytes(uri: str | Path) -> bytes:
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return Path(uri).read_bytes()


def write_bytes_atomic(uri: str | Path, data: bytes) -> None:
    """Write so that readers see either nothing or the whole object, never a part of it."""
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove(uri: str | Path) -> None:
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        s3_client().delete_object(Bucket=bucket, Key=key)
    else:
        Path(uri).unlink(missing_ok=True)


def download_dir(uri: str, local: str | Path) -> Path:
    """Copy every object under an s3:// prefix into a local directory (mirroring the layout)."""
    local = Path(local)
    bucket, prefix = split_s3(uri)
    prefix = prefix.rstrip("/") + "/"
    files = list_files(uri)
    if not files:
        raise FileNotFoundError(f"nothing under {uri}")
    client = s3_client()
    for f in files:
        key = split_s3(f)[1]
        dest = local / key[len(prefix):]
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


def replace_dir(tmp: str | Path, target: str | Path) -> None:
    """Move a finished local directory into place; an existing one is swapped out, then deleted."""
    tmp, target = Path(tmp), Path(target)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def publish_dir(local: str | Path, uri: str | Path, last: str) -> None:
    """Copy a finished directory to a local path or s3:// prefix so that a reader checking for the
    file `last` never finds it beside missing files: locally copied beside and renamed into place,
    on S3 uploaded with `last` after everything else."""
    if is_s3(uri):
        upload_dir(local, str(uri), last=last)
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


def local_copy(uri: str | Path, cache_dir: str | Path | None = None) -> str:
    """A local directory for a model/tokenizer location: s3:// is downloaded (cached by URI);
    local paths and hub ids are returned unchanged (HF resolves hub ids itself)."""
    if not is_s3(uri):
        return str(uri)
    root = Path(cache_dir or os.environ.get("TAH_CACHE", Path.home() / ".cache" / "tah"))
    dest = root / hashlib.sha1(str(uri).encode()).hexdigest()[:16]
    done = dest / ".complete"
    if not done.exists():
        download_dir(str(uri), dest)
        done.write_text(str(uri))
    return str(dest)
