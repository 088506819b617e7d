"""Converting image collections into EDM's dataset ZIP (``dpdm data prepare``), as EDM's ``dataset_tool.py`` does.

The output is what ``image_zip`` (and EDM's ``training/dataset.py``) reads (``../shared/edm_ref/README.md`` §8):
an uncompressed ZIP (``ZIP_STORED``) of uncompressed PNGs (``compress_level=0``) named
``{idx:08d}[:5]/img{idx:08d}.png``, followed by ``dataset.json`` holding ``{"labels": [[name, class], ...]}`` or
``{"labels": null}``. When the class names are known, dataset.json also holds ``"classes": [name, ...]`` (index
``i`` is class ``i``); EDM's reader and ours look up only ``"labels"`` and ignore it.

The pieces: ``dpdm.data.sources`` reads the inputs (folders, zips, CIFAR-10, MNIST, npz; ``KINDS``, detected by
``detect_kind``) and ``dpdm.data.transforms`` turns each item into a PNG (``TRANSFORMS``: none, center-crop,
center-crop-wide, center-crop-adm). This module runs them, checks sizes, and writes the ZIP and the ``Report``.

Corrupt or unreadable files (Pillow cannot decode them), non-image files and images too small for
``center-crop-wide`` are skipped and listed in the report with the reason; with image files stored as RGB, the
report notes when every image was grayscale. Every other problem (a missing source, sizes that differ without
``resolution``, a bad option) raises one ``DpdmError`` naming the file and the fix.

Parallelism and determinism: items are read in this process, then decoded, transformed and PNG-encoded in chunks
(of at most ``CHUNK``) by a pool of ``workers`` processes (``1``: in this process; by default ``min(8, CPUs)`` but
at most one per ``CHUNK`` items). The pool is started with ``spawn`` (no fork of a process holding torch's
threads), so a script calling ``prepare`` with several workers needs the usual ``if __name__ == "__main__":``
guard. The results are written in index order with a fixed timestamp (``DATE_TIME``) and fixed attributes, so the
ZIP is the same, byte for byte, for any number of workers.

Writing: ``dst`` is a local path or any fsspec URL ending in ``.zip``, written through
``dpdm.core.io.storage.AtomicPath``: a local ZIP goes to a hidden temporary sibling of ``dst`` renamed over it at the
end; other storage gets a local temporary file uploaded at the end (to ``dst`` itself on object stores, whose uploads
are atomic, else beside it and then moved onto it). Any failure (or Ctrl-C, or a SIGTERM to ``dpdm data prepare``)
removes the temporary files, so ``dst`` is either complete or untouched. A process killed outright (SIGKILL) cannot:
its temporary file carries its pid, and the next write to ``dst`` removes it (``storage.remove_stale``). The worker
processes end with the parent however it ends (``end_with_parent``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import posixpath
import signal
import threading
import time
import zipfile
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import islice
from multiprocessing import get_context
from typing import Iterator

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from dpdm.core.errors import DpdmError
from dpdm.core.io.storage import AtomicPath, check_destination, first_line

from .sources import LABELS_FILE, Source, open_source
from .transforms import Spec, convert_chunk, parse_resolution

CHUNK = 64  # at most this many items per task sent to a worker process
DATE_TIME = (1980, 1, 1, 0, 0, 0)  # every member's timestamp: the earliest a ZIP can hold
MAX_WORKERS = 8
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): the signal a process gets when its parent dies


def member_name(idx: int) -> str:
    """EDM's name of image ``idx`` in a dataset: ``{idx:08d}[:5]/img{idx:08d}.png``."""
    s = f"{idx:08d}"
    return f"{s[:5]}/img{s}.png"


# --- writing ---------------------------------------------------------------------------------------------------------


