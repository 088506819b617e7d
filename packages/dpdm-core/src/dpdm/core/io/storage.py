"""What dpdm's file I/O shares across fsspec storages: telling object stores (S3, GCS, Azure Blob)
from filesystems, and the one-line errors for storage that cannot be reached.

dpdm passes no storage options of its own: a URL alone must work (``s3://bucket/ds.zip``,
``simplecache::s3://bucket/ds.zip``), so credentials, endpoints and timeouts come from the
environment, read by s3fs/botocore and by fsspec's configuration:

    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)   credentials
    AWS_DEFAULT_REGION                                          the region
    AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3)                   an S3-compatible server (MinIO, Ceph, moto, ...)
    AWS_MAX_ATTEMPTS=1, AWS_RETRY_MODE=standard                 fail at once instead of retrying (botocore's
                                                                default retries a refused connection for ~10 s)
    FSSPEC_S3='{"config_kwargs": {"connect_timeout": 5}}'       any s3fs option (fsspec reads FSSPEC_<PROTOCOL>)
    FSSPEC_FILECACHE_CACHE_STORAGE=/path                        where ``filecache::`` keeps its copies
"""

from __future__ import annotations

import sys

from fsspec.implementations.cached import CachingFileSystem

# protocols whose "folders" are key prefixes inside buckets: a missing bucket is an error, never created, and
# one upload is atomic (the object appears only once complete; a failed multipart upload is aborted)
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss"})
LOCAL = frozenset({"", "file", "local", "memory"})
# what the backends raise besides OSError, looked up only once their module is loaded (a backend in use)
BACKEND_ERRORS = {"botocore.exceptions": ("BotoCoreError", "ClientError"), "aiohttp": ("ClientError",),
                  "gcsfs.retry": ("HttpError",)}
S3_HINT = ("check the bucket name, the network and the AWS credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
           "or AWS_PROFILE); for an S3-compatible server set AWS_ENDPOINT_URL")


def first_line(exc: BaseException) -> str:
    """An exception's first line, or its type's name when it has no message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "the storage failed": ``OSError`` and the loaded backends' own (s3fs
    translates most of botocore's errors into ``OSError``s, but lets connection errors through)."""
    found: list[type[BaseException]] = [OSError]
    for module, names in BACKEND_ERRORS.items():
        loaded = sys.modules.get(module)
        found += [getattr(loaded, name) for name in names if hasattr(loaded, name)]
    return tuple(found)


def protocol(url: str) -> str:
    """The protocol that stores ``url`` (the last link of a ``simplecache::s3://...`` chain), ``""`` for paths."""
    last = url.split("::")[-1]
    return last.split("://", 1)[0].lower() if "://" in last else ""


def hint(url: str) -> str:
    """``"; what to check"`` for an error about the remote ``url``; ``""`` for local paths and ``memory://``."""
    scheme = protocol(url)
    if scheme in LOCAL:
        return ""
    if scheme in ("s3", "s3a"):
        return f"; {S3_HINT}"
    return "; check the URL, the network and the credentials"


def target(fs):
    """The filesystem behind fsspec's caching layers (``simplecache::``, ``filecache::``, ``blockcache::``)."""
    while isinstance(fs, CachingFileSystem):
        fs = fs.fs
    return fs


def is_object_store(fs) -> bool:
    """Whether ``fs`` (or the filesystem behind its caching layers) keeps objects in buckets."""
    names = target(fs).protocol
    return not OBJECT_STORES.isdisjoint((names,) if isinstance(names, str) else names)


def missing_bucket(fs, path: str) -> str | None:
    """The bucket of ``path`` if ``fs`` is an object store and that bucket does not exist (or these credentials
    cannot see it), else ``None``; ``path`` is stripped of its protocol (as ``fsspec.core.url_to_fs`` gives it)."""
    if not is_object_store(fs):
        return None
    bucket = path.lstrip("/").split("/", 1)[0]
    return bucket if bucket and not target(fs).exists(bucket) else None
