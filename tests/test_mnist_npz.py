"""dpdm-data's ``mnist`` / ``fashion-mnist`` (official IDX files) and ``npz`` datasets.

The tests write tiny IDX files (gzip-compressed and plain) and .npz files themselves; the real
MNIST copy in ``../shared/data/mnist`` is checked only when it is present.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dpdm.core import get
from dpdm.core.errors import DpdmError
from dpdm.data import mnist as mn
from dpdm.data.npz import npz

torch.set_num_threads(1)

REAL_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    magic = magic if magic is not None else (0x803 if array.ndim == 3 else 0x801)
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def write_idx(folder: Path, split: str, images: np.ndarray, labels: np.ndarray, gz: bool = True):
    folder.mkdir(parents=True, exist_ok=True)
    for base, arr in zip(mn.FILES[split], (images, labels)):
        blob = idx_bytes(arr)
        if gz:
            (folder / f"{base}.gz").write_bytes(gzip.compress(blob))
        else:
            (folder / base).write_bytes(blob)


def sample(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
@pytest.mark.parametrize("gz", [True, False])
def test_idx_exact_pixels_and_labels(tmp_path, name, gz):
    train, test = sample(5, 0), sample(3, 1)
    write_idx(tmp_path, "train", *train, gz=gz)
    write_idx(tmp_path, "test", *test, gz=gz)
    factory = get("dataset", name)
    for split, (images, labels) in (("train", train), ("test", test)):
        ds = factory(split, path=str(tmp_path))
        assert len(ds) == len(images) and ds.shape == (1, 28, 28) and ds.kind == "image" and ds.label_dim == 10
        assert ds.data.dtype == torch.uint8
        assert torch.equal(ds.data[:, 0], torch.from_numpy(images))
        assert ds.labels.tolist() == labels.tolist()
        x, y = ds[1]
        assert x.shape == (1, 28, 28) and int(y) == int(labels[1])
    unlabelled = factory("train", path=str(tmp_path), labels=False)
    assert unlabelled.label_dim == 0 and unlabelled.labels.tolist() == [0] * 5


def test_fsspec_path(tmp_path):
    write_idx(tmp_path, "test", *sample(2, 3))
    ds = mn.mnist("test", path=f"file://{tmp_path}")
    assert len(ds) == 2


def test_pad_to_32(tmp_path):
    images, labels = sample(4, 2)
    write_idx(tmp_path, "train", images, labels)
    ds = mn.mnist("train", path=str(tmp_path), pad_to_32=True)
    assert ds.shape == (1, 32, 32)
    assert torch.equal(ds.data[:, 0, 2:30, 2:30], torch.from_numpy(images))
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert int(ds.data[:, 0][:, border].max()) == 0


def test_idx_errors(tmp_path):
    with pytest.raises(DpdmError, match="no data path"):
        mn.mnist("train")
    with pytest.raises(DpdmError, match="not a folder|not found"):
        mn.mnist("train", path=str(tmp_path / "nowhere"))
    with pytest.raises(DpdmError, match=r"has no file train-images-idx3-ubyte\.gz .*; download them with `dpdm data "
                                        r"download mnist DEST` and set data\.path to DEST \(the official .*ossci"):
        mn.mnist("train", path=str(tmp_path))
    with pytest.raises(DpdmError, match=r"`dpdm data download fashion-mnist DEST` .*fashion-mnist\.s3"):
        mn.fashion_mnist("train", path=str(tmp_path))
    with pytest.raises(ValueError, match="unknown split"):
        mn.mnist("valid", path=str(tmp_path))

    images, labels = sample(3, 4)
    write_idx(tmp_path, "train", images, labels)
    # labels file missing
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DpdmError, match="train-labels-idx1-ubyte"):
        mn.mnist("train", path=str(tmp_path))
    # label count mismatch
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels[:2])))
    with pytest.raises(DpdmError, match="2 labels but .* 3 images"):
        mn.mnist("train", path=str(tmp_path))
    # bad magic (a labels file where the images belong)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images, magic=0x801)))
    with pytest.raises(DpdmError, match=r"magic number 0x00000801, expected 0x00000803"):
        mn.mnist("train", path=str(tmp_path))
    # truncated data
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)[:-10]))
    with pytest.raises(DpdmError, match=r"truncated.*train-images|train-images.*truncated"):
        mn.mnist("train", path=str(tmp_path))
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)[:6]))
    with pytest.raises(DpdmError, match="truncated"):
        mn.mnist("train", path=str(tmp_path))
    # damaged gzip
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images))[:-12])
    with pytest.raises(DpdmError, match="gzip"):
        mn.mnist("train", path=str(tmp_path))


def test_constants():
    assert mn.MNIST_MD5["train-labels-idx1-ubyte.gz"] == "d53e105ee54ea40749a09fcbcd1e9432"
    assert mn.MNIST_MD5["t10k-images-idx3-ubyte.gz"] == "9fb629c4189551a2d022fa330f9573f3"
    assert mn.MNIST_MD5["t10k-labels-idx1-ubyte.gz"] == "ec29112dd5afa0611ce80d1b7f02629c"
    assert mn.MNIST_URL.startswith("https://") and "fashion-mnist" in mn.FASHION_MNIST_URL


@pytest.mark.skipif(not REAL_MNIST.is_dir(), reason="no real MNIST copy in ../shared/data/mnist")
def test_real_mnist():
    train = get("dataset", "mnist")("train", path=str(REAL_MNIST))
    assert len(train) == 60000 and train.label_dim == 10 and train.shape == (1, 28, 28)
    test = mn.mnist("test", path=str(REAL_MNIST), pad_to_32=True)
    assert len(test) == 10000 and test.label_dim == 10 and test.shape == (1, 32, 32)
    assert sorted(set(test.labels.tolist())) == list(range(10))


# ---- npz ----

def test_npz_nhwc_nchw_auto(tmp_path):
    rng = np.random.default_rng(0)
    nchw = rng.integers(0, 256, (4, 3, 5, 6), dtype=np.uint8)
    nhwc = nchw.transpose(0, 2, 3, 1).copy()
    labels = np.array([0, 2, 1, 2])
    np.savez(tmp_path / "hwc.npz", images=nhwc, labels=labels)
    np.savez(tmp_path / "chw.npz", images=nchw)
    for layout in ("auto", "nhwc"):
        ds = get("dataset", "npz")("train", path=str(tmp_path / "hwc.npz"), layout=layout)
        assert ds.shape == (3, 5, 6) and torch.equal(ds.data, torch.from_numpy(nchw))
        assert ds.labels.tolist() == [0, 2, 1, 2] and ds.label_dim == 3 and ds.kind == "image"
    for layout in ("auto", "nchw"):
        ds = npz("test", path=f"file://{tmp_path / 'chw.npz'}", layout=layout)
        assert torch.equal(ds.data, torch.from_numpy(nchw)) and ds.label_dim == 0
    gray = rng.integers(0, 256, (2, 7, 7, 1), dtype=np.uint8)
    np.savez(tmp_path / "gray.npz", images=gray)
    assert npz(path=str(tmp_path / "gray.npz")).shape == (1, 7, 7)
    np.savez(tmp_path / "hw.npz", images=gray[..., 0])
    assert torch.equal(npz(path=str(tmp_path / "hw.npz")).data[:, 0], torch.from_numpy(gray[..., 0]))


def test_npz_split_keys(tmp_path):
    x_train = np.full((3, 4, 4, 3), 7, np.uint8)
    x_test = np.full((2, 4, 4, 3), 9, np.uint8)
    np.savez(tmp_path / "s.npz", x_train=x_train, x_test=x_test, y_train=np.array([1, 0, 1]), y_test=np.array([4, 4]))
    tr = npz("train", path=str(tmp_path / "s.npz"), images_key="x", labels_key="y")
    te = npz("test", path=str(tmp_path / "s.npz"), images_key="x", labels_key="y")
    assert len(tr) == 3 and int(tr.data.max()) == 7 and tr.labels.tolist() == [1, 0, 1]
    assert len(te) == 2 and int(te.data.min()) == 9 and te.labels.tolist() == [4, 4] and te.label_dim == 5


def test_npz_errors(tmp_path):
    with pytest.raises(DpdmError, match="no data path"):
        npz()
    with pytest.raises(DpdmError, match="not found"):
        npz(path=str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "a.npz", pixels=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(DpdmError, match="no array 'images'.*'pixels'"):
        npz(path=str(tmp_path / "a.npz"))
    np.savez(tmp_path / "f.npz", images=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(DpdmError, match="uint8.*float32"):
        npz(path=str(tmp_path / "f.npz"))
    np.savez(tmp_path / "d.npz", images=np.zeros((2, 4), np.uint8))
    with pytest.raises(DpdmError, match="shape \\(2, 4\\)"):
        npz(path=str(tmp_path / "d.npz"))
    np.savez(tmp_path / "l.npz", images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.array([0, 1, 2]))
    with pytest.raises(DpdmError, match="3 labels for 2 images"):
        npz(path=str(tmp_path / "l.npz"))
    with pytest.raises(DpdmError, match="layout"):
        npz(path=str(tmp_path / "l.npz"), layout="hwc")
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(DpdmError, match="junk.npz.*not a .npz file"):
        npz(path=str(tmp_path / "junk.npz"))
    np.save(tmp_path / "one.npy", np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(DpdmError, match="single .npy array"):
        npz(path=str(tmp_path / "one.npy"))
    np.savez(tmp_path / "obj.npz", images=np.array([None, 1], dtype=object))
    with pytest.raises(DpdmError, match="pickle"):
        npz(path=str(tmp_path / "obj.npz"))


@pytest.mark.parametrize("name", ["mnist", "npz"])
def test_xflip_appends_mirrored_copies_to_train_only(tmp_path, name):
    images, labels = sample(3, 4)
    if name == "mnist":
        write_idx(tmp_path, "train", images, labels)
        write_idx(tmp_path, "test", images, labels)
        path = str(tmp_path)
    else:
        path = str(tmp_path / "x.npz")
        np.savez(path, images=images[..., None], labels=labels)
    factory = get("dataset", name)
    ds = factory("train", path=path, xflip=True)
    assert len(ds) == 6 and ds.labels.tolist() == labels.tolist() * 2
    x, y = ds[4]  # item i + N is item i mirrored left-right
    assert torch.equal(x[0], torch.from_numpy(images[1][:, ::-1].copy())) and int(y) == int(labels[1])
    assert len(factory("test", path=path, xflip=True)) == 3