class ZipWriter:
    """A deterministic ``ZIP_STORED`` archive written to a temporary file and moved onto ``dst`` by ``commit``;
    ``abort`` (or leaving the ``with`` block without committing) removes every temporary file."""

    def __init__(self, dst: str, overwrite: bool = False):
        if not dst.lower().endswith(".zip"):
            raise DpdmError(f"{dst!r}: the destination must be a .zip file (EDM's dataset format is an uncompressed "
                            f"zip), e.g. {posixpath.splitext(dst.rstrip('/'))[0] or 'dataset'}.zip")
        check_destination(dst)  # unknown protocol, a parent that is a file, no permission, unreachable storage
        try:
            fs, target = fsspec.core.url_to_fs(dst)
            exists = fs.exists(target)
        except Exception as exc:  # storage that failed after the check
            raise DpdmError(f"cannot write to {dst!r}: {exc}") from None
        self.dst = dst
        if exists and fs.isdir(target):
            raise DpdmError(f"{dst!r} is a folder; give the name of a .zip file to write")
        if exists and not overwrite:
            raise DpdmError(f"{dst!r} already exists; pass --overwrite to replace it, or choose another name")
        parent = os.path.dirname(target)
        if isinstance(fs, LocalFileSystem) and not os.path.isdir(parent):
            raise DpdmError(f"cannot write {dst!r}: the folder {parent!r} does not exist; create it first")
        self.staged = AtomicPath(dst)  # a hidden sibling of a local dst, else a local file uploaded by commit
        try:
            self.file = open(self.staged.path, "xb")  # not mkstemp: the archive gets the umask's permissions, not 0600
        except BaseException:
            self.staged.discard()
            raise
        self.zip = zipfile.ZipFile(self.file, "w", compression=zipfile.ZIP_STORED)
        self.done = False

    def write(self, name: str, data: bytes) -> None:
        """Add member ``name`` with fixed timestamp and attributes (so the bytes depend only on the content)."""
        info = zipfile.ZipInfo(name, date_time=DATE_TIME)
        info.compress_type = zipfile.ZIP_STORED
        info.create_system = 3  # unix, whatever the platform
        info.external_attr = 0o644 << 16  # -rw-r--r--
        self.zip.writestr(info, data)

    def commit(self) -> None:
        """Finish the archive and move it onto ``dst``."""
        self.zip.close()
        self.file.close()
        try:
            self.staged.commit()
        except Exception as exc:  # storage failures: permissions, network
            raise DpdmError(f"cannot write {self.dst!r}: {exc}") from None
        self.done = True

    def abort(self) -> None:
        """Remove the temporary file."""
        with contextlib.suppress(Exception):
            self.zip.close()
        with contextlib.suppress(Exception):
            self.file.close()
        self.staged.discard()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self.done:
            self.abort()
        return False


# --- the conversion --------------------------------------------------------------------------------------------------


@dataclass
class Report:
    """What ``prepare`` wrote: ``count`` images of ``resolution`` × ``resolution`` with ``channels`` channels,
    ``label_dim`` (0 if unlabelled, as ``image_zip`` will read it), the class names, and the skipped files."""

    dst: str
    src: str
    kind: str
    count: int
    resolution: int
    channels: int
    label_dim: int
    classes: list[str] | None
    skipped: list[tuple[str, str]]
    notes: list[str]

    def to_dict(self) -> dict:
        """JSON-ready fields (skipped files as ``{"name", "reason"}``)."""
        d = dict(self.__dict__)
        d["skipped"] = [{"name": n, "reason": r} for n, r in self.skipped]
        return d


