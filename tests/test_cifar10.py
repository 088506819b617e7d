"""dpdm-data's ``cifar10``: the official ``cifar-10-python.tar.gz`` format, read safely.

The tests write small archives in that format themselves: pickled dicts of numpy arrays at
protocol 2, some batches byte-for-byte as Python 2's cPickle wrote the official ones (str as
BINSTRING, numpy under ``numpy.core``), others as Python 3 writes protocol 2 (bytes through
``_codecs.encode``, numpy under ``numpy._core``), inside ``cifar-10-batches-py/`` in a tar.gz.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import re
import struct
import tarfile
from pathlib import Path
from types import SimpleNamespace

import fsspec
import numpy as np
import pytest
import torch

from dpdm.core import get
from dpdm.core.io.checkpoint import build_denoiser
from dpdm.core.config.recipe import load_recipe
from dpdm.core.errors import ConfigError, DpdmError
from dpdm.core.pipeline.run import preflight, spec_of
from dpdm.data import cifar10 as c10

torch.set_num_threads(1)

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
JPEG_COPY = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "cifar10-jpg-q75.tar.gz"
TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
SIZES = {"data_batch_1": 3, "data_batch_2": 2, "data_batch_3": 4, "data_batch_4": 1, "data_batch_5": 2,
         "test_batch": 5}
ORDER = ["data_batch_4", "readme.html", "test_batch", "data_batch_3", "batches.meta", "data_batch_2",
         "data_batch_5", "data_batch_1"]  # the official archive's member order: not the batch order
GET_IT = re.escape(f"download it with `dpdm data download cifar10 DEST` (the official {c10.URL}, md5 {c10.MD5}) "
                   f"and set data.path to DEST/cifar-10-python.tar.gz")


def _py2_pickle(obj) -> bytes:
    """``obj`` pickled the way Python 2's cPickle (protocol 2, numpy 1) wrote the official batches."""
    out = bytearray(b"\x80\x02")

    def emit(o):
        if isinstance(o, dict):
            out.extend(b"}(")
            for k, v in o.items():
                emit(k), emit(v)
            out.extend(b"u")
        elif isinstance(o, bytes):  # a Python 2 str
            out.extend(b"T" + struct.pack("<i", len(o)) + o)
        elif o is None:
            out.extend(b"N")
        elif isinstance(o, bool):
            out.extend(b"\x88" if o else b"\x89")
        elif isinstance(o, int):
            out.extend(b"J" + struct.pack("<i", o))
        elif isinstance(o, (list, tuple)):
            out.extend(b"(")
            for item in o:
                emit(item)
            out.extend(b"l" if isinstance(o, list) else b"t")
        elif isinstance(o, np.ndarray):  # _reconstruct(ndarray, (0,), 'b') then BUILD with its state
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
            emit((0,)), emit(b"b")
            out.extend(b"\x87R(")
            emit(1), emit(o.shape)
            out.extend(b"cnumpy\ndtype\n")
            emit((o.dtype.str[1:].encode(), 0, 1))
            out.extend(b"R")
            emit((3, o.dtype.str[:1].encode(), None, None, None, -1, -1, 0))
            out.extend(b"b")
            emit(False), emit(o.tobytes())
            out.extend(b"tb")
        else:
            raise TypeError(type(o))

    emit(obj)
    return bytes(out + b".")


def _batches(seed=0):
    """``{name: (data (N, 3072) uint8, labels list)}`` with distinct, seeded pixels and labels."""
    rng = np.random.default_rng(seed)
    return {name: (rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist())
            for name, n in SIZES.items()}


def _batch_bytes(name, data, labels, py2=None):
    batch = {b"batch_label": f"{name} of 5".encode(), b"labels": labels, b"data": data,
             b"filenames": [f"img_{i}.png".encode() for i in range(len(data))]}
    py2 = name in ("data_batch_1", "data_batch_3", "test_batch") if py2 is None else py2
    return _py2_pickle(batch) if py2 else pickle.dumps(batch, protocol=2)


def _members(batches, replace=None):
    members = {"readme.html": b"<html></html>", "batches.meta": _py2_pickle({b"label_names": [b"airplane"] * 10})}
    members.update({name: _batch_bytes(name, *arrays) for name, arrays in batches.items()})
    members.update(replace or {})
    return {name: members[name] for name in ORDER if members.get(name) is not None}


