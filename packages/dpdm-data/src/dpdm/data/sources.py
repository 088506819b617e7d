"""The inputs of ``dpdm data prepare``: finding what ``src`` is and reading its items one by one.

Sources (``KINDS``; detected from ``src`` by ``detect_kind``, or forced with ``kind``):

- ``folder``: a folder of images, searched recursively and sorted by relative path. Class subfolders
  (ImageNet-style ``src/<class>/<image>``) give labels: the index of the top-level folder among the sorted
  top-level folder names, as EDM's ``dataset_tool.py`` (``open_image_folder``) does; a flat folder, or one that
  holds a single folder, is unlabelled. A ``dataset.json`` with labels in ``src`` (an EDM dataset being remade)
  gives the labels instead.
- ``zip``: the same, read from the members of a zip archive (an EDM dataset ZIP, for instance).
- ``cifar10``: the official ``cifar-10-python.tar.gz`` or its extracted folder (``dpdm.data.cifar10``), split
  ``train`` (data_batch_1..5, 50,000 images) or ``test``.
- ``mnist`` / ``fashion-mnist``: the folder of official IDX files, or its ``train-images-idx3-ubyte.gz`` as EDM
  takes it (``dpdm.data.mnist``); the 28 × 28 images are zero-padded to 32 × 32 first, as EDM's tool does. Both
  use the same file names, so detection says ``mnist``; force ``fashion-mnist`` for its class names.
- ``npz``: uint8 images and optional labels in a ``.npz`` file (``dpdm.data.npz``).

A ``Source`` hands out payloads: encoded file bytes (folder, zip), uint8 ``(H, W, C)`` arrays (cifar10, mnist,
npz; ``channels`` is then their own channel count), or a string saying why a file could not be read. Files with
no extension Pillow registers (``is_image``, EDM's loader test) are skipped before decoding and listed with the
reason; a source's own ``dataset.json`` is read for labels, not listed. Decoding and the transform happen in
``dpdm.data.transforms``; the pipeline in ``dpdm.data.prepare``.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image

from dpdm.core.errors import DpdmError, did_you_mean
from dpdm.core.io.storage import first_line

from .storage import locate

KINDS = ("folder", "zip", "cifar10", "mnist", "fashion-mnist", "npz")  # the keys of SOURCES
SPLIT_KINDS = ("cifar10", "mnist", "fashion-mnist", "npz")
LABELS_FILE = "dataset.json"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MNIST_CLASSES = tuple(str(d) for d in range(10))
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


def is_image(name: str) -> bool:
    """Whether ``name`` has an extension Pillow registers (EDM's ``is_image_ext``)."""
    Image.init()
    return os.path.splitext(name)[1].lower() in Image.EXTENSION


@dataclass
class Source:
    """Items to convert: ``read(i)`` gives item ``i``'s payload, ``name(i)`` how the report names it and
    ``where(i)`` how errors locate it; ``labels`` holds class indices (or None), ``classes`` their names."""

    kind: str
    path: str
    count: int
    read: Callable[[int], object]
    name: Callable[[int], str]
    where: Callable[[int], str]
    labels: np.ndarray | None = None
    classes: list[str] | None = None
    channels: int | None = None  # the images' own channel count (array sources); None for image files
    skipped: list[tuple[str, str]] = field(default_factory=list)  # files left out before decoding
    close: Callable[[], None] = lambda: None


def detect_kind(src: str) -> str:
    """The source kind of ``src`` from its name and contents (see the module docstring)."""
    fs, local, is_dir, exists = locate("data prepare", src)
    if not exists:
        raise DpdmError(f"{src!r} not found; give an image folder, a zip of images, cifar-10-python.tar.gz, a folder "
                        f"of MNIST IDX files or a .npz file")
    if is_dir:
        names = {posixpath.basename(p.rstrip("/")) for p in fs.ls(local, detail=False)}
        from .cifar10 import FOLDER
        from .mnist import FILES

        if any(f"{FILES['train'][0]}{ext}" in names or f"{FILES['test'][0]}{ext}" in names for ext in (".gz", "")):
            return "mnist"
        if FOLDER in names or "data_batch_1" in names:
            return "cifar10"
        return "folder"
    base = posixpath.basename(local).lower()
    if base.endswith(".npz"):
        return "npz"
    if base.endswith(".zip"):
        return "zip"
    if base.startswith(("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")):
        return "mnist"
    if base.endswith((".tar.gz", ".tgz", ".tar")):
        return _tar_kind(fs, local, src)
    with fs.open(local, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        return "zip"
    raise DpdmError(f"cannot tell what kind of source {src!r} is; pass --source with one of {', '.join(KINDS)}")


def _tar_kind(fs, local: str, src: str) -> str:
    """``cifar10`` for a tar archive whose first member is in ``cifar-10-batches-py/``; any other tar is an error
    (its images are not read in place: it would have to be read whole, since tar has no index)."""
    from .cifar10 import FOLDER

    try:
        with fs.open(local, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            first = next(iter(tar), None)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DpdmError(f"{src!r} is not a readable tar archive ({first_line(exc)}); give cifar-10-python.tar.gz, or "
                        f"pass --source with one of {', '.join(KINDS)}") from None
    if first is not None and first.name.lstrip("./").startswith(FOLDER):
        return "cifar10"
    shown = f" (it holds {first.name!r}, ...)" if first is not None else ""
    raise DpdmError(f"{src!r} is a tar archive but not CIFAR-10's cifar-10-python.tar.gz{shown}; tar archives of "
                    f"images are not read in place: extract it (tar xf) and give the folder")


def _labels_table(blob: bytes, where: str) -> tuple[dict | None, list[str] | None]:
    """``{name: class}`` and the class names from a ``dataset.json``, or ``(None, None)`` if unlabelled."""
    try:
        table = json.loads(blob)
        entries = table["labels"]
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise DpdmError(f"{where} is not an EDM dataset.json ({first_line(exc)}); remove it, or pass --no-labels"
                        ) from None
    if entries is None:
        return None, None
    if not isinstance(entries, list) or not all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], str)
                                                and isinstance(e[1], int) and not isinstance(e[1], bool)
                                                and e[1] >= 0 for e in entries):
        raise DpdmError(f"{where}: 'labels' must be a list of [file name, class index] pairs; pass --no-labels to "
                        f"ignore it")
    classes = table.get("classes")
    ok = isinstance(classes, list) and all(isinstance(c, str) for c in classes)
    return dict(entries), (classes if ok else None)