def _results(source: Source, spec: Spec, workers: int) -> Iterator[tuple]:
    """``convert_item`` results for every item in order, computed in chunks by ``workers`` processes; chunks are
    read and submitted lazily (a window of ``2 * workers``), so stopping early wastes at most the window."""
    size = min(CHUNK, max(1, -(-source.count // (4 * workers))))  # small sets still reach every worker
    ranges = ((a, min(a + size, source.count)) for a in range(0, source.count, size))
    if workers == 1:
        for a, b in ranges:
            yield from convert_chunk([source.read(i) for i in range(a, b)], spec)
        return
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"),  # never fork a process that holds torch
                               initializer=end_with_parent, initargs=(os.getpid(),))
    pending = deque()

    def submit(a: int, b: int) -> None:
        pending.append(pool.submit(convert_chunk, [source.read(i) for i in range(a, b)], spec))

    try:
        for a, b in islice(ranges, 2 * workers):
            submit(a, b)
        while pending:
            try:
                converted = pending.popleft().result()
            except BrokenProcessPool as exc:
                raise DpdmError(f"a worker process died ({first_line(exc)}); a script that calls prepare() with "
                                f"workers > 1 must guard its top level with `if __name__ == '__main__':`, or pass "
                                f"--workers 1") from None
            nxt = next(ranges, None)
            if nxt is not None:
                submit(*nxt)
            yield from converted
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def end_with_parent(parent: int) -> None:
    """Pool worker initializer: the worker ends with ``parent``. Ctrl-C is the parent's to handle (it shuts the pool
    down); if the parent dies, even by SIGKILL, the kernel sends SIGTERM (Linux's ``PR_SET_PDEATHSIG``) or, elsewhere,
    a thread that watches the parent pid ends the worker within a second."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (AttributeError, OSError, TypeError):  # not Linux
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _check_size(source: Source, i: int, size: tuple[int, int], first: tuple[int, tuple[int, int]] | None) -> None:
    """The first image must be square and a power of two wide; every other one the size of the first."""
    w, h = size
    if first is None:
        if w != h or w & (w - 1):
            raise DpdmError(f"{source.where(i)} is {w}x{h}; EDM datasets hold square images a power of two wide: "
                            f"pass --resolution R (e.g. 64) and, for images that are not square, --transform "
                            f"center-crop")
    elif size != first[1]:
        fw, fh = first[1]
        raise DpdmError(f"{source.where(i)} is {w}x{h} but {source.where(first[0])} is {fw}x{fh}; the images differ "
                        f"in size: pass --resolution R (e.g. {fw}) and, for images that are not square, --transform "
                        f"center-crop")


@dataclass
class _Written:
    """What ``_write_items`` wrote: the image count, the first image (index, size), labels and skipped files."""

    count: int = 0
    seen: int = 0  # items read, written or skipped
    first: tuple[int, tuple[int, int]] | None = None
    labels: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    all_gray: bool = True


def _write_items(source: Source, spec: Spec, out: ZipWriter, labels: np.ndarray | None, workers: int,
                 max_images: int | None, progress) -> _Written:
    """Convert the source's items and write them in index order, stopping after ``max_images`` images."""
    done = _Written(skipped=list(source.skipped))
    total = source.count if max_images is None else min(source.count, max_images)
    with progress.task("prepare", total) as task, contextlib.closing(_results(source, spec, workers)) as results:
        for i, result in enumerate(results):
            task.advance(1)
            done.seen = i + 1
            if result[0] == "skip":
                done.skipped.append((source.name(i), result[1]))
                continue
            if result[0] == "error":
                raise DpdmError(f"{source.where(i)} {result[1]}")
            _, png, size, gray = result
            _check_size(source, i, size, done.first)
            done.first = done.first or (i, size)
            done.all_gray &= gray
            name = member_name(done.count)
            out.write(name, png)
            if labels is not None:
                done.labels.append([name, int(labels[i])])
            done.count += 1
            if done.count == max_images:
                break
    return done


def _want_labels(source: Source, labels: bool | None) -> np.ndarray | None:
    """The labels to write: the source's (``labels`` None or True), none (False); True without labels is an error."""
    if labels is False:
        return None
    if labels and source.labels is None:
        how = ("put the images into one subfolder per class" if source.kind in ("folder", "zip")
               else "store them under the key 'labels'")
        raise DpdmError(f"--labels: {source.path!r} has no labels; {how}, or leave --labels out")
    return source.labels


def spec_for(source: Source, size: tuple[int, int] | None, transform: str, channels: int | None) -> Spec:
    """The workers' ``Spec``: ``channels`` or the source's own channel count, RGB for image files."""
    return Spec(transform, *(size or (None, None)), channels or source.channels or 3)


def _convert(source: Source, spec: Spec, out: ZipWriter, labels: bool | None, workers: int | None,
             max_images: int | None, progress) -> tuple[_Written, list[str] | None]:
    """Write every image and ``dataset.json`` (with ``"classes"`` when known) into ``out``; the written items and
    the class names."""
    if source.count == 0:
        listed = "".join(f"; {n}: {r}" for n, r in source.skipped[:3])
        raise DpdmError(f"no images in {source.path!r} ({len(source.skipped)} other files{listed}); EDM datasets are "
                        f"made from files with an image extension (.png, .jpg, .jpeg, .webp, ...)")
    want = _want_labels(source, labels)
    workers = default_workers(source.count) if workers is None else min(workers, source.count)
    done = _write_items(source, spec, out, want, workers, max_images, progress)
    if done.count == 0:
        shown = "; ".join(f"{n}: {r}" for n, r in done.skipped[:3])
        raise DpdmError(f"no image of {source.path!r} could be converted ({len(done.skipped)} skipped: {shown}); "
                        f"nothing was written")
    classes = list(source.classes) if want is not None and source.classes else None
    meta = {"labels": done.labels if want is not None else None}
    if classes:
        meta["classes"] = classes
    out.write(LABELS_FILE, json.dumps(meta).encode())
    return done, classes


def default_workers(count: int) -> int:
    """``min(MAX_WORKERS, cpu count)``, but no more than one per ``CHUNK`` items: a small set is converted in this
    process rather than paying for starting a pool."""
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1, -(-count // CHUNK)))


def prepare(src: str, dst: str, *, resolution=None, transform: str = "none", kind: str | None = None,
            split: str | None = None, labels: bool | None = None, channels: int | None = None,
            max_images: int | None = None, workers: int | None = None, overwrite: bool = False,
            progress=None) -> Report:
    """Convert ``src`` into the EDM dataset ZIP ``dst`` (see the module docstring) and report what was written.

    ``resolution``: ``R`` or ``"WxH"`` (``parse_resolution``); ``transform``: one of ``TRANSFORMS``; ``kind``: one
    of ``KINDS`` (default: detected); ``split``: ``train``/``test`` for CIFAR-10, MNIST and npz; ``labels``: write
    the source's labels (None: if it has any); ``channels``: 1 or 3; ``max_images``: stop after that many images;
    ``workers``: processes (default ``default_workers``); ``progress``: a ``dpdm.core.progress.Progress``.
    """
    from dpdm.core.progress import Progress

    size = parse_resolution(resolution, transform)
    if max_images is not None and max_images < 1:
        raise DpdmError(f"--max-images must be at least 1, got {max_images}")
    if workers is not None and workers < 1:
        raise DpdmError(f"--workers must be at least 1, got {workers}")
    if channels is not None and channels not in (1, 3):
        raise DpdmError(f"--channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    with ZipWriter(dst, overwrite) as out:  # checks dst first: a bad destination fails before any reading
        source = open_source(src, kind, split, labels is not False)
        try:
            done, classes = _convert(source, spec_for(source, size, transform, channels), out, labels, workers,
                                     max_images, progress or Progress())
        finally:
            source.close()
        out.commit()
    label_dim = max(label for _, label in done.labels) + 1 if done.labels else 0
    notes = []
    if source.channels is None and channels is None and done.all_gray:
        notes.append("every image was grayscale but is stored as RGB; pass --channels 1 to store one channel")
    if done.seen < source.count:
        notes.append(f"stopped at --max-images {max_images}: read {done.seen} of the {source.count} images")
    return Report(dst, src, source.kind, done.count, done.first[1][0], channels or source.channels or 3, label_dim,
                  classes, done.skipped, notes)
