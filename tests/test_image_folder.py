"""dpdm-data's ``image-zip`` and ``image-folder``: EDM's dataset format (``../shared/edm_ref/README.md`` §8).

The tests write small datasets in that layout themselves, as EDM's ``dataset_tool.py`` does: uncompressed
PNGs at ``{idx:08d}[:5]/img{idx:08d}.png`` and ``dataset.json`` at the root, in a ZIP_STORED archive or a
folder, and check every pixel, label and the order against what they wrote.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import zipfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from dpdm.core import get
from dpdm.core.config.recipe import load_recipe
from dpdm.core.errors import DpdmError
from dpdm.core.train.engine import DeviceBatches
from dpdm.core.pipeline.run import preflight
from dpdm.data.image_folder import image_folder, image_zip
from dpdm.data.loader import Loader

torch.set_num_threads(1)


def _name(idx: int) -> str:
    return f"{idx:08d}"[:5] + f"/img{idx:08d}.png"


def _png(array: np.ndarray) -> bytes:
    """``array`` (H, W) or (H, W, 3) uint8 as an uncompressed PNG."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="png", compress_level=0)
    return buf.getvalue()


def _images(n: int, size: int = 8, channels: int = 3, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (size, size, channels) if channels == 3 else (size, size)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


def _members(images, labels="default", extra=()) -> dict[str, bytes]:
    """Members of an EDM dataset: PNGs (in shuffled write order) and ``dataset.json``."""
    files = {_name(i): _png(a) for i, a in reversed(list(enumerate(images)))}
    if labels == "default":
        labels = [(i * 7) % 3 for i in range(len(images))]
    if labels is not False:
        table = None if labels is None else [[_name(i), lab] for i, lab in enumerate(labels)]
        files["dataset.json"] = json.dumps({"labels": table}).encode()
    files.update(dict(extra))
    return files


def _zip(path, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return str(path)


def _folder(path, members: dict[str, bytes]) -> str:
    for name, data in members.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return str(path)


def _chw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.reshape(*a.shape[:2], -1).transpose(2, 0, 1).copy())


@pytest.fixture(params=["zip", "folder"])
def make(request, tmp_path):
    """``make(members) -> (factory, path)`` for the zip and the folder variant."""
    def build(members):
        if request.param == "zip":
            return image_zip, _zip(tmp_path / "data.zip", members)
        return image_folder, _folder(tmp_path / "data", members)
    return build


def test_pixels_labels_and_order(make):
    images = _images(12)  # 12 > 10 so that name order differs from write order
    labels = [(i * 7) % 3 for i in range(12)]
    factory, path = make(_members(images, extra={"README.txt": b"not an image"}))
    for split in ("train", "test"):
        ds = factory(split, path=path)
        assert (len(ds), ds.shape, ds.label_dim, ds.kind) == (12, (3, 8, 8), 3, "image")
        for i, a in enumerate(images):
            x, y = ds[i]
            assert x.dtype == torch.uint8 and torch.equal(x, _chw(a))
            assert y.dtype == torch.int64 and int(y) == labels[i]


def test_grayscale_unlabelled_and_labels_false(make):
    images = _images(3, channels=1)
    factory, path = make(_members(images, labels=None))
    ds = factory(path=path)
    assert (ds.shape, ds.label_dim) == ((1, 8, 8), 0)
    assert torch.equal(ds[2][0], torch.from_numpy(images[2])[None]) and int(ds[2][1]) == 0
    factory, path = make(_members(_images(3), labels=False))  # no dataset.json at all
    assert factory(path=path).label_dim == 0


def test_labels_false_ignores_even_a_broken_label_file(tmp_path):
    path = _zip(tmp_path / "d.zip", _members(_images(2), labels=False, extra={"dataset.json": b"{nope"}))
    assert image_zip(path=path, labels=False).label_dim == 0


def test_xflip_train_only(make):
    images = _images(3)
    factory, path = make(_members(images))
    ds = factory(path=path, xflip=True)
    assert len(ds) == 6
    for i, a in enumerate(images):
        assert torch.equal(ds[i + 3][0], _chw(a).flip(-1)) and torch.equal(ds[i + 3][1], ds[i][1])
    assert len(factory("test", path=path, xflip=True)) == 3
    data, labels = ds.tensors()
    assert torch.equal(data, torch.stack([ds[i][0] for i in range(6)])) and labels.tolist() == [0, 1, 2] * 2


def test_max_size_is_edms_seeded_subset(tmp_path):
    images = _images(10)
    path = _zip(tmp_path / "d.zip", _members(images))
    for seed in (0, 1, 2**31 + 5):
        idx = np.arange(10)
        np.random.RandomState(seed % (1 << 31)).shuffle(idx)
        want = np.sort(idx[:4])
        ds = image_zip(path=path, max_size=4, seed=seed)
        again = image_zip(path=path, max_size=4, seed=seed)
        assert len(ds) == 4
        for j, raw in enumerate(want):
            assert torch.equal(ds[j][0], _chw(images[raw])) and torch.equal(again[j][0], ds[j][0])
    assert len(image_zip(path=path, max_size=50)) == 10


def test_memory_url_zip_and_folder():
    images = _images(3)
    members = _members(images)
    with fsspec.open("memory://dpdm-test/data.zip", "wb") as f:
        buf = io.BytesIO()
        _zip(buf, members)
        f.write(buf.getvalue())
    for name, data in members.items():
        with fsspec.open(f"memory://dpdm-test/folder/{name}", "wb") as f:
            f.write(data)
    try:
        for ds in (image_zip(path="memory://dpdm-test/data.zip"), image_folder(path="memory://dpdm-test/folder")):
            assert torch.equal(ds[1][0], _chw(images[1])) and ds.label_dim == 3
    finally:
        fsspec.filesystem("memory").rm("/dpdm-test", recursive=True)


def test_tensors_cached_and_batches(tmp_path):
    images = _images(5)
    ds = get("dataset", "image-zip")(path=_zip(tmp_path / "d.zip", _members(images)))
    data, labels = ds.tensors()
    assert data.shape == (5, 3, 8, 8) and data.dtype == torch.uint8 and ds.tensors()[0] is data
    assert torch.equal(data, torch.stack([_chw(a) for a in images])) and labels.tolist() == [0, 1, 2, 0, 1]
    x, y = next(DeviceBatches(Loader(ds, 4, seed=0), "cpu"))
    assert x.shape == (4, 3, 8, 8) and x.min() >= -1 and x.max() <= 1 and y.shape == (4,)


def test_zip_handle_is_per_process_and_dropped_when_pickled(tmp_path):
    images = _images(2)
    ds = image_zip(path=_zip(tmp_path / "d.zip", _members(images)))
    ds[0]
    pid, _, handle = ds._reader._handle
    ds._reader._handle = (pid + 1, *ds._reader._handle[1:])  # as a forked worker sees it
    assert torch.equal(ds[1][0], _chw(images[1])) and ds._reader._handle[2] is not handle
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._reader._handle is None and torch.equal(clone[0][0], _chw(images[0]))
    ds.close()


def test_resolution_and_splits(tmp_path):
    path = _zip(tmp_path / "d.zip", _members(_images(2)))
    assert image_zip(path=path, resolution=8).shape == (3, 8, 8)
    with pytest.raises(DpdmError, match=r"is 8x8, not the requested resolution 32x32"):
        image_zip(path=path, resolution=32)
    with pytest.raises(ValueError, match=r"unknown split 'val'.*training set's statistics"):
        image_zip("val", path=path)


def test_path_errors(tmp_path):
    prepare = re.escape("`dpdm data prepare SRC DST.zip --resolution R [--transform center-crop]`")
    with pytest.raises(DpdmError, match=rf"image-zip: no data path given; set data.path to the dataset zip archive "
                                        rf"\(make it with {prepare}\)"):
        image_zip()
    with pytest.raises(DpdmError, match=rf"image-folder: '.*nowhere' not found; set data.path to the dataset folder "
                                        rf"\(or make a ZIP with {prepare} and use image-zip\)"):
        image_folder(path=str(tmp_path / "nowhere"))
    (tmp_path / "d").mkdir()
    with pytest.raises(DpdmError, match=r"is a folder, not a zip archive; use the dataset image-folder"):
        image_zip(path=str(tmp_path / "d"))
    with pytest.raises(DpdmError, match=r"image-folder: no images in '.*d'"):
        image_folder(path=str(tmp_path / "d"))
    (tmp_path / "x.zip").write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(DpdmError, match=r"'.*x.zip' is not a readable zip archive \(File is not a zip file\)"):
        image_zip(path=str(tmp_path / "x.zip"))
    with pytest.raises(DpdmError, match=r"is a file, not a folder; use the dataset image-zip"):
        image_folder(path=str(tmp_path / "x.zip"))


def test_truncated_member(make):
    images = _images(3)
    members = _members(images)
    members[_name(1)] = members[_name(1)][:120]
    factory, path = make(members)
    ds = factory(path=path)  # only the first image is decoded at construction
    assert torch.equal(ds[0][0], _chw(images[0]))
    with pytest.raises(DpdmError, match=re.escape(f"cannot decode '{_name(1)}'") + r".*truncated or not an image"):
        ds[1]
    with pytest.raises(DpdmError, match=re.escape(f"cannot decode '{_name(1)}'")):
        ds.tensors()


def test_corrupt_zip_member(tmp_path):
    path = tmp_path / "d.zip"
    _zip(path, _members(_images(2)))
    blob = bytearray(path.read_bytes())
    at = blob.index(b"IDAT") + 20  # inside the second-written member: flip a byte so its CRC fails
    blob[at] ^= 0xFF
    path.write_bytes(bytes(blob))
    ds = image_zip(path=str(path), labels=False)  # _name(1) was written first, _name(0) is fine
    with pytest.raises(DpdmError, match=re.escape(f"cannot read member '{_name(1)}'") + r".*Bad CRC-32"):
        ds[1]


@pytest.mark.parametrize("label_file, message", [
    (b"{not json", r"dataset.json in '.*' is not valid JSON"),
    (b"[1, 2]", r"must be an object with a 'labels' entry"),
    (b'{"labels": {"a": 1}}', r"'labels' must be a list of \[file name, class index\] pairs or null"),
    (json.dumps({"labels": [[_name(0), 1]]}).encode(),
     re.escape(f"has no label for '{_name(1)}' (1 of 2 images unlabelled), so it does not match the images")),
    (json.dumps({"labels": [[_name(0), 1], [_name(1), [0.5, 0.5]]]}).encode(),
     r"labels must be class indices \(integers >= 0\), got \[0.5, 0.5\]"),
    (json.dumps({"labels": [[_name(0), 1], [_name(1), -1]]}).encode(), r"got -1"),
])
def test_label_file_errors(make, label_file, message):
    factory, path = make(_members(_images(2), labels=False, extra={"dataset.json": label_file}))
    with pytest.raises(DpdmError, match=message):
        factory(path=path)


def test_mixed_sizes_and_channels(make):
    members = _members(_images(2) + _images(1, size=16) + _images(1, channels=1))
    factory, path = make(members)
    ds = factory(path=path)
    ds[1]
    with pytest.raises(DpdmError, match=re.escape(f"'{_name(2)}'") + r" in '.*' is 16x16 with 3 channel\(s\), but "
                       + re.escape(f"the dataset's images ('{_name(0)}') are 8x8 with 3")):
        ds[2]
    with pytest.raises(DpdmError, match=re.escape(f"'{_name(3)}'") + r" .* is 8x8 with 1 channel\(s\)"):
        ds[3]


@pytest.mark.parametrize("array, message", [
    (np.zeros((6, 6, 3), np.uint8), r"is 6x6; images must be square and a power of two wide"),
    (np.zeros((8, 4, 3), np.uint8), r"is 4x8; images must be square"),
    (np.zeros((8, 8, 4), np.uint8), r"has mode RGBA; images must be 8-bit grayscale \(L\) or RGB"),
])
def test_shape_rules(make, array, message):
    factory, path = make(_members([array], labels=None))
    with pytest.raises(DpdmError, match=re.escape(f"'{_name(0)}'") + " .*" + message):
        factory(path=path)


def test_cifar10_recipe_preflights_on_an_edm_zip(tmp_path):
    recipe = str(Path(__file__).resolve().parent.parent / "recipes" / "cifar10-cond.yaml")
    path = _zip(tmp_path / "cifar10-32x32.zip", _members(_images(4, size=32), labels=[0, 9, 3, 9]))
    overrides = ["data.name=image-zip", f"data.path={path}", "data.xflip=true", "data.max_size=3"]
    plan = preflight(load_recipe(recipe, overrides), recipe)
    train_set, test_set, spec = plan.train_set, plan.test_set, plan.spec
    assert (len(train_set), len(test_set), train_set.label_dim) == (6, 3, 10)
    assert spec["shape"] == [3, 32, 32] and spec["label_dim"] == 10
