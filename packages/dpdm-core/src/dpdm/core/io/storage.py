"""What dpdm's file I/O shares across fsspec storages: telling object stores (S3, GCS, Azure Blob)
from filesystems, refusing a destination that cannot be written before any work (``check_destination``,
used by every command that writes), writing a file so that it appears complete or not at all
(``write_atomic``, ``AtomicPath``), and the one-line errors for storage that cannot be reached.

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

import contextlib
import logging
import os
import posixpath
import shutil
import socket
import sys
import tempfile
import uuid
from typing import Callable

import fsspec
from fsspec.implementations.cached import CachingFileSystem
from fsspec.implementations.local import LocalFileSystem

from ..errors import DpdmError

logger = logging.getLogger(__name__)
STAGE = "dpdm-stage-"  # AtomicPath's local staging folders for remote storage: dpdm-stage-<pid>-<random>
_HOST = socket.gethostname().replace("/", "_") or "host"  # in temporary names: a shared folder holds several hosts'

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


# --- destinations: refused before any work ---------------------------------------------------------------------------


def filesystem(url: str):
    """``(fs, path)`` of ``url`` as ``resolve`` gives them; an unknown protocol or a backend that is not installed is
    a ``DpdmError`` naming ``url``."""
    try:
        return resolve(url)
    except (ValueError, ImportError) as exc:  # fsspec: "Protocol not known: foo", "Install s3fs to access S3"
        raise DpdmError(f"{url}: {first_line(exc)}") from None


def check_destination(url: str, *, folder: bool = False, what: str = "") -> None:
    """Refuse (one ``DpdmError``: ``cannot write <what><url>: <reason>``) a destination that cannot be written, so
    that a command fails before it builds a model or computes a number. Writes nothing.

    ``url`` is a path or fsspec URL of a file, or of a folder with ``folder``; it need not exist (writers create
    missing parent folders). Refused: an unknown protocol or a missing backend; locally, a file where a folder is
    wanted or the reverse, a parent that is a file, a read-only file system, a folder this user may not write; on
    object stores, a missing bucket or storage that cannot be reached.
    """
    try:
        fs, path = resolve(url)
    except (ValueError, ImportError) as exc:
        raise DpdmError(f"cannot write {what}{url}: {first_line(exc)}") from None
    if isinstance(fs, LocalFileSystem):
        reason = _local_problem(path, folder)
        if reason:
            raise DpdmError(f"cannot write {what}{url}: {reason}")
        return
    try:
        fs.exists(path)  # reaches the storage: s3fs's exists(bucket) answers False for a closed endpoint
        bucket = missing_bucket(fs, path)
    except errors() as exc:
        raise DpdmError(f"cannot write {what}{url}: {first_line(exc)}{hint(url)}") from None
    if bucket is not None:
        raise DpdmError(f"cannot write {what}{url}: bucket {bucket!r} does not exist (dpdm does not create buckets)"
                        f"{hint(url)}")


def _local_problem(path: str, folder: bool) -> str | None:
    """Why the local ``path`` cannot be written (a file, or a folder with ``folder``), or None."""
    target = os.path.abspath(path)
    if os.path.isdir(target) and not folder:
        return f"{target} is a folder, not a file"
    if os.path.exists(target) and not os.path.isdir(target) and folder:
        return f"{target} is a file, not a folder"
    existing = target if folder and os.path.isdir(target) else os.path.dirname(target)
    while not os.path.exists(existing) and existing != os.path.dirname(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder"
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        return f"{existing} is on a read-only file system"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable (permission denied)"
    return None


# --- writing: complete or not at all ----------------------------------------------------------------------------------


def resolve(url: str):
    """``(fs, path)`` of ``url`` (a path or fsspec URL), the filesystem taken from behind its caching layers, so
    that writes go to the storage itself (``simplecache::s3://...``)."""
    fs, path = fsspec.core.url_to_fs(url)
    return target(fs), path


def write_atomic(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` (a path or fsspec URL) so that it appears complete or not at all.

    Object stores (S3, GCS, Azure) get one upload, which they publish only once complete (s3fs aborts a failed
    multipart upload), and a missing bucket is an error, never created; filesystems get a temporary sibling
    renamed into place, after creating the parent folders. Errors pass through as raised: ``ValueError`` for an
    unknown protocol, ``ImportError`` for a backend that is not installed, the storage's own (``errors()``).
    """
    fs, path = resolve(url)
    if isinstance(fs, LocalFileSystem):
        with AtomicPath(url) as tmp, open(tmp, "xb") as f:
            f.write(data)
    else:
        _publish(fs, path, lambda at: fs.pipe_file(at, data))


def upload_file(local: str, url: str) -> None:
    """Copy the local file ``local`` to ``url`` (a path or fsspec URL), complete or not at all, as ``write_atomic``
    writes."""
    fs, path = resolve(url)
    _publish(fs, path, lambda at: fs.put_file(local, at))


class AtomicPath:
    """A local temporary path whose file becomes ``url`` (a path or fsspec URL) in one step, or never: for
    writers that stream (a download, a ZIP archive).

    Write the file at ``path`` (it does not exist yet: create it, and it gets the umask's permissions like any
    new file), then ``commit()``: on a local filesystem it is renamed onto ``url`` (a temporary sibling), on
    other storage uploaded as ``write_atomic`` writes. ``discard()``, or a ``commit()`` that fails, removes the
    temporary file and leaves ``url`` as it was. As a context manager it gives ``path`` and commits when the
    block ends normally, discards when it raises. Errors pass through as ``write_atomic``'s do.
    """

    def __init__(self, url: str):
        self.fs, self.target = resolve(url)
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            _make_parent(self.fs, self.target)
            remove_stale(self.target)
            self._folder = None
            self.path = _sibling(self.target)
        else:  # staged on this machine, uploaded by commit
            _remove_stale_stages()
            self._folder = tempfile.mkdtemp(prefix=f"{STAGE}{os.getpid()}-")
            self.path = os.path.join(self._folder, posixpath.basename(self.target) or "upload")

    def commit(self) -> None:
        try:
            if self.local:
                os.replace(self.path, self.target)
            else:
                _publish(self.fs, self.target, lambda at: self.fs.put_file(self.path, at))
        finally:
            self.discard()

    def discard(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)

    def __enter__(self) -> str:
        return self.path

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def _sibling(path: str) -> str:
    """A fresh hidden name beside ``path``: ``.<name>.tmp-<pid>-<host>-<random>``; the pid and host let the next
    write to ``path`` remove what a killed process left (``remove_stale``)."""
    parent, name = posixpath.split(path)
    return posixpath.join(parent, f".{name}.tmp-{os.getpid()}-{_HOST}-{uuid.uuid4().hex[:8]}")


def remove_stale(path: str) -> list[str]:
    """Remove the temporary siblings of the local file ``path`` (``_sibling``) left by processes of this host that
    are gone (killed while writing, so they could not remove them); returns their paths."""
    parent, name = os.path.split(path)
    prefix = f".{name}.tmp-"
    try:
        entries = os.listdir(parent or ".")
    except OSError:
        return []
    removed = []
    for entry in entries:
        if not entry.startswith(prefix):
            continue
        pid, _, rest = entry[len(prefix):].partition("-")
        if not pid.isdigit() or rest.rpartition("-")[0] != _HOST or _alive(int(pid)):
            continue  # not ours, another host's (a shared filesystem), or still being written
        with contextlib.suppress(OSError):
            os.remove(os.path.join(parent, entry))
            removed.append(os.path.join(parent, entry))
    for stale in removed:
        logger.info("removed %s, left by a process that was killed while writing %s", stale, path)
    return removed


def _remove_stale_stages() -> None:
    """Remove the staging folders (``AtomicPath`` for remote storage) that killed processes left in the temp dir."""
    root = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for entry in os.listdir(root):
            pid = entry[len(STAGE):].partition("-")[0]
            if entry.startswith(STAGE) and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(os.path.join(root, entry), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, as another user's
        return True
    return True


def _make_parent(fs, path: str) -> None:
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)


def _publish(fs, path: str, put: Callable[[str], None]) -> None:
    """Make ``put(p)`` (which writes the whole file at ``p`` on ``fs``) appear at ``path`` complete or not at all:
    on object stores one upload straight to ``path``; elsewhere an upload to a temporary sibling, then a rename,
    the sibling removed on any failure."""
    if is_object_store(fs):
        put(path)
        return
    _make_parent(fs, path)
    tmp = _sibling(path)
    try:
        put(tmp)
        fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):  # the storage may be gone: the first error is the one to report
            if fs.exists(tmp):
                fs.rm(tmp)
        raise
