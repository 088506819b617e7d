"""MNIST (LeCun & Cortes) and Fashion-MNIST (Xiao, Rasul & Vollgraf 2017) read from the official IDX files.

Both datasets ship as four IDX files: ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``
(60,000 items), ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz`` (10,000 items).
``path`` is any fsspec path or URL of the folder holding them, gzip-compressed (``.gz``) or
already decompressed (the same names without ``.gz``); compression is recognised from the
file's first bytes, not its name. Nothing is cached or written.

An IDX file is a big-endian header, the magic number (``0x00000803`` for the uint8 images,
``0x00000801`` for the uint8 labels) followed by one uint32 per dimension (N, 28, 28 for images;
N for labels), then the data in row-major order; it is parsed with numpy and checked (magic,
sizes, label count, labels 0..9).

Items are uint8 ``(1, 28, 28)`` images with their class (``label_dim`` 10), or unlabelled
(``label_dim`` 0) with ``labels=False``. ``pad_to_32=True`` zero-pads 2 pixels on each side to
``(1, 32, 32)``: EDM-style UNets downsample by 2 several times and need power-of-two sizes
(as in the usual 32 × 32 MNIST setups for diffusion models).
"""

from __future__ import annotations

import gzip
import zlib

import numpy as np
import torch

from dpdm.core.datasets import TensorDataset, with_xflip
from dpdm.core.errors import DpdmError

from .storage import locate

FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
NUM_CLASSES = 10
SIZE = 28

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"  # mirror of http://yann.lecun.com/exdb/mnist/
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# md5 sums of the official gz files (the ones common loaders such as torchvision check)
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
URLS = {"mnist": MNIST_URL, "fashion-mnist": FASHION_MNIST_URL}


def _get_it(name: str) -> str:
    files = ", ".join(f"{f}.gz" for pair in FILES.values() for f in pair)
    return (f"download them with `dpdm data download {name} DEST` and set data.path to DEST (the official {files} "
            f"from {URLS[name]})")