def _file_labels(src: str, images: list[str], meta: bytes | None, where_meta: str):
    """Labels of ``images`` (relative names) and class names: from ``dataset.json`` if it has labels, else the
    sorted top-level folder names as EDM's ``open_image_folder`` derives them; ``(None, None)`` if unlabelled."""
    table, classes = _labels_table(meta, where_meta) if meta is not None else (None, None)
    if table is not None:
        missing = [n for n in images if n not in table]
        if missing:
            raise DpdmError(f"{where_meta} has no label for {missing[0]!r} ({len(missing)} of {len(images)} images); "
                            f"fix it, or pass --no-labels")
        return np.array([table[n] for n in images], dtype=np.int64), classes
    tops = [n.split("/", 1)[0] if "/" in n else "" for n in images]
    folders = sorted(set(tops))
    if len(folders) <= 1:
        return None, None
    if "" in folders:
        loose = images[tops.index("")]
        raise DpdmError(f"{src!r} holds images at its top level (e.g. {loose!r}) beside class folders "
                        f"({', '.join(f for f in folders if f)[:200]}); move them into a class folder, or pass "
                        f"--no-labels to ignore the folders")
    index = {name: i for i, name in enumerate(folders)}
    return np.array([index[t] for t in tops], dtype=np.int64), folders


