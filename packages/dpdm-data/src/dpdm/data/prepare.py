"""Converting image collections into EDM's dataset ZIP (``dpdm data prepare``), as EDM's ``dataset_tool.py`` does.

The output is what ``image_zip`` (and EDM's ``training/dataset.py``) reads (``../shared/edm_ref/README.md`` §8):
an uncompressed ZIP (``ZIP_STORED``) of uncompressed PNGs (``compress_level=0``) named
``{idx:08d}[:5]/img{idx:08d}.png``, followed by ``dataset.json`` holding ``{"labels": [[name, class], ...]}`` or
``{"labels": null}``. When the class names are known, dataset.json also holds ``"classes": [name, ...]`` (index
``i`` is class ``i``); EDM's reader and ours look up only ``"labels"`` and ignore it.

Sources (``KINDS``; detected from ``src`` by ``detect_kind``, or forced with ``kind``):

- ``folder``: a folder of images, searched recursively and sorted by relative path. Class subfolders
  (ImageNet-style ``src/<class>/<image>``) give labels: the index of the top-level folder among the sorted
  top-level folder names, as EDM does; a flat folder, or one that holds a single folder, is unlabelled. A
  ``dataset.json`` with labels in ``src`` (an EDM dataset being remade) gives the labels instead.
- ``zip``: the same, read from the members of a zip archive (an EDM dataset ZIP, for instance).
- ``cifar10``: the official ``cifar-10-python.tar.gz`` or its extracted folder (``dpdm.data.cifar10``), split
  ``train`` (data_batch_1..5, 50,000 images) or ``test``.
- ``mnist`` / ``fashion-mnist``: the folder of official IDX files, or its ``train-images-idx3-ubyte.gz`` as EDM
  takes it (``dpdm.data.mnist``); the 28 × 28 images are zero-padded to 32 × 32 first, as EDM's tool does. Both
  use the same file names, so detection says ``mnist``; force ``fashion-mnist`` for its class names.
- ``npz``: uint8 images and optional labels in a ``.npz`` file (``dpdm.data.npz``).

Each image is converted to grayscale (``L``) or RGB: ``channels`` is 1 or 3; by default array sources keep their own
channel count and image files become RGB (as EDM's center-crop does; ImageNet holds grayscale and CMYK JPEGs),
with a note in the report when every image was grayscale. Alpha is dropped; 16-bit and float images are skipped.
EXIF orientation is not applied (EDM does not either). Then the transform (``TRANSFORMS``) makes it square:

- ``none``: kept as it is; with ``resolution`` a square image of another size is LANCZOS-resized to it (EDM's
  ``scale``), and a non-square one is an error (EDM would stretch it) that names the file and the transforms;
  without ``resolution`` every image must already have the size of the first one, square and a power of two.
- ``center-crop``: EDM's ``center_crop``: the central ``min(w, h)`` square, LANCZOS-resized to R × R (EDM's ImageNet
  64 × 64 is ``--transform=center-crop --resolution=64x64``).
- ``center-crop-wide``: EDM's ``center_crop_wide`` for a W × H resolution (``"WxH"``; a bare ``R`` means R × R/2):
  ``ch = round(W·h/w)`` rows are cut from the middle of the image (all of its width), that strip is LANCZOS-resized
  to W × H and centred on a black W × W canvas. Exactly EDM's arithmetic: ``ch`` is the strip's height at output
  width W but is taken in input rows, so the strip keeps the W:H shape only for images W wide. Images narrower than
  W, or with ``ch < H``, are skipped (EDM skips them silently; here they are listed).
- ``center-crop-adm``: ADM's ``center_crop_arr`` (guided-diffusion ``image_datasets.py``): halve with BOX while the
  short side is at least 2R, BICUBIC-resize so the short side is R, then take the central R × R.

Corrupt or unreadable files (Pillow cannot decode them), non-image files (no extension Pillow registers, as EDM's
loader tests; a source's own ``dataset.json`` is read, not listed) and images too small for ``center-crop-wide`` are
skipped and listed in the report with the reason. Every other problem (a missing source, sizes that differ without
``resolution``, a bad option) raises one ``DpdmError`` naming the file and the fix.

Parallelism and determinism: items are read in this process, then decoded, transformed and PNG-encoded in chunks
(of at most ``CHUNK``) by a pool of ``workers`` processes (``1``: in this process; by default ``min(8, CPUs)`` but
at most one per ``CHUNK`` items). The pool is started with ``spawn`` (no fork of a process holding torch's
threads), so a script calling ``prepare`` with several workers needs the usual ``if __name__ == "__main__":``
guard. The results are written in index order with a fixed timestamp (``DATE_TIME``) and fixed attributes, so the
ZIP is the same, byte for byte, for any number of workers.

Writing: ``dst`` is a local path or any fsspec URL ending in ``.zip``. A local ZIP is written to a temporary
``.<name>.<random>.tmp`` beside ``dst`` and renamed over it at the end; other filesystems get a local temporary file
that is uploaded beside ``dst`` and then moved onto it. Any failure (or Ctrl-C) removes the temporary files, so
``dst`` is either complete or untouched.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import posixpath
import tarfile
import tempfile
import uuid
import warnings
import zipfile
import zlib
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import islice
from multiprocessing import get_context
from typing import Callable, Iterator

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, UnidentifiedImageError

from dpdm.core.errors import DpdmError, did_you_mean

from .storage import locate

KINDS = ("folder", "zip", "cifar10", "mnist", "fashion-mnist", "npz")  # the keys of SOURCES
TRANSFORMS = ("none", "center-crop", "center-crop-wide", "center-crop-adm")
SPLIT_KINDS = ("cifar10", "mnist", "fashion-mnist", "npz")
LABELS_FILE = "dataset.json"
CHUNK = 64  # at most this many items per task sent to a worker process
DATE_TIME = (1980, 1, 1, 0, 0, 0)  # every member's timestamp: the earliest a ZIP can hold
MAX_WORKERS = 8
GRAY_MODES = ("1", "L", "LA", "La")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MNIST_CLASSES = tuple(str(d) for d in range(10))
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


def _text(exc: BaseException) -> str:
    """An exception's first line, or its type's name when it has no message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_image(name: str) -> bool:
    """Whether ``name`` has an extension Pillow registers (EDM's ``is_image_ext``)."""
    Image.init()
    return os.path.splitext(name)[1].lower() in Image.EXTENSION


