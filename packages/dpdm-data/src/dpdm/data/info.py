"""Describing a dataset (``dpdm data info``): its size, item shape, labels and a grid of sample images.

``open_dataset(path, name, split, options)`` builds any registered dataset through the registry
(``dpdm.core.registry.get("dataset", name)``); without ``name`` it is chosen from ``path`` with
``dpdm.data.prepare.detect_kind``: a ``.zip`` is ``image-zip`` (EDM's format), a folder ``image-folder``, and the
raw sources ``cifar10``, ``mnist`` and ``npz`` are read with their own datasets. ``describe`` returns the facts
as plain data (for ``--json``): count, shape, resolution and channels of images, ``label_dim``, the class
histogram and the class names when they are known (an EDM dataset's ``dataset.json`` ``"classes"``, as
``dpdm data prepare`` writes it, or the official names of CIFAR-10, MNIST and Fashion-MNIST).
``sample_grid`` tiles ``num`` images spread evenly over the dataset (index ``round(k·(N−1)/(num−1))``) with
``dpdm.core.figures.image_grid``, and ``save_png`` writes it to any fsspec path.
"""

from __future__ import annotations

import inspect
import io
import json
import zipfile

import fsspec
import numpy as np

from dpdm.core.errors import DpdmError

from .sources import CIFAR10_CLASSES, FASHION_MNIST_CLASSES, LABELS_FILE, MNIST_CLASSES, detect_kind

DATASET_OF_KIND = {"folder": "image-folder", "zip": "image-zip", "cifar10": "cifar10", "mnist": "mnist",
                   "fashion-mnist": "fashion-mnist", "npz": "npz"}
KNOWN_CLASSES = {"cifar10": CIFAR10_CLASSES, "mnist": MNIST_CLASSES, "fashion-mnist": FASHION_MNIST_CLASSES}


def open_dataset(path: str | None, name: str | None = None, split: str = "train", options: dict | None = None):
    """``(name, dataset)``: the registered dataset ``name`` (default: the one that reads ``path``) built with
    ``split``, ``path`` and ``options``; wrong options are a ``DpdmError`` listing the accepted ones."""
    from dpdm.core.plugins.registry import get

    if name is None:
        if not path:
            raise DpdmError("give the PATH of a dataset, or --dataset NAME (see `dpdm plugins` for the names)")
        name = DATASET_OF_KIND[detect_kind(path)]
    factory = get("dataset", name)
    opts = dict(options or {})
    if path:
        if "path" in opts and opts["path"] != path:
            raise DpdmError(f"PATH {path!r} and --set path={opts['path']} disagree; give one of them")
        opts["path"] = path
    signature = inspect.signature(factory)
    try:
        signature.bind(split, **opts)
    except TypeError as exc:
        accepted = ", ".join(p for p in signature.parameters if p != "split") or "none"
        raise DpdmError(f"dataset {name}: {exc}; its options are: {accepted}") from None
    try:
        return name, factory(split, **opts)
    except ValueError as exc:  # unknown split or option value
        raise DpdmError(str(exc)) from None


def _edm_metadata(path: str, name: str) -> dict | None:
    """The ``dataset.json`` object of an EDM dataset ZIP or folder, or None when it has none (or is unreadable)."""
    try:
        if name == "image-zip":
            with fsspec.open(path, "rb") as f, zipfile.ZipFile(f) as archive:
                blob = archive.read(LABELS_FILE) if LABELS_FILE in archive.namelist() else None
        else:
            fs, root = fsspec.core.url_to_fs(path)
            member = f"{root.rstrip('/')}/{LABELS_FILE}"
            blob = fs.cat_file(member) if fs.exists(member) else None
        table = json.loads(blob) if blob is not None else None
    except (OSError, ValueError, zipfile.BadZipFile):
        return None
    return table if isinstance(table, dict) else None


def _labels(name: str, dataset, path: str | None) -> tuple[list[int] | None, list[str] | None]:
    """The class histogram (length ``label_dim``) and the class names, each None where unknown."""
    if not dataset.label_dim:
        return None, None
    label_dim = dataset.label_dim
    classes = list(KNOWN_CLASSES[name]) if name in KNOWN_CLASSES else None
    labels = getattr(dataset, "labels", None)
    histogram = None
    if labels is not None:
        histogram = np.bincount(np.asarray(labels), minlength=label_dim).tolist()
    elif name in ("image-zip", "image-folder") and path:
        meta = _edm_metadata(path, name) or {}
        entries = meta.get("labels") or []
        values = [e[1] for e in entries if isinstance(e, list) and len(e) == 2 and isinstance(e[1], int)]
        histogram = np.bincount(values, minlength=label_dim).tolist() if values else None
        names = meta.get("classes")
        if isinstance(names, list) and all(isinstance(c, str) for c in names):
            classes = names
    return histogram, classes


