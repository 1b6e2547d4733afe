"""Local paths and s3:// URIs behind one small API, used by the bank, the jobs and the server.

fsspec (s3fs for S3) does the work. S3 endpoints come from the standard AWS environment (`AWS_ENDPOINT_URL`,
credentials), which pyarrow and Ray Data read too, so one setting points every reader at e.g. a MinIO or moto
server. Writes are atomic: a temp file then a rename locally; a single PUT (atomic by nature) on S3.
"""
from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import fsspec

AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
           "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_EC2_METADATA_DISABLED")
"""The S3 settings a Ray worker needs from its driver (a local Ray may have started before they were set)."""


def aws_env() -> dict[str, str]:
    """The driver's AWS_* settings that are set, to forward to Ray workers' runtime_env."""
    return {k: os.environ[k] for k in AWS_ENV if k in os.environ}


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(str(uri))
    if is_remote(uri):
        fs.invalidate_cache()  # s3fs caches listings per process: other processes (Ray workers) write here too
    return fs, path


def join(uri: str, *parts: str) -> str:
    uri = str(uri)
    return "/".join([uri.rstrip("/"), *parts]) if is_remote(uri) else str(Path(uri, *parts))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def makedirs(uri: str) -> None:
    if not is_remote(uri):
        Path(uri).mkdir(parents=True, exist_ok=True)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def read_range(uri: str, offset: int, length: int) -> bytes:
    """Ranged read: one reference's record without reading its whole shard (HTTP range request on S3)."""
    fs, path = filesystem(uri)
    return fs.cat_file(path, start=offset, end=offset + length)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode()


def write_bytes(uri: str, data: bytes | memoryview) -> None:
    """Atomic write: readers see the old file or the new one, never a partial one. `data` may be any contiguous
    buffer (a shard's records are written without a copy)."""
    uri = str(uri)
    if is_remote(uri):
        fs, path = filesystem(uri)
        fs.pipe_file(path, bytes(data))
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".{uuid.uuid4().hex[:6]}")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def listdir(uri: str) -> list[str]:
    """Names (not paths) of the entries directly under uri; empty if it does not exist."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)
