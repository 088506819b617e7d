"""One writer per run directory: ``RunLock(url).acquire()`` succeeds in one process at a time and refuses the others
with ``RunBusyError``, naming the holder (host, pid, start time).

- Local paths: ``fcntl.flock`` on the lock file, held on an open descriptor. The kernel releases it when the process
  ends, however it ends (a SIGKILL too), so a lock is never stale; a lock file left by a process that did not remove
  it (killed) is taken over with a note. Across machines this holds where the filesystem passes ``flock`` on (Linux
  NFS maps it to POSIX locks; some network filesystems do not).
- fsspec URLs: the lock is an object created exclusively (``open(..., "xb")``), on storage known to refuse a second
  exclusive create: ``memory://`` (one process) and S3 (``If-None-Match: *``; AWS S3 honours it, an S3-compatible
  server may not). Other storage is refused with a message, since it cannot tell two writers apart. Such a lock
  outlives a killed process: one whose holder is a dead process on this host is taken over with a note; one held
  from another host is reported, with the object to delete if that run is known to be gone.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import uuid

from fsspec.implementations.local import LocalFileSystem

from ..errors import DpdmError
from ..io.storage import errors, first_line, protocol, resolve

# protocols whose exclusive create ("xb") is known to fail when the object exists
EXCLUSIVE_CREATE = frozenset({"memory", "s3", "s3a"})


class RunBusyError(DpdmError):
    """The run directory is locked by another live process."""


def holder_text(holder: dict) -> str:
    """``pid 123 on host, since 2026-12-03 06:12:17 UTC``."""
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('started', '?')}"


def _me(token: str) -> dict:
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": started, "token": token}


def _alive_here(holder: dict) -> bool:
    """Whether ``holder`` may still be running: on another host (unknowable), or a live pid on this one."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, TypeError, ValueError):
        return True
    return True


def _parse(data: bytes) -> dict:
    try:
        found = json.loads(data.decode() or "{}")
    except (UnicodeDecodeError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


class RunLock:
    """The lock of one run directory, a file (or object) at ``url``. ``acquire()`` takes it or raises
    ``RunBusyError``; ``release()`` (idempotent) gives it up and removes the file. A context manager too. ``notes``
    collects what the caller should tell the user (a stale lock taken over)."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.path = resolve(url)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.token = uuid.uuid4().hex
        self.holder = _me(self.token)
        self.notes: list[str] = []
        self._fd: int | None = None
        self.held = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        if self.held:
            return
        (self._acquire_local if self.local else self._acquire_remote)()
        self.held = True

    def check(self) -> None:
        """Raise ``RunBusyError`` if a live process holds the lock; creates and writes nothing."""
        if not self.local:
            holder = self._read()
            if holder is not None and _alive_here(holder):
                raise self._busy(holder)
            return
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # conflicts with the holder's exclusive lock only
        except BlockingIOError:
            raise self._busy(_parse(os.pread(fd, 4096, 0))) from None
        finally:
            os.close(fd)  # closing drops the shared lock

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        (self._release_local if self.local else self._release_remote)()

    # --- local: flock -------------------------------------------------------------------------------------------

    def _acquire_local(self) -> None:
        import fcntl

        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _parse(os.pread(fd, 4096, 0))
                os.close(fd)
                raise self._busy(holder) from None
            if self._same_file(fd):
                break
            os.close(fd)  # the holder removed the file as we opened it: lock the new one
        left = _parse(os.pread(fd, 4096, 0))
        if left:
            self.notes.append(f"took over the lock of {holder_text(left)}, which ended without releasing it")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.holder).encode(), 0)
        self._fd = fd

    def _same_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _release_local(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)  # before the unlock: a waiting claimer re-checks the file it locked
        os.close(self._fd)
        self._fd = None

    # --- fsspec URLs: an object created exclusively ------------------------------------------------------------

    def _acquire_remote(self) -> None:
        scheme = protocol(self.url)
        if scheme not in EXCLUSIVE_CREATE:
            raise DpdmError(f"cannot lock {self.url}: {scheme}:// storage has no exclusive create, so two runs could "
                            f"write into the same directory unnoticed; give --out a local path or an s3:// URL")
        for _ in range(2):  # a stale lock is removed once, then created again
            try:
                self._create()
                return
            except FileExistsError:
                holder = self._read()
                if holder is None:
                    continue  # released in between
                if _alive_here(holder):
                    raise self._busy(holder) from None
                self.notes.append(f"took over the lock of {holder_text(holder)}, which is no longer running")
                self._remove_if(holder.get("token"))
        raise self._busy(self._read() or {})

    def _create(self) -> None:
        try:
            with self.fs.open(self.path, "xb") as f:
                f.write(json.dumps(self.holder).encode())
        except FileExistsError:
            raise
        except errors() as exc:
            if _precondition_failed(exc):
                raise FileExistsError(self.path) from None
            raise DpdmError(f"cannot lock {self.url}: {first_line(exc)}") from None

    def _read(self) -> dict | None:
        try:
            return _parse(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None

    def _remove_if(self, token: str | None) -> None:
        """Remove the lock object if it still holds ``token`` (narrows, does not close, the window in which another
        process's fresh lock could be removed)."""
        current = self._read()
        if current is not None and current.get("token") == token:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path)

    def _release_remote(self) -> None:
        with contextlib.suppress(*errors()):
            self._remove_if(self.token)

    def _busy(self, holder: dict) -> RunBusyError:
        where = "" if self.local else f"; if that run is gone, delete {self.url}"
        return RunBusyError(f"{os.path.dirname(self.url.rstrip('/')) or '.'} is in use by another dpdm run "
                            f"({holder_text(holder)}){where}")


def _precondition_failed(exc: BaseException) -> bool:
    """Whether a storage error is S3's answer to a conditional write on an existing key (412, or 409 for a
    concurrent one)."""
    text = str(exc)
    return "PreconditionFailed" in text or "412" in text or "ConditionalRequestConflict" in text