def _prepare_labels(name: str, path: str, files: list[str]) -> tuple[list[int] | None, list[str] | None]:
    """The labels ``dpdm data prepare`` would write for ``files`` of the folder or ZIP ``path`` (its class folders,
    see ``sources.open_source``) and their class names, or ``(None, None)``."""
    from .sources import open_source

    try:
        source = open_source(path, "folder" if name == "image-folder" else "zip")
    except DpdmError:  # e.g. loose images beside class folders: prepare needs --no-labels, so no labels
        return None, None
    try:
        if source.labels is None:
            return None, None
        by_name = {source.name(i): int(source.labels[i]) for i in range(source.count)}
    finally:
        source.close()
    return [by_name[f] for f in files if f in by_name], source.classes


def describe(name: str, dataset, path: str | None = None, progress=None, labels: bool = True) -> dict:
    """The dataset's facts as plain data: dataset, path, kind, count, shape, resolution, channels, label_dim,
    classes and histogram (``resolution``/``channels`` None for vector data). EDM image folders and ZIPs are
    decoded whole: ``count`` leaves out the images that cannot be read, which ``unreadable`` lists; a folder (or
    ZIP) whose labels come from its class folders, as ``dpdm data prepare`` writes them, has
    ``labels_from: "class folders"`` (the dataset itself reads labels from dataset.json only); ``labels=False``: the
    dataset was opened without labels, so none are looked for."""
    shape = [int(s) for s in dataset.shape]
    image = dataset.kind == "image"
    histogram, classes = _labels(name, dataset, path)
    facts = {"dataset": name, "path": path, "kind": dataset.kind, "count": len(dataset), "shape": shape,
             "resolution": (shape[1] if shape[1] == shape[2] else f"{shape[2]}x{shape[1]}") if image else None,
             "channels": shape[0] if image else None, "label_dim": int(dataset.label_dim), "classes": classes,
             "histogram": histogram, "labels_from": None}
    if dataset.label_dim:  # where the labels come from: an EDM folder's or ZIP's dataset.json, or the dataset's files
        facts["labels_from"] = "dataset.json" if name in ("image-folder", "image-zip") else "dataset"
    if name in ("image-folder", "image-zip"):
        files, bad = dataset.check(progress)
        facts["count"] = len(dataset) * (len(files) - len(bad)) // len(files)  # xflip: two items per file
        facts["unreadable"] = bad
        if labels and not dataset.label_dim and path and _edm_metadata(path, name) is None:  # a raw tree
            bad_set = set(bad)
            values, names = _prepare_labels(name, path, [f for f in files if f not in bad_set])
            if values:
                label_dim = max(values) + 1
                facts.update(label_dim=label_dim, classes=names, labels_from="class folders",
                             histogram=np.bincount(values, minlength=label_dim).tolist())
    return facts


def sample_grid(dataset, num: int = 64) -> np.ndarray:
    """``num`` images spread evenly over the dataset, tiled into a uint8 ``(H, W)`` or ``(H, W, 3)`` array."""
    import torch

    from dpdm.core.datasets import to_model
    from dpdm.core.eval.figures import image_grid

    if dataset.kind != "image":
        raise DpdmError(f"--grid: the dataset holds {dataset.kind} data, not images; leave --grid out")
    if num < 1:
        raise DpdmError(f"--num must be at least 1, got {num}")
    n = min(num, len(dataset))
    index = np.unique(np.linspace(0, len(dataset) - 1, n).round().astype(np.int64))
    x = torch.stack([dataset[int(i)][0] for i in index])  # (n, C, H, W) uint8
    return image_grid(to_model(x))


def save_png(array: np.ndarray, dst: str) -> None:
    """Write a uint8 ``(H, W)`` or ``(H, W, 3)`` array as a PNG to the local path or fsspec URL ``dst``."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="png")
    try:
        with fsspec.open(dst, "wb") as f:
            f.write(buffer.getvalue())
    except Exception as exc:  # missing folder, permissions, unknown protocol
        raise DpdmError(f"cannot write the grid to {dst!r}: {exc}") from None
