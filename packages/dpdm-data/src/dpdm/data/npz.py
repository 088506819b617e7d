"""Images (and optional labels) from a numpy ``.npz`` file, any fsspec path or URL.

The file holds a uint8 image array under ``images_key`` (default ``"images"``), either NHWC
``(N, H, W, C)`` or NCHW ``(N, C, H, W)`` (or ``(N, H, W)`` for one channel), and optionally
integer class indices ``(N,)`` under ``labels_key`` (default ``"labels"``; without that key the
dataset is unlabelled, ``label_dim`` 0, else ``label_dim`` is the largest label + 1).

``layout`` is ``"nhwc"``, ``"nchw"`` or ``"auto"``: channels-last when the last dimension is 1
or 3 and the second is not, channels-first otherwise. Items are uint8 ``(C, H, W)``.

Splits: when the file has ``<images_key>_train`` / ``<images_key>_test`` (e.g. ``x_train`` and
``x_test`` with ``images_key="x"``), the split reads that key, and its labels from
``<labels_key>_<split>`` (``y_train``) if present, else ``labels_key``. Otherwise ``"train"``
and ``"test"`` both return the whole ``images_key`` array.

The file is read with ``numpy.load(allow_pickle=False)``, so it cannot run code.
"""

from __future__ import annotations

import io
import zipfile

import fsspec
import numpy as np
import torch

from dpdm.core.datasets import TensorDataset, with_xflip
from dpdm.core.errors import DpdmError

SPLITS = ("train", "test")
LAYOUTS = ("auto", "nhwc", "nchw")


def _load(path: str) -> dict[str, np.ndarray]:
    if not path:
        raise DpdmError("npz: no data path given; set data.path to a .npz file with a uint8 image array, "
                        "e.g. --set data.path=images.npz")
    try:
        with fsspec.open(path, "rb") as f:
            blob = f.read()
    except FileNotFoundError:
        raise DpdmError(f"npz: {path!r} not found; set data.path to an existing .npz file") from None
    except Exception as exc:  # unknown protocol, unreachable storage, missing fsspec backend, ...
        raise DpdmError(f"npz: cannot open {path!r}: {exc}") from None
    if blob.startswith(b"\x93NUMPY"):
        raise DpdmError(f"npz: {path!r} is a single .npy array, not a .npz archive of named arrays; "
                        f"save it with numpy.savez(path, images=...)")
    if not blob.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise DpdmError(f"npz: {path!r} is not a .npz file (it does not start like a zip archive); "
                        f"write one with numpy.savez(path, images=..., labels=...)")
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except DpdmError:
        raise
    except ValueError as exc:  # object arrays need pickle
        raise DpdmError(f"npz: {path!r} holds an array that needs pickle to load ({exc}); store plain numeric "
                        f"arrays (numpy.savez with uint8 images)") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DpdmError(f"npz: {path!r} is not a readable .npz file ({exc})") from None


def _chw(images: np.ndarray, layout: str, source: str) -> np.ndarray:
    if images.dtype != np.uint8:
        raise DpdmError(f"npz: {source} must be uint8 images (0..255), got {images.dtype}; convert them with "
                        f"numpy.clip(x, 0, 255).astype(numpy.uint8) (rescaling floats in [0, 1] or [-1, 1] first)")
    if images.ndim == 3:
        return images[:, None]
    if images.ndim != 4:
        raise DpdmError(f"npz: {source} must be 4-d (N, H, W, C) or (N, C, H, W), or 3-d (N, H, W), "
                        f"got shape {images.shape}")
    if layout == "auto":
        layout = "nhwc" if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3) else "nchw"
    return images.transpose(0, 3, 1, 2) if layout == "nhwc" else images


def npz(split: str = "train", *, path: str = "", images_key: str = "images", labels_key: str = "labels",
        layout: str = "auto", xflip: bool = False) -> TensorDataset:
    """uint8 images (NHWC or NCHW, ``layout``) and optional labels from the ``.npz`` file at ``path``;
    ``xflip`` appends mirrored copies to the training split."""
    if split not in SPLITS:
        raise ValueError(f"npz: unknown split {split!r}; valid splits are {', '.join(map(repr, SPLITS))}")
    if layout not in LAYOUTS:
        raise DpdmError(f"npz: layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
    arrays = _load(path)
    present = ", ".join(map(repr, arrays)) or "none"
    ikey = f"{images_key}_{split}" if f"{images_key}_{split}" in arrays else images_key
    if ikey not in arrays:
        raise DpdmError(f"npz: {path!r} has no array {images_key!r} (nor {images_key + '_train'!r} / "
                        f"{images_key + '_test'!r}); the keys present are {present}; set data.images_key")
    images = _chw(arrays[ikey], layout, f"{path!r} (key {ikey!r})")
    lkey = next((k for k in (f"{labels_key}_{split}", labels_key) if labels_key and k in arrays), None)
    labels = None
    if lkey is not None:
        labels = arrays[lkey]
        where = f"{path!r} (key {lkey!r})"
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DpdmError(f"npz: {where} must be integer class indices of shape (N,), "
                            f"got {labels.dtype} of shape {labels.shape}")
        if len(labels) != len(images):
            raise DpdmError(f"npz: {where} has {len(labels)} labels for {len(images)} images (key {ikey!r})")
        if len(labels) and labels.min() < 0:
            raise DpdmError(f"npz: {where}: labels must be non-negative class indices, got {labels.min()}")
        labels = torch.from_numpy(labels.astype(np.int64))
    label_dim = int(labels.max()) + 1 if labels is not None and len(labels) else 0
    data = torch.from_numpy(np.ascontiguousarray(images))
    if xflip and split == "train":
        data, labels = with_xflip(data, labels)
    dataset = TensorDataset(data, labels, label_dim=label_dim, kind="image", name="npz")
    dataset.split, dataset.path = split, path
    return dataset
