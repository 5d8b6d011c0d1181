"""Prepared datasets on remote storage (``s3://``, ``gs://``, any pyarrow URI): a local copy per node.

Workers memory-map their shards (``shards.py``), which needs local files. So a ``data.path``
that is a URI is copied once per node into a cache dir,
``$BLOOMRAY_DATA_CACHE/<key>`` (default ``~/.cache/bloomray/datasets``), where ``key`` is a
sha256 of the URI (credentials left out) and of its ``index.json``: a dataset rewritten at the
same URI gets a fresh copy, an unchanged one is reused without a download. The driver copies it
before Ray starts (and reads ``index.json`` and ``tokenizer/`` from there); each worker calls the
same :func:`local_dataset_dir` when it first reads a block, which on the driver's node (or a
second worker's) finds the copy made.

A copy goes into a temp dir next to its cache dir and is renamed into place only after every
shard's size and sha256 match the index, so a crash or a bad file never leaves a dir that looks
complete; a lock file per key keeps two processes of one node from copying at the same time (the
second waits, then reuses the first's copy).

Remote calls fail fast: S3 with short connect/request timeouts and two attempts, GCS with a
short retry limit; an unreachable bucket, missing credentials or a missing ``index.json`` is a
:class:`DataError` naming the URI and the fix.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from bloomray.data.corpus import DataError
from bloomray.data.shards import FORMAT, INDEX, SPLITS, VERSION
from bloomray.files import atomic_dir

log = logging.getLogger(__name__)

CACHE_ENV = "BLOOMRAY_DATA_CACHE"
S3_CONNECT_TIMEOUT_S = 5.0
S3_REQUEST_TIMEOUT_S = 30.0  # between bytes of a response, not for a whole shard
S3_ATTEMPTS = 2
GCS_RETRY_S = 5
CHUNK = 8 << 20
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
_S3_QUERY = {"region", "endpoint_override", "scheme"}
_GCS_QUERY = {"endpoint_override", "scheme"}


def is_remote(path: str | Path | None) -> bool:
    """True when ``path`` is a URI (``s3://``, ``gs://``, ``file://``, ...), not a plain path."""
    return isinstance(path, str) and _URI.match(path) is not None


def cache_root() -> Path:
    """Where copies of remote datasets go on this node (``$BLOOMRAY_DATA_CACHE`` when set)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "bloomray" / "datasets"


def display_uri(uri: str, file: str | None = None) -> str:
    """``uri`` (or its ``file``, the query kept) without user info (an S3 access key and secret),
    for messages and cache keys."""
    parts = urllib.parse.urlsplit(uri)
    path = f"{parts.path.rstrip('/')}/{file}" if file else parts.path
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], path=path))


def local_dataset_dir(path: str | Path) -> Path:
    """The local dir to read the dataset at ``path`` from: ``path`` itself unless it is a URI,
    else this node's cached copy of it, made (and checked) on first use.

    Raises:
        DataError: the URI cannot be read (unreachable, no credentials, no ``index.json``), is
            not a prepared dataset, a file does not match the index, or the cache has no room.
    """
    if not is_remote(path):
        return Path(path).expanduser()
    uri = _normalized(str(path))
    fs, root = remote_filesystem(uri)
    index_bytes = _read_index(fs, root, uri)
    key = hashlib.sha256(f"{display_uri(uri)}\n{hashlib.sha256(index_bytes).hexdigest()}".encode())
    cache = cache_root() / key.hexdigest()
    if _is_copy(cache, index_bytes):
        return cache
    with _locked(cache):  # another process of this node may be copying it: wait, then reuse
        if _is_copy(cache, index_bytes):
            return cache
        for stale in cache.parent.glob(f".{cache.name}.*"):  # a crashed copy's temp dir
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        _copy_dataset(fs, root, uri, json.loads(index_bytes), index_bytes, cache)
    return cache


def remote_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path of ``uri``; S3 and GCS set up to fail fast.

    Raises:
        DataError: an unknown scheme or query option.
    """
    parts = urllib.parse.urlsplit(uri)
    query = dict(urllib.parse.parse_qsl(parts.query))
    user, _, bucket = parts.netloc.rpartition("@")
    path = (bucket + parts.path).rstrip("/")
    scheme = parts.scheme.lower()
    _check_query(uri, query, {"s3": _S3_QUERY, "gs": _GCS_QUERY, "gcs": _GCS_QUERY}.get(scheme))
    try:
        if scheme == "s3":
            key, _, secret = user.partition(":")
            region = (
                query.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            )
            fs = pafs.S3FileSystem(
                access_key=urllib.parse.unquote(key) or None,
                secret_key=urllib.parse.unquote(secret) or None,
                region=region,
                endpoint_override=query.get("endpoint_override"),
                scheme=query.get("scheme", "https"),
                connect_timeout=S3_CONNECT_TIMEOUT_S,
                request_timeout=S3_REQUEST_TIMEOUT_S,
                retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS),
            )
            return fs, path
        if scheme in ("gs", "gcs"):
            fs = pafs.GcsFileSystem(
                endpoint_override=query.get("endpoint_override"),
                scheme=query.get("scheme", "https"),
                retry_time_limit=timedelta(seconds=GCS_RETRY_S),
            )
            return fs, path
        return pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"data.path={display_uri(uri)}: {exc}; {_fix(uri)}") from None


def _normalized(uri: str) -> str:
    parts = urllib.parse.urlsplit(uri)
    return urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/")))