def _tar_bytes(members, compress=True) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if compress else "w") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"{c10.FOLDER}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buffer.getvalue()


def _archive(tmp_path, batches=None, replace=None, name="cifar-10-python.tar.gz") -> str:
    path = tmp_path / name
    path.write_bytes(_tar_bytes(_members(batches or _batches(), replace)))
    return str(path)


def _expected(batches, names):
    data = np.concatenate([batches[n][0] for n in names]).reshape(-1, 3, 32, 32)
    return torch.from_numpy(data), torch.tensor(sum((batches[n][1] for n in names), []), dtype=torch.int64)


def _check(ds, batches, names):
    want_x, want_y = _expected(batches, names)
    assert ds.kind == "image" and ds.shape == (3, 32, 32) and ds.label_dim == 10 and len(ds) == len(want_x)
    x, y = ds.tensors()
    assert x.dtype == torch.uint8 and torch.equal(x, want_x)
    assert y.dtype == torch.int64 and torch.equal(y, want_y)
    item, label = ds[len(ds) - 1]
    assert item.shape == (3, 32, 32) and torch.equal(item, want_x[-1]) and label == want_y[-1]


def test_both_splits_in_batch_order(tmp_path):
    batches = _batches()
    path = _archive(tmp_path, batches)
    factory = get("dataset", "cifar10")
    _check(factory(path=path), batches, TRAIN)  # data_batch_1..5 in that order, whatever the tar order
    _check(factory("test", path=path), batches, ["test_batch"])
    # a row is the red, green and blue 32 x 32 planes, row-major: CHW
    x = factory("test", path=path).tensors()[0]
    row = batches["test_batch"][0][0]
    assert x[0, 1, 2, 3] == row[1024 + 2 * 32 + 3] and x[0, 2, 31, 0] == row[2048 + 31 * 32]


def test_uncompressed_tar_and_the_extracted_folder(tmp_path):
    batches = _batches(1)
    tar_path = tmp_path / "cifar-10-python.tar"
    tar_path.write_bytes(_tar_bytes(_members(batches), compress=False))
    _check(c10.cifar10(path=str(tar_path)), batches, TRAIN)
    with tarfile.open(tar_path) as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    for folder in (tmp_path / "extracted" / c10.FOLDER, tmp_path / "extracted"):  # the folder, or one holding it
        _check(c10.cifar10(path=str(folder)), batches, TRAIN)
        _check(c10.cifar10("test", path=str(folder) + "/"), batches, ["test_batch"])


def test_memory_url(tmp_path):
    batches = _batches(2)
    url = "memory://cifar-test/cifar-10-python.tar.gz"
    fs = fsspec.filesystem("memory")
    fs.pipe(url, _tar_bytes(_members(batches)))
    try:
        _check(c10.cifar10(path=url), batches, TRAIN)
        _check(c10.cifar10("test", path=url), batches, ["test_batch"])
    finally:
        fs.rm("memory://cifar-test", recursive=True)


def test_xflip_doubles_the_train_split_only(tmp_path):
    batches = _batches(3)
    path = _archive(tmp_path, batches)
    plain = c10.cifar10(path=path).tensors()
    x, y = c10.cifar10(path=path, xflip=True).tensors()
    n = len(plain[0])
    assert len(x) == 2 * n and torch.equal(x[:n], plain[0]) and torch.equal(y, torch.cat([plain[1], plain[1]]))
    assert torch.equal(x[n:], plain[0].flip(-1)) and torch.equal(x[n + 1, :, :, 0], plain[0][1, :, :, 31])
    _check(c10.cifar10("test", path=path, xflip=True), batches, ["test_batch"])


def test_labels_false(tmp_path):
    ds = c10.cifar10(path=_archive(tmp_path), labels=False)
    assert ds.label_dim == 0 and len(ds) == 12 and torch.equal(ds.tensors()[1], torch.zeros(12, dtype=torch.int64))


def test_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="valid splits are 'train', 'test'"):
        c10.cifar10("validation", path=_archive(tmp_path))


class _Payload:
    def __init__(self, call, marker):
        self.call, self.marker = call, marker

    def __reduce__(self):
        return self.call, (f"touch {self.marker}",) if self.call is os.system else (f"open({str(self.marker)!r}, 'w')",)


@pytest.mark.parametrize("call, qualified", [(os.system, f"{os.system.__module__}.system"),
                                             (exec, "__builtin__.exec")],  # protocol 2 spells builtins so
                         ids=["os.system", "exec"])