def _split_files(files: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The image files (sorted) and the other files with the reason they are skipped; ``dataset.json`` is neither."""
    images, skipped = [], []
    for name in sorted(files):
        if name == LABELS_FILE:
            continue
        if is_image(name):
            images.append(name)
        else:
            ext = os.path.splitext(name)[1]
            skipped.append((name, f"not an image file ({'extension ' + ext if ext else 'no extension'})"))
    return images, skipped


def _folder_source(src: str, split: None, want_labels: bool) -> Source:
    """Images under a folder on any fsspec storage (see the module docstring)."""
    fs, local, is_dir, exists = locate("data prepare", src)
    if not exists or not is_dir:
        raise DpdmError(f"{src!r} is {'a file' if exists else 'not found'}; --source folder needs a folder of images")
    root = local.rstrip("/")
    prefix = root + "/"
    files = [p[len(prefix):] for p in fs.find(root) if p.startswith(prefix)]
    images, skipped = _split_files(files)
    labels = classes = None
    if want_labels:
        meta = fs.cat_file(f"{root}/{LABELS_FILE}") if LABELS_FILE in files else None
        labels, classes = _file_labels(src, images, meta, f"{src.rstrip('/')}/{LABELS_FILE}")
    shown = src.rstrip("/")

    def read(i: int):
        try:
            return fs.cat_file(f"{root}/{images[i]}")
        except OSError as exc:
            return f"cannot read ({first_line(exc)})"

    return Source("folder", src, len(images), read, images.__getitem__, lambda i: f"{shown}/{images[i]}",
                  labels, classes, None, skipped)


def _zip_source(src: str, split: None, want_labels: bool) -> Source:
    """Images among the members of a zip archive on any fsspec storage (see the module docstring)."""
    fs, local, is_dir, exists = locate("data prepare", src)
    if not exists or is_dir:
        raise DpdmError(f"{src!r} is {'a folder' if exists else 'not found'}; --source zip needs a zip archive")
    handle = fs.open(local, "rb")
    try:
        archive = zipfile.ZipFile(handle)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        handle.close()
        raise DpdmError(f"{src!r} is not a readable zip archive ({first_line(exc)}); give a zip of images, or pass "
                        f"--source with one of {', '.join(KINDS)}") from None
    files = [info.filename for info in archive.infolist() if not info.is_dir()]
    images, skipped = _split_files(files)

    def close():
        archive.close()
        handle.close()

    labels = classes = None
    try:
        if want_labels:
            meta = archive.read(LABELS_FILE) if LABELS_FILE in files else None
            labels, classes = _file_labels(src, images, meta, f"{src} (member {LABELS_FILE})")
    except BaseException:
        close()
        raise

    def read(i: int):
        try:
            return archive.read(images[i])
        except (zipfile.BadZipFile, OSError, EOFError, KeyError) as exc:
            return f"cannot read ({first_line(exc)})"

    return Source("zip", src, len(images), read, images.__getitem__, lambda i: f"{src} (member {images[i]})",
                  labels, classes, None, skipped, close)


def _array_source(kind: str, src: str, split: str, images: np.ndarray, labels, classes) -> Source:
    """uint8 ``(N, H, W, C)`` images held in memory."""
    return Source(kind, src, len(images), images.__getitem__, lambda i: f"{split} image {i}",
                  lambda i: f"{src} ({split} image {i})", labels, classes, int(images.shape[-1]))


def _nhwc(images) -> np.ndarray:
    """A uint8 ``(N, C, H, W)`` tensor as a contiguous ``(N, H, W, C)`` array."""
    return np.ascontiguousarray(images.numpy().transpose(0, 2, 3, 1))


def _cifar10_source(src: str, split: str, want_labels: bool) -> Source:
    """CIFAR-10's official archive (or extracted folder), read by ``dpdm.data.cifar10``."""
    from . import cifar10

    images, labels = cifar10.read_batches(src, cifar10.SPLITS[split])
    return _array_source("cifar10", src, split, _nhwc(images), labels.numpy(), list(CIFAR10_CLASSES))


def _mnist_source(kind: str, src: str, split: str, want_labels: bool) -> Source:
    """MNIST or Fashion-MNIST IDX files (the folder, or its images file), zero-padded to 32 × 32 as EDM does."""
    from .mnist import read_idx

    folder = src
    if not locate(kind, src)[2] and posixpath.basename(src.rstrip("/")).startswith(("train-images", "t10k-images")):
        folder = posixpath.dirname(src.rstrip("/")) or "."
    images, labels = read_idx(folder, split, kind)
    padded = np.pad(_nhwc(images), ((0, 0), (2, 2), (2, 2), (0, 0)))  # (N, 32, 32, 1), EDM's open_mnist
    classes = MNIST_CLASSES if kind == "mnist" else FASHION_MNIST_CLASSES
    return _array_source(kind, src, split, padded, labels.numpy(), list(classes))


def _npz_source(src: str, split: str, want_labels: bool) -> Source:
    """Images and optional labels from a ``.npz`` file, read by ``dpdm.data.npz``."""
    from .npz import npz

    dataset = npz(split, path=src)
    if dataset.shape[0] not in (1, 3):
        raise DpdmError(f"{src!r}: images must have 1 or 3 channels, got shape {tuple(dataset.data.shape)}; "
                        f"store (N, H, W, C) or (N, C, H, W) uint8 arrays")
    labels = dataset.labels.numpy() if dataset.label_dim else None
    return _array_source("npz", src, split, _nhwc(dataset.data), labels, None)


def open_source(src: str, kind: str | None = None, split: str | None = None, labels: bool = True) -> Source:
    """The ``Source`` for ``src``: of ``kind`` (one of ``KINDS``), or detected; ``split`` for the kinds that
    have splits (default ``train``); ``labels=False`` skips working out the labels of image files."""
    if kind is None:
        kind = detect_kind(src)
    elif kind not in KINDS:
        raise DpdmError(f"unknown source kind {kind!r}; choose one of {', '.join(KINDS)}.{did_you_mean(kind, KINDS)}")
    if kind not in SPLIT_KINDS:
        if split is not None:
            raise DpdmError(f"--split {split}: a {kind} source has no splits; leave --split out")
    else:
        split = split or "train"
        if split not in ("train", "test"):
            raise DpdmError(f"unknown split {split!r}; choose train or test")
    return SOURCES[kind](src, split, labels)


SOURCES = {  # kind -> opener(src, split, want_labels)
    "folder": _folder_source,
    "zip": _zip_source,
    "cifar10": _cifar10_source,
    "mnist": functools.partial(_mnist_source, "mnist"),
    "fashion-mnist": functools.partial(_mnist_source, "fashion-mnist"),
    "npz": _npz_source,
}

