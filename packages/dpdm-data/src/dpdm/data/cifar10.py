"""CIFAR-10 (Krizhevsky 2009) read from the official ``cifar-10-python.tar.gz``.

The official archive (``URL``, md5 ``MD5``) holds ``cifar-10-batches-py/`` with five training
batches ``data_batch_1`` … ``data_batch_5`` and ``test_batch``, each a pickled dict (written by
Python 2, so read with ``encoding="bytes"``) with ``b"data"``, a ``(N, 3072)`` uint8 array whose
rows are the red, green and blue 32 × 32 planes in row-major order (that is, CHW), and
``b"labels"``, N class indices 0..9. As EDM's ``dataset_tool.py`` does (``../shared/edm_ref/README.md``
§8), ``"train"`` is data_batch_1..5 in that order (50,000 images) and ``"test"`` is test_batch
(10,000 images). Items are uint8 ``(3, 32, 32)`` images with their class (``label_dim`` 10), or
unlabelled (``label_dim`` 0) with ``labels=False``.

``path`` is any fsspec path or URL of the archive (gzip-compressed or a plain tar; it is read
once, as a stream, and only the batches of the split are kept) or of the extracted
``cifar-10-batches-py/`` folder (or of a folder that contains it). Nothing is cached or written.

The batches are pickles, so a file from elsewhere could run code when unpickled. They are read
with a restricted unpickler that resolves only the globals a batch needs (numpy's
``_reconstruct``, ``ndarray``, ``dtype`` and ``scalar``, and ``_codecs.encode`` for latin-1 text,
which Python 3's protocol 2 uses for bytes) and refuses every other one with a ``DpdmError``.

``xflip=True`` doubles the training split with mirrored copies (item ``i + N`` is item ``i``
flipped left-right), as EDM's dataset option does; the test split is never flipped, so that it
stays the 10,000 held-out images that evaluation compares against.
"""

from __future__ import annotations

import io
import pickle
import posixpath
import tarfile
import zlib

import numpy as np
import torch

from dpdm.core.datasets import TensorDataset, with_xflip
from dpdm.core.errors import DpdmError
from dpdm.core.io.storage import first_line

from .storage import locate

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
SPLITS = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
NUM_CLASSES = 10
SHAPE = (3, 32, 32)
GET_IT = (f"download it with `dpdm data download cifar10 DEST` (the official {URL}, md5 {MD5}) and set data.path "
          f"to DEST/cifar-10-python.tar.gz (or to its extracted {FOLDER}/ folder)")


def _numpy_attr(name: str):
    """``numpy._core.multiarray.<name>`` (numpy >= 2), else ``numpy.core.multiarray.<name>``."""
    try:
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    return getattr(multiarray, name)


def _latin1_bytes(text, encoding):
    """``_codecs.encode`` as Python 3's protocol 2 uses it for bytes: latin-1 text to bytes, nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"an _codecs.encode call with {type(text).__name__} and {encoding!r}")
    return text.encode("latin-1")


ALLOWED = {
    **{(module, name): _numpy_attr(name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
       for name in ("_reconstruct", "scalar")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_bytes,
}


class BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch; any global outside ``ALLOWED`` raises a ``DpdmError``."""

    def __init__(self, file, source: str):
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise DpdmError(f"cifar10: refusing to unpickle {self.source}: it references the global "
                            f"'{module}.{name}', which a CIFAR-10 batch never needs; the file is not the official "
                            f"CIFAR-10 python archive or has been tampered with ({GET_IT})") from None


def _where(path: str, name: str) -> str:
    """How messages name batch ``name`` of the archive or folder ``path``."""
    return f"{path!r} (member {FOLDER}/{name})"


def _unpickle(blob: bytes, source: str) -> dict:
    try:
        batch = BatchUnpickler(io.BytesIO(blob), source).load()
    except DpdmError:
        raise
    except Exception as exc:  # truncated or not a pickle at all
        raise DpdmError(f"cifar10: cannot unpickle {source}: {first_line(exc)}; "
                        f"it is not a CIFAR-10 batch ({GET_IT})") from None
    if not isinstance(batch, dict):
        raise DpdmError(f"cifar10: {source} holds a {type(batch).__name__}, not a CIFAR-10 batch dict")
    return batch


def _field(batch: dict, key: str, source: str):
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise DpdmError(f"cifar10: {source} has no {key!r} entry; it is not a CIFAR-10 batch ({GET_IT})")