def test_restricted_unpickler_refuses_other_globals(tmp_path, call, qualified):
    marker = tmp_path / "payload-ran"
    evil = pickle.dumps({b"data": _Payload(call, marker), b"labels": [0]}, protocol=2)
    path = _archive(tmp_path, replace={"data_batch_2": evil})
    with pytest.raises(DpdmError) as info:
        c10.cifar10(path=path)
    assert str(info.value).startswith(f"cifar10: refusing to unpickle {path!r} (member {c10.FOLDER}/data_batch_2): "
                                      f"it references the global '{qualified}', which a CIFAR-10 batch never needs")
    assert not marker.exists()
    c10.cifar10("test", path=path)  # the other split never touches that member


def test_codecs_encode_only_makes_latin1_bytes():
    for args in (("x", "rot13"), (b"x", "latin1")):
        with pytest.raises(pickle.UnpicklingError):
            c10.ALLOWED[("_codecs", "encode")](*args)


def _error(tmp_path, **replace) -> str:
    path = _archive(tmp_path, replace=replace)
    with pytest.raises(DpdmError) as info:
        c10.cifar10(path=path)
    return str(info.value).replace(path, "ARCHIVE")


def test_missing_path_and_missing_file(tmp_path):
    with pytest.raises(DpdmError, match=f"^cifar10: no data path given; {GET_IT}.*set data.path="):
        c10.cifar10(path="")
    missing = str(tmp_path / "nope.tar.gz")
    with pytest.raises(DpdmError, match=f"^cifar10: {re.escape(repr(missing))} not found; {GET_IT}"):
        c10.cifar10(path=missing)
    with pytest.raises(DpdmError, match=f"^cifar10: 'memory://nowhere/c.tar.gz' not found; {GET_IT}"):
        c10.cifar10(path="memory://nowhere/c.tar.gz")


@pytest.mark.parametrize("content", [b"not an archive at all" * 100, gzip.compress(b"\x01" * 2000), b""],
                         ids=["garbage", "gzip-of-garbage", "empty"])
def test_not_a_tar(tmp_path, content):
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(content)
    with pytest.raises(DpdmError, match=f"^cifar10: {re.escape(repr(str(path)))} is not a readable tar or tar.gz "
                                        f"archive \\(.+\\); {GET_IT}"):
        c10.cifar10(path=str(path))