def _check_query(uri: str, query: dict[str, str], known: set[str] | None) -> None:
    if known is not None and set(query) - known:  # other schemes: pyarrow reads the query
        raise DataError(
            f"data.path={display_uri(uri)}: unknown URI option(s) {sorted(set(query) - known)}; "
            f"known: {sorted(known)}"
        )


def _fix(uri: str) -> str:
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    creds = {
        "s3": "the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE) and the "
        "region (?region= in the URI, or AWS_REGION)",
        "gs": "the credentials (GOOGLE_APPLICATION_CREDENTIALS)",
        "gcs": "the credentials (GOOGLE_APPLICATION_CREDENTIALS)",
    }.get(scheme, "that this node can read it")
    return (
        f"check the URI, {creds}, or copy the dataset dir to a local or shared mount and set "
        "data.path to that path"
    )


def _read_index(fs: pafs.FileSystem, root: str, uri: str) -> bytes:
    where = display_uri(uri, INDEX)
    try:
        with fs.open_input_stream(f"{root}/{INDEX}") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(
            f"{where} not found: data.path={display_uri(uri)} is not a prepared dataset (make one "
            "with `bloomray prepare-data`, then upload the whole dir); or check the URI"
        ) from None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {where}: {exc}; {_fix(uri)}") from None
    try:
        index = json.loads(data)
    except ValueError as exc:
        raise DataError(f"{where} is not valid JSON ({exc}); upload the dataset dir again") from None
    if not isinstance(index, dict) or (index.get("format"), index.get("version")) != (FORMAT, VERSION):
        got = (index.get("format"), index.get("version")) if isinstance(index, dict) else None
        raise DataError(
            f"{where} is {got}, not a {FORMAT!r} v{VERSION} index: data.path={display_uri(uri)} is not "
            "a dataset this version reads; make one with `bloomray prepare-data`"
        )
    return data


def _is_copy(cache: Path, index_bytes: bytes) -> bool:
    try:
        return (cache / INDEX).read_bytes() == index_bytes
    except OSError:
        return False


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fh = (cache.parent / f".{cache.name}.lock").open("a")
    except OSError as exc:
        raise DataError(
            f"cannot use the dataset cache {cache.parent} ({exc}); set {CACHE_ENV} to a writable dir"
        ) from None
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _expected(index: dict[str, Any], uri: str) -> dict[str, tuple[int, str | None]]:
    """The files the index names: relative path -> (size, sha256 or None)."""
    out: dict[str, tuple[int, str | None]] = {}
    try:
        item = np.dtype(index["dtype"]).itemsize
        for split in SPLITS:
            s = index["splits"][split]
            out[s["doc_offsets"]] = ((int(s["documents"]) + 1) * 8, None)
            out |= {sh["file"]: (int(sh["tokens"]) * item, sh["sha256"]) for sh in s["shards"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(
            f"{display_uri(uri, INDEX)} is malformed ({exc!r}); prepare the dataset again"
        ) from None
    return out


def _copy_dataset(
    fs: pafs.FileSystem, root: str, uri: str, index: dict[str, Any], index_bytes: bytes, cache: Path
) -> None:
    shown = display_uri(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot list {shown}: {exc}; {_fix(uri)}") from None
    files = {i.path[len(root) + 1 :]: i.size for i in infos if i.type == pafs.FileType.File}
    files.pop(INDEX, None)  # written from the bytes the cache key was made of
    expected = _expected(index, uri)
    missing = sorted(set(expected) - set(files))
    if missing:
        raise DataError(
            f"{display_uri(uri, missing[0])} is missing ({INDEX} names it); upload the dataset dir again"
        )
    total = sum(files.values())
    free = shutil.disk_usage(cache.parent).free
    if total > free:
        raise DataError(
            f"copying {shown} needs {total / 2**30:.2f} GiB, {cache.parent} has {free / 2**30:.2f} GiB "
            f"free; set {CACHE_ENV} to a dir with room, or copy the dataset to a mount"
        )
    log.info("copying %s (%d files, %.2f GiB) to %s", shown, len(files), total / 2**30, cache)
    with atomic_dir(cache) as tmp:
        for rel, listed in sorted(files.items()):
            size, sha = expected.get(rel, (listed, None))
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                got, digest = _copy_file(fs, f"{root}/{rel}", dst)
            except OSError as exc:
                raise DataError(
                    f"copying {display_uri(uri, rel)} to {dst} failed: {exc}; {_fix(uri)}"
                ) from None
            if got != size or (sha is not None and digest != sha):
                said = f"{INDEX} says" if rel in expected else "it was listed with"
                what = (
                    f"is {got} bytes, {said} {size}"
                    if got != size
                    else f"is corrupt (sha256 differs from {INDEX})"
                )
                raise DataError(
                    f"{display_uri(uri, rel)} {what}: truncated or replaced; upload the dataset dir again, or "
                    "prepare it again with `bloomray prepare-data`"
                )
        (tmp / INDEX).write_bytes(index_bytes)


def _copy_file(fs: pafs.FileSystem, src: str, dst: Path) -> tuple[int, str]:
    """Copy ``src`` of ``fs`` to ``dst``; returns the bytes copied and their sha256."""
    h, n = hashlib.sha256(), 0
    with fs.open_input_stream(src) as f, dst.open("wb") as out:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            out.write(chunk)
            n += len(chunk)
    return n, h.hexdigest()