def _read(fs, folder: str, path: str, base: str, name: str) -> tuple[bytes, str]:
    """The (decompressed) bytes of ``base`` (``.gz`` or plain) in the folder, and how messages name it."""
    for candidate in (f"{base}.gz", base):
        shown = f"{path.rstrip('/')}/{candidate}"
        try:
            with fs.open(f"{folder}/{candidate}", "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise DpdmError(f"{name}: cannot read {shown!r}: {exc}") from None
        if blob[:2] == b"\x1f\x8b":
            try:
                blob = gzip.decompress(blob)
            except (OSError, EOFError, zlib.error) as exc:
                raise DpdmError(f"{name}: {shown!r} is a damaged gzip file ({exc}); {_get_it(name)}") from None
        return blob, shown
    raise DpdmError(f"{name}: the folder {path!r} has no file {base}.gz (nor {base}); {_get_it(name)}")


def parse_idx(blob: bytes, magic: int, ndim: int, source: str, name: str = "mnist") -> np.ndarray:
    """The uint8 array of an IDX file's bytes, checking its magic number and size against its header."""
    if len(blob) < 4 + 4 * ndim:
        raise DpdmError(f"{name}: {source!r} is truncated: {len(blob)} bytes, too short for an IDX header")
    got = int(np.frombuffer(blob, ">u4", 1)[0])
    if got != magic:
        raise DpdmError(f"{name}: {source!r} has magic number 0x{got:08x}, expected 0x{magic:08x} "
                        f"(uint8, {ndim}-d IDX); it is not the right IDX file ({_get_it(name)})")
    dims = tuple(int(d) for d in np.frombuffer(blob, ">u4", ndim, 4))
    header = 4 + 4 * ndim
    expected = int(np.prod(dims, dtype=np.int64))
    if len(blob) - header != expected:
        raise DpdmError(f"{name}: {source!r} is truncated or corrupt: its header says {dims} "
                        f"({expected} bytes of data) but it has {len(blob) - header}; {_get_it(name)}")
    return np.frombuffer(blob, np.uint8, expected, header).reshape(dims)


def read_idx(path: str, split: str, name: str = "mnist") -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 ``(N, 1, 28, 28)`` and labels int64 ``(N,)`` of ``split`` from the IDX files in ``path``."""
    if not path:
        raise DpdmError(f"{name}: no data path given; {_get_it(name)}, e.g. --set data.path=data/{name}")
    fs, local, is_dir, _ = locate(name, path)
    if not is_dir:
        raise DpdmError(f"{name}: {path!r} is not a folder (data.path must be the folder holding the IDX files); "
                        f"{_get_it(name)}")
    folder = local.rstrip("/")
    images_file, labels_file = FILES[split]
    blob, shown = _read(fs, folder, path, images_file, name)
    images = parse_idx(blob, IMAGES_MAGIC, 3, shown, name)
    if images.shape[1:] != (SIZE, SIZE):
        raise DpdmError(f"{name}: {shown!r} holds {images.shape[1]}x{images.shape[2]} images, expected {SIZE}x{SIZE}")
    blob, lshown = _read(fs, folder, path, labels_file, name)
    labels = parse_idx(blob, LABELS_MAGIC, 1, lshown, name)
    if len(labels) != len(images):
        raise DpdmError(f"{name}: {lshown!r} has {len(labels)} labels but {shown!r} has {len(images)} images; "
                        f"the two files are not from the same split ({_get_it(name)})")
    if len(labels) and labels.max() >= NUM_CLASSES:
        raise DpdmError(f"{name}: {lshown!r}: labels must be 0..{NUM_CLASSES - 1}, got up to {labels.max()}")
    return (torch.from_numpy(images.copy()).unsqueeze(1),
            torch.from_numpy(labels.astype(np.int64)))


def resize(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 ``(N, 1, 28, 28)`` images LANCZOS-resized to ``resolution`` (PIL, the resize of ``dpdm data prepare
    --resolution``: ``transforms.transform_none``)."""
    from PIL import Image

    from .transforms import transform_none

    out = np.empty((len(images), 1, resolution, resolution), dtype=np.uint8)
    for i, image in enumerate(images[:, 0].numpy()):
        out[i, 0] = np.asarray(transform_none(Image.fromarray(image, "L"), resolution, resolution))
    return torch.from_numpy(out)


def _factory(name: str):
    def factory(split: str = "train", *, path: str = "", labels: bool = True, pad_to_32: bool = False,
                resolution: int | None = None, xflip: bool = False) -> TensorDataset:
        if split not in FILES:
            raise ValueError(f"{name}: unknown split {split!r}; valid splits are {', '.join(map(repr, FILES))}")
        if resolution is not None and pad_to_32:
            raise ValueError(f"{name}: give resolution or pad_to_32, not both (resolution resizes the 28x28 images, "
                             f"pad_to_32 pads them)")
        if resolution is not None and resolution != SIZE and (
                isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8
                or resolution & (resolution - 1)):
            raise ValueError(f"{name}: resolution must be a power of two of at least 8 (EDM-style UNets halve it "
                             f"per level) or {SIZE} (as stored), got {resolution!r}")
        images, targets = read_idx(path, split, name)
        if pad_to_32:
            images = torch.nn.functional.pad(images, (2, 2, 2, 2))
        if resolution is not None and resolution != SIZE:
            images = resize(images, resolution)
        if xflip and split == "train":
            images, targets = with_xflip(images, targets)
        dataset = TensorDataset(images, targets if labels else None, label_dim=NUM_CLASSES, kind="image", name=name)
        dataset.split, dataset.path = split, path
        return dataset

    factory.__name__ = factory.__qualname__ = name.replace("-", "_")
    factory.__doc__ = (f"{name} from the official IDX files in the folder ``path`` (``kind=\"image\"``, uint8 "
                       f"``(1, 28, 28)``, or ``(1, 32, 32)`` zero-padded with ``pad_to_32`` for EDM-style UNets, "
                       f"which need power-of-two sizes, or LANCZOS-resized to ``resolution`` × ``resolution`` exactly as "
                       f"``dpdm data prepare --resolution R`` resizes; ``label_dim`` 10, or 0 with ``labels=False``; "
                       f"``xflip`` appends mirrored copies to the training split).")
    return factory


mnist = _factory("mnist")
fashion_mnist = _factory("fashion-mnist")