def test_truncated_archive(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(_tar_bytes(_members(_batches()))[:5000])
    with pytest.raises(DpdmError, match="is not a readable tar or tar.gz archive"):
        c10.cifar10(path=str(path))


def test_missing_member(tmp_path):
    assert _error(tmp_path, data_batch_3=None) == (
        f"cifar10: 'ARCHIVE' has no member {c10.FOLDER}/data_batch_3, so it is not the official CIFAR-10 python "
        f"archive; download it with `dpdm data download cifar10 DEST` (the official {c10.URL}, md5 {c10.MD5}) and "
        f"set data.path to DEST/cifar-10-python.tar.gz (or to its extracted {c10.FOLDER}/ folder)")


def test_missing_file_in_folder(tmp_path):
    folder = tmp_path / c10.FOLDER
    folder.mkdir()
    for name, blob in _members(_batches()).items():
        if name != "data_batch_5":
            (folder / name).write_bytes(blob)
    with pytest.raises(DpdmError, match=f"^cifar10: the folder {re.escape(repr(str(folder)))} has no file "
                                        f"'data_batch_5', so it is not the extracted {c10.FOLDER}/ folder"):
        c10.cifar10(path=str(folder))


def test_wrong_array_shape(tmp_path):
    data = np.zeros((2, 3000), dtype=np.uint8)
    message = _error(tmp_path, data_batch_1=_batch_bytes("data_batch_1", data, [0, 1]))
    assert message == (f"cifar10: 'ARCHIVE' (member {c10.FOLDER}/data_batch_1): 'data' must be a uint8 array of "
                       "shape (N, 3072), got a uint8 array of shape (2, 3000)")
    floats = np.zeros((2, 3072), dtype=np.float32)
    assert "got a float32 array of shape (2, 3072)" in _error(tmp_path, data_batch_1=_batch_bytes("b", floats, [0, 1]))


def test_label_count_mismatch_and_range(tmp_path):
    data = np.zeros((3, 3072), dtype=np.uint8)
    message = _error(tmp_path, data_batch_4=_batch_bytes("data_batch_4", data, [1, 2], py2=True))
    assert message == f"cifar10: 'ARCHIVE' (member {c10.FOLDER}/data_batch_4) has 2 labels for 3 images"
    message = _error(tmp_path, data_batch_4=_batch_bytes("data_batch_4", data, [1, 2, 10]))
    assert message.endswith("data_batch_4): labels must be 0..9, got values from 1 to 10")


def test_not_a_batch(tmp_path):
    assert _error(tmp_path, data_batch_2=b"\x00garbage").startswith(
        f"cifar10: cannot unpickle 'ARCHIVE' (member {c10.FOLDER}/data_batch_2): ")
    assert _error(tmp_path, data_batch_2=pickle.dumps([1, 2], protocol=2)) == (
        f"cifar10: 'ARCHIVE' (member {c10.FOLDER}/data_batch_2) holds a list, not a CIFAR-10 batch dict")
    assert _error(tmp_path, data_batch_2=pickle.dumps({b"labels": [1]}, protocol=2)).startswith(
        f"cifar10: 'ARCHIVE' (member {c10.FOLDER}/data_batch_2) has no 'data' entry; it is not a CIFAR-10 batch")


@pytest.mark.skipif(not JPEG_COPY.exists(), reason="the shared JPEG copy of CIFAR-10 is not here")
def test_the_jpeg_copy_is_not_the_official_archive():
    with pytest.raises(DpdmError, match=f"has no member {c10.FOLDER}/test_batch, so it is not the official"):
        c10.cifar10("test", path=str(JPEG_COPY))


@pytest.mark.parametrize("name, label_dim", [("cifar10", 0), ("cifar10-cond", 10)])
def test_recipes_preflight(tmp_path, monkeypatch, name, label_dim):
    recipe = str(RECIPES / f"{name}.yaml")
    monkeypatch.chdir(tmp_path)  # the recipe's relative data.path is not here: one clear problem
    with pytest.raises(ConfigError) as info:
        preflight(load_recipe(recipe), recipe)
    assert info.value.problems == [f"recipe.data: cifar10: 'cifar-10-python.tar.gz' (that is, "
                                   f"{tmp_path / 'cifar-10-python.tar.gz'}) not found; download it with `dpdm data "
                                   f"download cifar10 DEST` (the official {c10.URL}, md5 {c10.MD5}) and set "
                                   f"data.path to DEST/cifar-10-python.tar.gz (or to its extracted {c10.FOLDER}/ "
                                   f"folder)"]
    _archive(tmp_path)  # now it is
    plan = preflight(load_recipe(recipe), recipe)
    train_set, test_set, spec = plan.train_set, plan.test_set, plan.spec
    assert (len(train_set), len(test_set), train_set.label_dim) == (12, 5, label_dim)
    assert spec["shape"] == [3, 32, 32] and spec["label_dim"] == label_dim


EDM_REF = Path(__file__).resolve().parents[2] / "shared" / "edm_ref"


@pytest.mark.parametrize("name, pickle_name, backbone, shape", [
    ("cifar10", "cifar10-32x32-uncond-vp", "edm-songunet", (3, 32, 32)),
    ("cifar10-cond", "cifar10-32x32-cond-vp", "edm-songunet", (3, 32, 32)),
    ("imagenet64", "imagenet-64x64-cond-adm", "edm-dhariwal", (3, 64, 64)),
])
def test_recipe_model_section_is_the_teachers_network(name, pickle_name, backbone, shape):
    """The model section documents the teacher pickle's network: same config, same state_dict keys and shapes."""
    facts = EDM_REF / f"keys_{pickle_name}.json"
    if not facts.exists():
        pytest.skip(f"{facts} not found")
    official = json.loads(facts.read_text())
    recipe = load_recipe(str(RECIPES / f"{name}.yaml"))
    assert recipe.teacher.checkpoint == f"https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-{pickle_name}.pkl"
    options = recipe.model.backbone.options
    assert recipe.model.backbone.name == backbone and recipe.model.precond.name == "edm"
    for key, value in official["constructor_kwargs"].items():
        if key in options:
            assert options[key] == value, key
    spec = spec_of(recipe, SimpleNamespace(shape=shape, label_dim=official["constructor_kwargs"]["label_dim"]))
    model = build_denoiser(spec)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == official["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == official["param_count"]
