"""EDM's image dataset format: an uncompressed ZIP or a folder of PNGs (``image-zip``, ``image-folder``).

This reads what EDM's ``dataset_tool.py`` writes and its ``training/dataset.py`` (``ImageFolderDataset``)
reads (``../shared/edm_ref/README.md`` §8): images at ``{idx:08d}[:5]/img{idx:08d}.png`` (folders
``00000/``, ``00001/``, … of 1000 images each) and, at the root, ``dataset.json`` holding
``{"labels": [["00000/img00000000.png", 6], ...]}``, or ``{"labels": null}`` when unlabelled. As EDM does:

- the images are every file whose extension Pillow registers (``PIL.Image.EXTENSION``), sorted by their
  path relative to the root;
- labels are looked up by that path; integer labels are class indices with ``label_dim = max + 1``
  (dpdm's dataset contract has no float label vectors, so those are refused); a missing ``dataset.json``
  or ``"labels": null`` makes the set unlabelled (``label_dim`` 0), as does ``labels=False``;
- images are uint8 ``(C, H, W)``, square, a power of two wide, with 1 (mode ``L``) or 3 (``RGB``) channels;
- ``max_size`` keeps a random subset: the indices are shuffled with ``np.random.RandomState(seed % 2**31)``,
  the first ``max_size`` kept and sorted back into file order;
- ``xflip=True`` appends mirrored copies (item ``i + N`` is item ``i`` flipped left-right).

Splits: the format has none. ``"train"`` is the whole set (with the ``xflip`` copies) and ``"test"`` is the
same images without mirrored copies, because EDM computes its FID reference statistics from the training
set itself (``fid.py ref --data=...``); any other split is a ``ValueError``.

Reading: ``path`` is any fsspec path or URL. The ZIP (``image-zip``) is opened with ``fsspec.open`` and
``zipfile.ZipFile`` on the file object and listed once; the folder (``image-folder``) is listed once with
the filesystem's ``find``. Images are decoded lazily, one per ``__getitem__``, so a large set is never held
in memory; the ZIP handle is reopened once per process (it is keyed by pid and dropped when the dataset is
pickled), so DataLoader workers do not share a file position. Only the first image is decoded at
construction (it sets the shape); every other image is checked against that shape when it is decoded.

``tensors()`` decodes every item into one uint8 ``(N, C, H, W)`` tensor and its labels on its first call
and caches them in the dataset: that is for small sets (CIFAR-10 sized) and dpdm's in-memory training loop;
large sets should be iterated instead.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
import zlib

import fsspec
import numpy as np
import torch
from PIL import Image

from dpdm.core.io import storage
from dpdm.core.errors import DpdmError
from dpdm.core.io.storage import first_line

from .sources import LABELS_FILE, is_image
from .storage import locate

SPLITS = ("train", "test")
MODES = {"L": 1, "RGB": 3}
PREPARE = "dpdm data prepare SRC DST.zip --resolution R [--transform center-crop]"  # makes an EDM dataset ZIP
MAKE_IT = f"make it with `{PREPARE}`"


class _ZipReader:
    """Members of a ZIP archive at an fsspec path; the handle is opened lazily, once per process."""

    def __init__(self, name: str, path: str):
        self.name, self.path = name, path
        self._handle = None  # (pid, open file, ZipFile)
        self.files = [info.filename for info in self._zip().infolist() if not info.is_dir()]

    def _zip(self) -> zipfile.ZipFile:
        if self._handle is None or self._handle[0] != os.getpid():
            try:  # (again) in this process: a DataLoader worker may find the storage gone
                f = fsspec.open(self.path, "rb").open()
            except Exception as exc:  # missing key, unreachable storage, permissions: backends raise many types
                raise self._unreachable(exc) from None
            try:
                self._handle = (os.getpid(), f, zipfile.ZipFile(f))
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                f.close()
                raise DpdmError(f"{self.name}: {self.path!r} is not a readable zip archive ({first_line(exc)}); "
                                f"{MAKE_IT}, or use image-folder for a folder of images") from None
            except Exception as exc:  # the storage failed while the directory was read (botocore's errors, ...)
                f.close()
                raise self._unreachable(exc) from None
        return self._handle[2]

    def _unreachable(self, exc: Exception) -> DpdmError:
        """The error for storage that failed under the archive, naming it and what to check."""
        return DpdmError(f"{self.name}: cannot open {self.path!r}: {first_line(exc)}{storage.hint(self.path)}")

    def read(self, member: str) -> bytes:
        archive = self._zip()
        try:
            return archive.read(member)
        except (zipfile.BadZipFile, EOFError, KeyError, zlib.error) as exc:
            raise DpdmError(f"{self.name}: cannot read member {member!r} of {self.path!r} ({first_line(exc)}); "
                            f"the archive is damaged, {MAKE_IT}") from None
        except Exception as exc:  # the storage failed mid-read (OSError, botocore's connection errors, ...)
            raise DpdmError(f"{self.name}: cannot read member {member!r} of {self.path!r}: {first_line(exc)}"
                            f"{storage.hint(self.path)}") from None

    def close(self) -> None:
        if self._handle is not None:
            self._handle[2].close()
            self._handle[1].close()
            self._handle = None

    def __getstate__(self):
        return {**self.__dict__, "_handle": None}


class _FolderReader:
    """Files under a folder at an fsspec path, named by their path relative to it."""

    def __init__(self, name: str, path: str, fs, root: str):
        self.name, self.path, self.fs, self.root = name, path, fs, root.rstrip("/")
        prefix = self.root + "/"
        try:
            self.files = [p[len(prefix):] for p in fs.find(self.root) if p.startswith(prefix)]
        except storage.errors() as exc:  # the storage failed while listing (botocore's errors, ...)
            raise DpdmError(f"{name}: cannot list {path!r}: {first_line(exc)}{storage.hint(path)}") from None

    def read(self, member: str) -> bytes:
        try:
            with self.fs.open(f"{self.root}/{member}", "rb") as f:
                return f.read()
        except storage.errors() as exc:
            raise DpdmError(f"{self.name}: cannot read {member!r} in {self.path!r} ({first_line(exc)})"
                            f"{storage.hint(self.path)}") from None

    def close(self) -> None:
        pass


def _open(name: str, path: str, want_dir: bool):
    """The reader for ``path``, with a ``DpdmError`` for an empty, missing or wrong-kind path."""
    what = "folder" if want_dir else "zip archive"
    make = f"or make a ZIP with `{PREPARE}` and use image-zip" if want_dir else MAKE_IT
    if not path:
        raise DpdmError(f"{name}: no data path given; set data.path to the dataset {what} ({make}), "
                        f"e.g. --set data.path=cifar10-32x32{'' if want_dir else '.zip'}")
    fs, local, is_dir, exists = locate(name, path)
    if not exists:
        raise DpdmError(f"{name}: {path!r} not found; set data.path to the dataset {what} ({make})")
    if is_dir != want_dir:
        other = "image-folder" if is_dir else "image-zip"
        raise DpdmError(f"{name}: {path!r} is a {'folder' if is_dir else 'file'}, not a {what}; "
                        f"use the dataset {other} for it")
    return _FolderReader(name, path, fs, local) if want_dir else _ZipReader(name, path)


def _labels(name: str, path: str, reader, images: list[str]) -> tuple[np.ndarray | None, int]:
    """Class indices of ``images`` from ``dataset.json`` and ``label_dim``, or ``(None, 0)`` if unlabelled."""
    if LABELS_FILE not in reader.files:
        return None, 0
    where = f"{LABELS_FILE} in {path!r}"
    try:
        table = json.loads(reader.read(LABELS_FILE))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DpdmError(f"{name}: {where} is not valid JSON ({first_line(exc)}); {MAKE_IT}") from None
    if not isinstance(table, dict) or "labels" not in table:
        raise DpdmError(f"{name}: {where} must be an object with a 'labels' entry, "
                        f'e.g. {{"labels": [["00000/img00000000.png", 6], ...]}} or {{"labels": null}}')
    entries = table["labels"]
    if entries is None:
        return None, 0
    if not isinstance(entries, list) or not all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], str)
                                                for e in entries):
        raise DpdmError(f"{name}: {where}: 'labels' must be a list of [file name, class index] pairs or null")
    by_name = dict(entries)
    missing = [image for image in images if image not in by_name]
    if missing:
        raise DpdmError(f"{name}: {where} has no label for {missing[0]!r} ({len(missing)} of {len(images)} images "
                        f"unlabelled), so it does not match the images; remake the dataset, or pass labels=False")
    values = [by_name[image] for image in images]
    bad = next((v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 0), None)
    if bad is not None:
        raise DpdmError(f"{name}: {where}: labels must be class indices (integers >= 0), got {bad!r}; "
                        f"dpdm does not support float label vectors, pass labels=False to ignore them")
    labels = np.asarray(values, dtype=np.int64)
    return labels, int(labels.max()) + 1 if len(labels) else 0


class ImageFolderDataset(torch.utils.data.Dataset):
    """An EDM-format image dataset read lazily from a ZIP or folder (see the module docstring)."""

    kind = "image"

    def __init__(self, name: str, path: str, *, folder: bool, split: str = "train", labels: bool = True,
                 xflip: bool = False, max_size: int | None = None, seed: int = 0, resolution: int | None = None):
        if split not in SPLITS:
            raise ValueError(f"{name}: unknown split {split!r}; valid splits are 'train' and 'test' (both are the "
                             f"whole set: EDM evaluates FID against the training set's statistics)")
        if max_size is not None and max_size < 1:
            raise ValueError(f"{name}: max_size must be at least 1 or None, got {max_size}")
        self.name, self.path, self.split = name, path, split
        self._reader = _open(name, path, folder)
        self._files = sorted(f for f in self._reader.files if is_image(f))
        if not self._files:
            raise DpdmError(f"{name}: no images in {path!r}; expected PNG files such as 00000/img00000000.png "
                            f"({MAKE_IT})")
        raw_labels, self.label_dim = _labels(name, path, self._reader, self._files) if labels else (None, 0)
        self._shape = None
        first = self._decode(0)
        c, h, w = first.shape
        if h != w or h & (h - 1):
            raise DpdmError(f"{name}: {self._files[0]!r} in {path!r} is {w}x{h}; images must be square and a power "
                            f"of two wide; remake it with `dpdm data prepare SRC DST.zip --resolution R "
                            f"--transform center-crop`")
        if resolution is not None and h != resolution:
            raise DpdmError(f"{name}: {self._files[0]!r} in {path!r} is {w}x{h}, not the requested resolution "
                            f"{resolution}x{resolution}; set resolution to {h} or remake the dataset")
        self._shape = tuple(first.shape)
        idx = np.arange(len(self._files), dtype=np.int64)
        if max_size is not None and len(idx) > max_size:
            np.random.RandomState(seed % (1 << 31)).shuffle(idx)
            idx = np.sort(idx[:max_size])
        self._raw_idx = idx
        self._flip = bool(xflip) and split == "train"
        self._labels = torch.from_numpy(raw_labels[idx] if raw_labels is not None
                                        else np.zeros(len(idx), dtype=np.int64))
        self._tensors = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return self._shape

    def __len__(self) -> int:
        return len(self._raw_idx) * (2 if self._flip else 1)

    def _decode(self, raw: int) -> torch.Tensor:
        """File ``raw`` (in sorted order) decoded to uint8 ``(C, H, W)``, checked against the set's shape."""
        member = self._files[raw]
        blob = self._reader.read(member)
        try:
            with Image.open(io.BytesIO(blob)) as image:
                image.load()
                mode = image.mode
                array = np.array(image) if mode in MODES else None
        except Exception as exc:  # truncated, corrupt or not an image: Pillow raises many types
            raise DpdmError(f"{self.name}: cannot decode {member!r} in {self.path!r} ({first_line(exc)}); the file is "
                            f"truncated or not an image, remake the dataset ({MAKE_IT})") from None
        if array is None:
            raise DpdmError(f"{self.name}: {member!r} in {self.path!r} has mode {mode}; images must be 8-bit "
                            f"grayscale (L) or RGB")
        x = torch.from_numpy(array.reshape(*array.shape[:2], -1).transpose(2, 0, 1).copy())
        if self._shape is not None and tuple(x.shape) != self._shape:
            c, h, w = x.shape
            raise DpdmError(f"{self.name}: {member!r} in {self.path!r} is {w}x{h} with {c} channel(s), but the "
                            f"dataset's images ({self._files[0]!r}) are {self._shape[2]}x{self._shape[1]} with "
                            f"{self._shape[0]}; all images must have the same size")
        return x

    def __getitem__(self, i: int):
        n = len(self._raw_idx)
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.name}: index {i} out of range for {len(self)} items")
        i %= len(self)
        if self._tensors is not None:
            data, labels = self._tensors
            return data[i], labels[i]
        x = self._decode(int(self._raw_idx[i % n]))
        return (x.flip(-1) if i >= n else x), self._labels[i % n]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every item as one uint8 ``(N, C, H, W)`` tensor and int64 ``(N,)`` labels, decoded on the first
        call and cached (for small sets and the in-memory trainer; iterate large sets instead)."""
        if self._tensors is None:
            data = torch.stack([self._decode(int(raw)) for raw in self._raw_idx])
            labels = self._labels
            if self._flip:
                data, labels = torch.cat([data, data.flip(-1)]), torch.cat([labels, labels])
            self._tensors = (data, labels)
        return self._tensors

    def check(self, progress=None) -> tuple[list[str], list[str]]:
        """``(files, unreadable)``: the image files this dataset uses, in order, and those of them that cannot be
        decoded or differ in size from the first (reading would stop at them; ``dpdm data info`` counts them apart).
        Decodes every file; ``progress``: a ``dpdm.core.progress.Progress``."""
        from dpdm.core.progress import Progress

        files, bad = [self._files[raw] for raw in self._raw_idx], []
        with (progress or Progress()).task("check", len(files)) as task:
            for raw in self._raw_idx:
                try:
                    self._decode(int(raw))
                except DpdmError:
                    bad.append(self._files[raw])
                task.advance(1)
        return files, bad

    def close(self) -> None:
        """Close the ZIP handle of this process (it is reopened on the next read)."""
        self._reader.close()


def image_zip(split: str = "train", *, path: str = "", labels: bool = True, xflip: bool = False,
              max_size: int | None = None, seed: int = 0, resolution: int | None = None) -> ImageFolderDataset:
    """An EDM dataset ZIP at the fsspec path ``path``, decoded lazily (see the module docstring)."""
    return ImageFolderDataset("image-zip", path, folder=False, split=split, labels=labels, xflip=xflip,
                              max_size=max_size, seed=seed, resolution=resolution)


def image_folder(split: str = "train", *, path: str = "", labels: bool = True, xflip: bool = False,
                 max_size: int | None = None, seed: int = 0, resolution: int | None = None) -> ImageFolderDataset:
    """An EDM dataset folder at the fsspec path ``path``, decoded lazily (see the module docstring)."""
    return ImageFolderDataset("image-folder", path, folder=True, split=split, labels=labels, xflip=xflip,
                              max_size=max_size, seed=seed, resolution=resolution)