def _arrays(batch: dict, source: str) -> tuple[np.ndarray, np.ndarray]:
    """The batch's images, uint8 ``(N, 3, 32, 32)``, and labels, int64 ``(N,)``, checked."""
    data = _field(batch, "data", source)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DpdmError(f"cifar10: {source}: 'data' must be a uint8 array of shape (N, 3072), got a {got}")
    try:
        labels = np.asarray(_field(batch, "labels", source))
    except ValueError as exc:
        raise DpdmError(f"cifar10: {source}: 'labels' is not a list of class indices ({exc})") from None
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DpdmError(f"cifar10: {source}: 'labels' must be a list of class indices, got {labels.dtype} "
                        f"values of shape {labels.shape}")
    if len(labels) != len(data):
        raise DpdmError(f"cifar10: {source} has {len(labels)} labels for {len(data)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DpdmError(f"cifar10: {source}: labels must be 0..{NUM_CLASSES - 1}, got values from "
                        f"{labels.min()} to {labels.max()}")
    return data.reshape(-1, *SHAPE), labels.astype(np.int64)


def _from_tar(fs, local: str, path: str, names: tuple[str, ...]) -> dict[str, bytes]:
    """The bytes of the wanted batches, read from the archive in one streaming pass."""
    wanted = {f"{FOLDER}/{name}": name for name in names}
    found: dict[str, bytes] = {}
    try:
        with fs.open(local, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                name = wanted.get(posixpath.normpath(member.name))
                if name is not None and member.isfile():
                    found[name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DpdmError(f"cifar10: {path!r} is not a readable tar or tar.gz archive ({first_line(exc)}); "
                        f"{GET_IT}") from None
    missing = [name for name in names if name not in found]
    if missing:
        raise DpdmError(f"cifar10: {path!r} has no member {FOLDER}/{missing[0]}, so it is not the official CIFAR-10 "
                        f"python archive; {GET_IT}")
    return found


def _from_folder(fs, local: str, path: str, names: tuple[str, ...]) -> dict[str, bytes]:
    """The bytes of the wanted batches, from the extracted folder (or a folder containing it)."""
    folder = local.rstrip("/")
    if not fs.exists(f"{folder}/{names[0]}") and fs.isdir(f"{folder}/{FOLDER}"):
        folder, path = f"{folder}/{FOLDER}", f"{path.rstrip('/')}/{FOLDER}"
    found = {}
    for name in names:
        try:
            with fs.open(f"{folder}/{name}", "rb") as f:
                found[name] = f.read()
        except FileNotFoundError:
            raise DpdmError(f"cifar10: the folder {path!r} has no file {name!r}, so it is not the extracted "
                            f"{FOLDER}/ folder of the official archive; {GET_IT}") from None
        except OSError as exc:
            raise DpdmError(f"cifar10: cannot read {name!r} in {path!r}: {exc}") from None
    return found


def read_batches(path: str, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 ``(N, 3, 32, 32)`` and labels int64 ``(N,)`` of the batches ``names``, in that order."""
    if not path:
        raise DpdmError(f"cifar10: no data path given; {GET_IT}, e.g. --set data.path=cifar-10-python.tar.gz")
    fs, local, is_dir, exists = locate("cifar10", path)
    if not exists:
        shown = f"{path!r} (that is, {local})" if local != path and "://" not in path else repr(path)
        raise DpdmError(f"cifar10: {shown} not found; {GET_IT}")
    blobs = (_from_folder if is_dir else _from_tar)(fs, local, path, names)
    # pop each batch's bytes once it is unpickled, so that the split is held about twice, not three times
    images, labels = zip(*(_arrays(_unpickle(blobs.pop(n), _where(path, n)), _where(path, n)) for n in names))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def cifar10(split: str = "train", *, path: str = "", labels: bool = True, xflip: bool = False) -> TensorDataset:
    """CIFAR-10 from the official archive at ``path`` (``kind="image"``, uint8 ``(3, 32, 32)``, ``label_dim`` 10,
    or 0 with ``labels=False``); ``xflip`` appends mirrored copies to the training split."""
    if split not in SPLITS:
        raise ValueError(f"cifar10: unknown split {split!r}; valid splits are {', '.join(map(repr, SPLITS))}")
    images, targets = read_batches(path, SPLITS[split])
    if xflip and split == "train":
        images, targets = with_xflip(images, targets)
    dataset = TensorDataset(images, targets if labels else None, label_dim=NUM_CLASSES, kind="image", name="cifar10")
    dataset.split, dataset.path = split, path
    return dataset