def member_name(idx: int) -> str:
    """EDM's name of image ``idx`` in a dataset: ``{idx:08d}[:5]/img{idx:08d}.png``."""
    s = f"{idx:08d}"
    return f"{s[:5]}/img{s}.png"


# --- options -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """What every worker does to an item: the transform, the output width × height and the channel count."""

    transform: str
    width: int | None
    height: int | None
    channels: int


def parse_resolution(resolution, transform: str) -> tuple[int, int] | None:
    """``(width, height)`` from ``resolution`` (``64``, ``"64"``, ``"64x64"`` or ``"512,384"``), checked for
    ``transform``: square for all but ``center-crop-wide`` (where a bare ``R`` is R × R/2), a power of two wide."""
    if transform not in TRANSFORMS:
        raise DpdmError(f"unknown transform {transform!r}; choose one of {', '.join(TRANSFORMS)}."
                        f"{did_you_mean(transform, TRANSFORMS)}")
    if resolution is None or resolution == "":
        if transform != "none":
            raise DpdmError(f"--transform {transform} needs --resolution, e.g. --resolution 64")
        return None
    text = str(resolution).strip().lower()
    parts = text.replace(",", "x").split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise DpdmError(f"--resolution must be a size such as 64 or 64x64, got {resolution!r}")
    width = int(parts[0])
    height = int(parts[1]) if len(parts) == 2 else (width // 2 if transform == "center-crop-wide" else width)
    if width & (width - 1):
        lower = 1 << (width.bit_length() - 1)
        raise DpdmError(f"--resolution {resolution}: EDM datasets hold square images a power of two wide; "
                        f"use {lower} or {lower * 2}")
    if transform == "center-crop-wide":
        if not 0 < height <= width:
            raise DpdmError(f"--resolution {resolution}: center-crop-wide needs WxH with 0 < H <= W "
                            f"(the strip is padded to W x W), e.g. 512x384")
    elif height != width:
        raise DpdmError(f"--resolution {resolution}: --transform {transform} makes square images; give one size "
                        f"such as {width}, or use --transform center-crop-wide for a W x H strip on a square canvas")
    return width, height


# --- transforms (PIL images in mode L or RGB) -----------------------------------------------------------------------


class Refused(Exception):
    """An image the transform cannot make into an EDM image: an error for the whole conversion."""


def transform_none(image: Image.Image, width: int | None, height: int | None) -> Image.Image:
    """No crop: the image as it is, or LANCZOS-resized to ``width`` × ``height`` if it is square (EDM's ``scale``)."""
    if width is None or image.size == (width, height):
        return image
    if image.width != image.height:
        raise Refused(f"is {image.width}x{image.height}, not square; pass --transform center-crop (or "
                      f"center-crop-adm, center-crop-wide) to crop it to {width}x{height}")
    return image.resize((width, height), Image.Resampling.LANCZOS)


def center_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """EDM's ``center_crop``: the central ``min(w, h)`` square, LANCZOS-resized to ``width`` × ``height``."""
    w, h = image.size
    crop = min(w, h)
    left, top = (w - crop) // 2, (h - crop) // 2  # EDM: rows (h - crop) // 2 : (h + crop) // 2
    return image.crop((left, top, left + crop, top + crop)).resize((width, height), Image.Resampling.LANCZOS)


def center_crop_wide(image: Image.Image, width: int, height: int) -> Image.Image | str:
    """EDM's ``center_crop_wide``: the central ``round(width·h/w)`` rows, LANCZOS-resized to ``width`` × ``height``
    and centred on a black ``width`` × ``width`` canvas; a reason string for images too small (EDM skips them)."""
    w, h = image.size
    ch = int(np.round(width * h / w))
    if w < width or ch < height:
        return (f"too small for center-crop-wide {width}x{height}: it is {w}x{h} (needs width >= {width} and "
                f"round({width}*h/w) = {ch} >= {height})")
    top = (h - ch) // 2  # EDM: rows (h - ch) // 2 : (h + ch) // 2
    strip = image.crop((0, top, w, top + ch)).resize((width, height), Image.Resampling.LANCZOS)
    canvas = Image.new(image.mode, (width, width))  # black
    canvas.paste(strip, (0, (width - height) // 2))
    return canvas


def center_crop_adm(image: Image.Image, width: int, height: int) -> Image.Image:
    """ADM's ``center_crop_arr`` (guided-diffusion): BOX-halve while the short side is >= 2R, BICUBIC-resize so the
    short side is R, then the central R × R (R = ``width`` = ``height``)."""
    size = width
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


TRANSFORM_FNS = {"none": transform_none, "center-crop": center_crop, "center-crop-wide": center_crop_wide,
                 "center-crop-adm": center_crop_adm}


# --- the per-item work (runs in the worker processes) ---------------------------------------------------------------


def _decode(payload) -> Image.Image:
    """A loaded PIL image from encoded file bytes or a uint8 ``(H, W, C)`` array."""
    if isinstance(payload, np.ndarray):
        return Image.fromarray(payload[..., 0], "L") if payload.shape[-1] == 1 else Image.fromarray(payload, "RGB")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EXIF, palette-transparency and size warnings: the image still decodes
        image = Image.open(io.BytesIO(payload))
        image.load()
    return image


def _to_mode(image: Image.Image, channels: int) -> Image.Image:
    """The image as grayscale (``L``) for ``channels`` 1 or RGB for 3; alpha is dropped."""
    target = "L" if channels == 1 else "RGB"
    if image.mode == target:
        return image
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")  # a palette with transparency converts cleanly only through RGBA
    return image.convert(target)


def convert_item(payload, spec: Spec) -> tuple:
    """One item: ``("ok", png, (w, h), was_gray)``, ``("skip", reason)`` or ``("error", message)``.

    ``payload`` is file bytes, a uint8 ``(H, W, C)`` array, or a string saying why the file could not be read.
    """
    if isinstance(payload, str):
        return ("skip", payload)
    try:
        image = _decode(payload)
    except UnidentifiedImageError:
        return ("skip", "cannot decode (Pillow does not recognise its contents as an image)")
    except Exception as exc:  # truncated or corrupt: Pillow raises many types
        return ("skip", f"cannot decode ({_text(exc)})")
    if image.mode.startswith(("I", "F")):
        return ("skip", f"unsupported mode {image.mode} (16-bit or float); save it as 8-bit")
    gray = image.mode in GRAY_MODES
    try:
        out = TRANSFORM_FNS[spec.transform](_to_mode(image, spec.channels), spec.width, spec.height)
    except Refused as exc:
        return ("error", str(exc))
    if isinstance(out, str):
        return ("skip", out)
    buffer = io.BytesIO()
    out.save(buffer, format="png", compress_level=0, optimize=False)  # EDM: uncompressed PNG
    return ("ok", buffer.getvalue(), out.size, gray)


def convert_chunk(payloads: list, spec: Spec) -> list[tuple]:
    """``convert_item`` over a chunk of payloads, in order (the task a worker process runs)."""
    return [convert_item(p, spec) for p in payloads]


# --- sources ---------------------------------------------------------------------------------------------------------


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
        raise DpdmError(f"{src!r} is not a readable tar archive ({_text(exc)}); give cifar-10-python.tar.gz, or "
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
        raise DpdmError(f"{where} is not an EDM dataset.json ({_text(exc)}); remove it, or pass --no-labels") from None
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
        if _is_image(name):
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
            return f"cannot read ({_text(exc)})"

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
        raise DpdmError(f"{src!r} is not a readable zip archive ({_text(exc)}); give a zip of images, or pass "
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
            return f"cannot read ({_text(exc)})"

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


# --- writing ---------------------------------------------------------------------------------------------------------


class ZipWriter:
    """A deterministic ``ZIP_STORED`` archive written to a temporary file and moved onto ``dst`` by ``commit``;
    ``abort`` (or leaving the ``with`` block without committing) removes every temporary file."""

    def __init__(self, dst: str, overwrite: bool = False):
        if not dst.lower().endswith(".zip"):
            raise DpdmError(f"{dst!r}: the destination must be a .zip file (EDM's dataset format is an uncompressed "
                            f"zip), e.g. {posixpath.splitext(dst.rstrip('/'))[0] or 'dataset'}.zip")
        try:
            self.fs, self.target = fsspec.core.url_to_fs(dst)
            exists = self.fs.exists(self.target)
        except Exception as exc:  # unknown protocol, missing backend, unreachable storage
            raise DpdmError(f"cannot write to {dst!r}: {exc}") from None
        self.dst, self.local = dst, isinstance(self.fs, LocalFileSystem)
        if exists and self.fs.isdir(self.target):
            raise DpdmError(f"{dst!r} is a folder; give the name of a .zip file to write")
        if exists and not overwrite:
            raise DpdmError(f"{dst!r} already exists; pass --overwrite to replace it, or choose another name")
        split = os.path.split if self.local else posixpath.split
        parent, base = split(self.target)
        if self.local and not os.path.isdir(parent):
            raise DpdmError(f"cannot write {dst!r}: the folder {parent!r} does not exist; create it first")
        token = uuid.uuid4().hex[:12]
        self.remote_tmp = None if self.local else posixpath.join(parent, f".{base}.{token}.tmp")
        if self.local:
            self.tmp = os.path.join(parent, f".{base}.{token}.tmp")
            self.file = open(self.tmp, "xb")  # not mkstemp: the archive gets the umask's permissions, not 0600
        else:
            fd, self.tmp = tempfile.mkstemp(prefix="dpdm-prepare-", suffix=".zip")
            self.file = os.fdopen(fd, "wb")
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
        if self.local:
            os.replace(self.tmp, self.target)
        else:
            try:
                self.fs.put_file(self.tmp, self.remote_tmp)
                self.fs.mv(self.remote_tmp, self.target)
            except Exception as exc:  # storage failures: permissions, network
                raise DpdmError(f"cannot write {self.dst!r}: {exc}") from None
            finally:
                os.remove(self.tmp)
        self.done = True

    def abort(self) -> None:
        """Remove the temporary files (local and, for fsspec destinations, the uploaded one)."""
        with contextlib.suppress(Exception):
            self.zip.close()
        with contextlib.suppress(Exception):
            self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.tmp)
        if self.remote_tmp is not None:
            with contextlib.suppress(Exception):
                if self.fs.exists(self.remote_tmp):
                    self.fs.rm(self.remote_tmp)

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
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))  # never fork a process that holds torch
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
                raise DpdmError(f"a worker process died ({_text(exc)}); a script that calls prepare() with workers > 1 "
                                f"must guard its top level with `if __name__ == '__main__':`, or pass --workers 1"
                                ) from None
            nxt = next(ranges, None)
            if nxt is not None:
                submit(*nxt)
            yield from converted
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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
