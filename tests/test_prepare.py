"""``dpdm data prepare`` / ``dpdm data info`` and ``dpdm.data.prepare``: EDM dataset ZIPs from image folders, zips,
CIFAR-10, MNIST and npz sources.

Every ZIP written here is read back with ``image_zip`` and compared pixel for pixel with the transform computed
directly from EDM's (and ADM's) arithmetic; failures must leave neither DST nor a temporary file behind.
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
import zipfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dpdm.cli.main import app
from dpdm.data import transforms
from dpdm.data.image_folder import image_zip
from dpdm.data.sources import CIFAR10_CLASSES

torch.set_num_threads(1)

REAL_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
WIDE = {"COLUMNS": "1000"}  # rich wraps at the terminal width; keep report lines whole
LANCZOS = Image.Resampling.LANCZOS


def invoke(*args):
    return CliRunner().invoke(app, ["data", *[str(a) for a in args]], env=WIDE)


def ok(result):
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result


def user_error(result) -> str:
    """The error line of a command that failed cleanly: exit 1, no traceback, nothing on stdout."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def rgb(w: int, h: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def pixels(ds) -> list[np.ndarray]:
    """Every image of an ``image_zip`` dataset as an ``(H, W, C)`` array."""
    return [ds[i][0].permute(1, 2, 0).numpy() for i in range(len(ds))]


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- references: EDM's dataset_tool.py and ADM's center_crop_arr, written as they compute ----------------------------


def edm_center_crop(img: np.ndarray, width: int, height: int) -> np.ndarray:
    crop = np.min(img.shape[:2])
    img = img[(img.shape[0] - crop) // 2:(img.shape[0] + crop) // 2,
              (img.shape[1] - crop) // 2:(img.shape[1] + crop) // 2]
    return np.array(Image.fromarray(img, "RGB").resize((width, height), LANCZOS))


def edm_center_crop_wide(img: np.ndarray, width: int, height: int):
    ch = int(np.round(width * img.shape[0] / img.shape[1]))
    if img.shape[1] < width or ch < height:
        return None
    img = img[(img.shape[0] - ch) // 2:(img.shape[0] + ch) // 2]
    img = np.array(Image.fromarray(img, "RGB").resize((width, height), LANCZOS))
    canvas = np.zeros([width, width, 3], dtype=np.uint8)
    canvas[(width - height) // 2:(width + height) // 2, :] = img
    return canvas


def adm_center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


# --- fixtures -------------------------------------------------------------------------------------------------------

SIZES = [(40, 30), (30, 41), (33, 33), (64, 48), (17, 23)]


@pytest.fixture
def flat(tmp_path) -> Path:
    """A flat folder: PNGs of various sizes, a JPEG, a corrupt PNG, a truncated PNG and a text file."""
    src = tmp_path / "flat"
    src.mkdir()
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray(rgb(w, h, i)).save(src / f"img{i}.png")
    Image.fromarray(rgb(50, 40, 9)).save(src / "photo.jpg", quality=90)
    (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    blob = io.BytesIO()
    Image.fromarray(rgb(32, 32, 7)).save(blob, format="png")
    (src / "truncated.png").write_bytes(blob.getvalue()[:200])
    (src / "readme.txt").write_text("not an image")
    return src


@pytest.fixture
def classes(tmp_path) -> Path:
    """ImageNet-style class subfolders (PNG and grayscale JPEG), with a corrupt JPEG and a text file."""
    src = tmp_path / "classes"
    for c, name in enumerate(["n02", "n01", "n03"]):  # sorted: n01 -> 0, n02 -> 1, n03 -> 2
        (src / name).mkdir(parents=True)
        for i in range(c + 1):
            Image.fromarray(rgb(24 + 4 * i, 20, 10 * c + i)).save(src / name / f"a{i}.png")
        Image.fromarray(rgb(20, 30, 99 + c)[..., 0]).save(src / name / "gray.jpg", quality=95)
    (src / "n01" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    (src / "n03" / "labels.txt").write_text("x")
    return src


def expected_folder(src: Path, transform, names) -> list[np.ndarray]:
    return [transform(np.array(Image.open(src / n).convert("RGB"))) for n in names]


# --- image folders ----------------------------------------------------------------------------------------------------


def test_flat_folder_center_crop(flat, tmp_path):
    dst = tmp_path / "flat16.zip"
    r = ok(invoke("prepare", flat, dst, "--resolution", "16", "--transform", "center-crop", "--workers", "1"))
    good = ["img0.png", "img1.png", "img2.png", "img3.png", "img4.png", "photo.jpg"]  # sorted, readable images
    ds = image_zip(path=str(dst))
    assert len(ds) == 6 and ds.shape == (3, 16, 16) and ds.label_dim == 0
    want = expected_folder(flat, lambda a: edm_center_crop(a, 16, 16), good)
    for got, exp in zip(pixels(ds), want):
        np.testing.assert_array_equal(got, exp)
    with zipfile.ZipFile(dst) as z:
        infos = z.infolist()
        assert [i.filename for i in infos] == [f"00000/img{k:08d}.png" for k in range(6)] + ["dataset.json"]
        assert all(i.compress_type == zipfile.ZIP_STORED and i.date_time == (1980, 1, 1, 0, 0, 0) for i in infos)
        assert json.loads(z.read("dataset.json")) == {"labels": None}
    out = r.stdout
    assert f"wrote {dst}" in out and "6, 16x16, 3 channels" in out and "labels    none" in out
    assert "skipped   3 files:" in out
    assert "corrupt.png: cannot decode (Pillow does not recognise its contents as an image)" in out
    assert re.search(r"truncated\.png: cannot decode \(.+\)", out)
    assert "readme.txt: not an image file (extension .txt)" in out


def test_class_subfolders_give_sorted_labels_and_class_names(classes, tmp_path):
    dst = tmp_path / "classes.zip"
    r = ok(invoke("prepare", classes, dst, "-r", "8", "--transform", "center-crop", "--json"))
    report = json.loads(r.stdout)
    names = ["n01/a0.png", "n01/a1.png", "n01/gray.jpg", "n02/a0.png", "n02/gray.jpg",
             "n03/a0.png", "n03/a1.png", "n03/a2.png", "n03/gray.jpg"]
    ds = image_zip(path=str(dst))
    assert len(ds) == 9 and ds.shape == (3, 8, 8) and ds.label_dim == 3
    assert [int(ds[i][1]) for i in range(9)] == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    for got, exp in zip(pixels(ds), expected_folder(classes, lambda a: edm_center_crop(a, 8, 8), names)):
        np.testing.assert_array_equal(got, exp)  # grayscale JPEGs become RGB, as EDM's center-crop does
    meta = json.loads(zipfile.ZipFile(dst).read("dataset.json"))
    assert meta["classes"] == ["n01", "n02", "n03"]
    assert meta["labels"][2:4] == [["00000/img00000002.png", 0], ["00000/img00000003.png", 1]]
    assert report["count"] == 9 and report["label_dim"] == 3 and report["classes"] == ["n01", "n02", "n03"]
    assert [s["name"] for s in report["skipped"]] == ["n03/labels.txt", "n01/broken.jpg"]
    assert report["resolution"] == 8 and report["channels"] == 3 and report["dst"] == str(dst)

    unlabelled = tmp_path / "unlabelled.zip"
    ok(invoke("prepare", classes, unlabelled, "-r", "8", "--transform", "center-crop", "--no-labels"))
    assert image_zip(path=str(unlabelled)).label_dim == 0
    assert json.loads(zipfile.ZipFile(unlabelled).read("dataset.json")) == {"labels": None}


def test_images_beside_class_folders_need_no_labels(classes, tmp_path):
    Image.fromarray(rgb(8, 8, 0)).save(classes / "loose.png")
    err = user_error(invoke("prepare", classes, tmp_path / "x.zip", "-r", "8", "--transform", "center-crop"))
    assert "holds images at its top level (e.g. 'loose.png') beside class folders" in err and "--no-labels" in err
    ok(invoke("prepare", classes, tmp_path / "x.zip", "-r", "8", "--transform", "center-crop", "--no-labels"))
    assert len(image_zip(path=str(tmp_path / "x.zip"))) == 10


def test_grayscale_channels(tmp_path):
    src = tmp_path / "gray"
    src.mkdir()
    for i in range(3):
        Image.fromarray(rgb(8, 8, i)[..., 0]).save(src / f"{i}.png")
    r = ok(invoke("prepare", src, tmp_path / "rgb.zip"))
    assert "note: every image was grayscale but is stored as RGB; pass --channels 1" in r.stdout
    assert image_zip(path=str(tmp_path / "rgb.zip")).shape == (3, 8, 8)
    ok(invoke("prepare", src, tmp_path / "l.zip", "--channels", "1"))
    ds = image_zip(path=str(tmp_path / "l.zip"))
    assert ds.shape == (1, 8, 8)
    np.testing.assert_array_equal(ds[2][0][0].numpy(), rgb(8, 8, 2)[..., 0])


# --- transforms -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("w,h", [(40, 30), (31, 40), (33, 33), (100, 7), (9, 64)])
def test_center_crop_is_edms_arithmetic(w, h):
    img = rgb(w, h, w * h)
    got = transforms.center_crop(Image.fromarray(img), 16, 16)
    np.testing.assert_array_equal(np.array(got), edm_center_crop(img, 16, 16))


@pytest.mark.parametrize("w,h", [(300, 200), (129, 257), (64, 64), (70, 90)])
def test_center_crop_adm_is_adms_arithmetic(w, h):
    img = Image.fromarray(rgb(w, h, w + h))
    np.testing.assert_array_equal(np.array(transforms.center_crop_adm(img, 32, 32)), adm_center_crop_arr(img, 32))


def test_center_crop_wide_pads_to_square_and_skips_small_images(tmp_path):
    src = tmp_path / "wide"
    src.mkdir()
    images = {"a.png": rgb(100, 60, 0), "b.png": rgb(64, 64, 1), "c.png": rgb(20, 20, 2), "d.png": rgb(40, 10, 3)}
    for name, img in images.items():
        Image.fromarray(img).save(src / name)
    dst = tmp_path / "wide.zip"
    r = ok(invoke("prepare", src, dst, "--transform", "center-crop-wide", "-r", "32x16"))
    ds = image_zip(path=str(dst))
    assert len(ds) == 2 and ds.shape == (3, 32, 32)
    for got, name in zip(pixels(ds), ["a.png", "b.png"]):
        exp = edm_center_crop_wide(images[name], 32, 16)
        np.testing.assert_array_equal(got, exp)
        assert got[:8].max() == 0 and got[24:].max() == 0  # black bands above and below the 32x16 strip
    assert edm_center_crop_wide(images["c.png"], 32, 16) is None  # EDM drops these silently; we list them
    assert "c.png: too small for center-crop-wide 32x16: it is 20x20" in r.stdout
    assert "d.png: too small for center-crop-wide 32x16: it is 40x10" in r.stdout
    assert transforms.parse_resolution("32", "center-crop-wide") == (32, 16)  # a bare R is R x R/2


def test_no_transform_resizes_square_images_and_refuses_others(tmp_path):
    src = tmp_path / "sq"
    src.mkdir()
    Image.fromarray(rgb(24, 24, 0)).save(src / "a.png")
    Image.fromarray(rgb(16, 16, 1)).save(src / "b.png")
    ok(invoke("prepare", src, tmp_path / "sq.zip", "-r", "16"))
    got = pixels(image_zip(path=str(tmp_path / "sq.zip")))
    np.testing.assert_array_equal(got[0], np.array(Image.fromarray(rgb(24, 24, 0)).resize((16, 16), LANCZOS)))
    np.testing.assert_array_equal(got[1], rgb(16, 16, 1))  # already 16x16: untouched
    Image.fromarray(rgb(30, 20, 2)).save(src / "c.png")
    err = user_error(invoke("prepare", src, tmp_path / "c.zip", "-r", "16"))
    assert err == (f"error: {src}/c.png is 30x20, not square; pass --transform center-crop (or center-crop-adm, "
                   f"center-crop-wide) to crop it to 16x16")
    assert listing(tmp_path) == ["sq", "sq.zip"]


def test_resolution_is_required_when_sizes_differ(tmp_path):
    src = tmp_path / "mixed"
    src.mkdir()
    Image.fromarray(rgb(32, 32, 0)).save(src / "a.png")
    Image.fromarray(rgb(16, 16, 1)).save(src / "b.png")
    err = user_error(invoke("prepare", src, tmp_path / "m.zip"))
    assert err == (f"error: {src}/b.png is 16x16 but {src}/a.png is 32x32; the images differ in size: pass "
                   f"--resolution R (e.g. 32) and, for images that are not square, --transform center-crop")
    Image.fromarray(rgb(24, 24, 0)).save(src / "a.png")
    err = user_error(invoke("prepare", src, tmp_path / "m.zip"))
    assert err.startswith(f"error: {src}/a.png is 24x24; EDM datasets hold square images a power of two wide")
    assert listing(tmp_path) == ["mixed"]


@pytest.mark.parametrize("args,message", [
    (["-r", "48"], "--resolution 48: EDM datasets hold square images a power of two wide; use 32 or 64"),
    (["-r", "32x16"], "--resolution 32x16: --transform none makes square images"),
    (["--transform", "center-crop"], "--transform center-crop needs --resolution, e.g. --resolution 64"),
    (["--transform", "centre-crop", "-r", "8"], "unknown transform 'centre-crop'; choose one of none, center-crop, "
                                                "center-crop-wide, center-crop-adm. Did you mean 'center-crop'?"),
    (["--source", "imagenet"], "unknown source kind 'imagenet'; choose one of folder, zip, cifar10, mnist, "
                               "fashion-mnist, npz."),
    (["--split", "test"], "--split test: a folder source has no splits; leave --split out"),
    (["--labels"], "has no labels; put the images into one subfolder per class, or leave --labels out"),
    (["--channels", "4"], "--channels must be 1 (grayscale) or 3 (RGB), got 4"),
])
def test_bad_options(flat, tmp_path, args, message):
    err = user_error(invoke("prepare", flat, tmp_path / "x.zip", *args))
    assert message in err
    assert listing(tmp_path) == ["flat"]


# --- determinism, destinations, failures ------------------------------------------------------------------------------


def test_one_and_two_workers_write_identical_bytes(classes, tmp_path):
    for i in range(20):
        Image.fromarray(rgb(20 + i, 24, 50 + i)).save(classes / "n02" / f"more{i:02d}.png")
    one, two = tmp_path / "one.zip", tmp_path / "two.zip"
    ok(invoke("prepare", classes, one, "-r", "16", "--transform", "center-crop", "--workers", "1"))
    ok(invoke("prepare", classes, two, "-r", "16", "--transform", "center-crop", "--workers", "2"))
    assert one.read_bytes() == two.read_bytes()
    assert len(image_zip(path=str(one))) == 29


def test_memory_urls(flat, tmp_path):
    fs = fsspec.filesystem("memory")
    for p in sorted(flat.iterdir()):
        fs.pipe(f"memory://prep-src/{p.name}", p.read_bytes())
    r = ok(invoke("prepare", "memory://prep-src", "memory://prep-out/data.zip", "-r", "16", "--transform",
                  "center-crop", "--workers", "1"))
    assert "readme.txt: not an image file" in r.stdout
    ok(invoke("prepare", flat, tmp_path / "local.zip", "-r", "16", "--transform", "center-crop"))
    assert fs.cat("memory://prep-out/data.zip") == (tmp_path / "local.zip").read_bytes()
    assert fs.ls("/prep-out", detail=False) == ["/prep-out/data.zip"]  # the uploaded temporary name is gone
    assert len(image_zip(path="memory://prep-out/data.zip")) == 6
    err = user_error(invoke("prepare", "memory://prep-src", "memory://prep-out/data.zip", "-r", "16",
                            "--transform", "center-crop"))
    assert err == "error: 'memory://prep-out/data.zip' already exists; pass --overwrite to replace it, or choose " \
                  "another name"


def test_failures_leave_no_destination_and_no_temporary_file(flat, tmp_path):
    err = user_error(invoke("prepare", tmp_path / "missing", tmp_path / "out.zip"))
    assert err.startswith(f"error: '{tmp_path / 'missing'}' not found; give an image folder")
    err = user_error(invoke("prepare", flat, tmp_path / "nowhere" / "out.zip", "-r", "16", "--transform",
                            "center-crop"))
    assert err == (f"error: cannot write '{tmp_path / 'nowhere' / 'out.zip'}': the folder "
                   f"'{tmp_path / 'nowhere'}' does not exist; create it first")
    err = user_error(invoke("prepare", flat, tmp_path / "out.tar", "-r", "16", "--transform", "center-crop"))
    assert "the destination must be a .zip file" in err
    # mid-way, with a pool of 2 workers: ten images are written before the eleventh turns out not to be square
    src = tmp_path / "late"
    src.mkdir()
    for i in range(10):
        Image.fromarray(rgb(16, 16, i)).save(src / f"{i}.png")
    Image.fromarray(rgb(30, 20, 10)).save(src / "z.png")
    err = user_error(invoke("prepare", src, tmp_path / "out.zip", "-r", "32", "--workers", "2"))
    assert err == (f"error: {src}/z.png is 30x20, not square; pass --transform center-crop (or center-crop-adm, "
                   f"center-crop-wide) to crop it to 32x32")
    assert listing(tmp_path) == ["flat", "late"]
    fs = fsspec.filesystem("memory")
    user_error(invoke("prepare", src, "memory://prep-fail/out.zip", "-r", "32", "--workers", "2"))
    assert not fs.exists("/prep-fail/out.zip") and fs.find("/prep-fail") == []
    with tarfile.open(tmp_path / "images.tar.gz", "w:gz") as tar:
        tar.add(src, arcname="late")
    err = user_error(invoke("prepare", tmp_path / "images.tar.gz", tmp_path / "out.zip"))
    assert err == (f"error: '{tmp_path / 'images.tar.gz'}' is a tar archive but not CIFAR-10's cifar-10-python.tar.gz "
                   f"(it holds 'late', ...); tar archives of images are not read in place: extract it (tar xf) and "
                   f"give the folder")
    assert listing(tmp_path) == ["flat", "images.tar.gz", "late"]


def test_overwrite(flat, tmp_path):
    dst = tmp_path / "o.zip"
    dst.write_bytes(b"old")
    err = user_error(invoke("prepare", flat, dst, "-r", "8", "--transform", "center-crop"))
    assert "already exists; pass --overwrite" in err and dst.read_bytes() == b"old"
    ok(invoke("prepare", flat, dst, "-r", "8", "--transform", "center-crop", "--overwrite"))
    assert len(image_zip(path=str(dst))) == 6 and listing(tmp_path) == ["flat", "o.zip"]


def test_max_images(classes, tmp_path):
    r = ok(invoke("prepare", classes, tmp_path / "m.zip", "-r", "8", "--transform", "center-crop",
                  "--max-images", "3"))
    ds = image_zip(path=str(tmp_path / "m.zip"))
    assert len(ds) == 3 and [int(ds[i][1]) for i in range(3)] == [0, 0, 0]
    assert "skipped   2 files:" in r.stdout and "n01/broken.jpg" in r.stdout  # met before the third image
    assert "note: stopped at --max-images 3: read 4 of the 10 images" in r.stdout


# --- zip, CIFAR-10, MNIST and npz sources -----------------------------------------------------------------------------


def test_zip_source_and_remaking_an_edm_zip_keeps_labels(classes, tmp_path):
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(classes.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(classes).as_posix())
    ok(invoke("prepare", archive, tmp_path / "a.zip", "-r", "16", "--transform", "center-crop"))
    ok(invoke("prepare", classes, tmp_path / "b.zip", "-r", "16", "--transform", "center-crop"))
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
    ok(invoke("prepare", tmp_path / "b.zip", tmp_path / "c.zip", "-r", "8"))  # an EDM zip remade at 8x8
    small = image_zip(path=str(tmp_path / "c.zip"))
    big = image_zip(path=str(tmp_path / "b.zip"))
    assert small.shape == (3, 8, 8) and [int(small[i][1]) for i in range(9)] == [int(big[i][1]) for i in range(9)]
    assert json.loads(zipfile.ZipFile(tmp_path / "c.zip").read("dataset.json"))["classes"] == ["n01", "n02", "n03"]
    np.testing.assert_array_equal(pixels(small)[4], np.array(Image.fromarray(pixels(big)[4]).resize((8, 8), LANCZOS)))


def cifar_archive(path: Path, sizes: dict) -> dict:
    """A ``cifar-10-python.tar.gz`` in the official layout (pickled dicts of ``b"data"``/``b"labels"``)."""
    rng = np.random.default_rng(0)
    batches = {name: (rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist())
               for name, n in sizes.items()}
    with tarfile.open(path, "w:gz") as tar:
        for name, (data, labels) in batches.items():
            blob = pickle.dumps({b"batch_label": name.encode(), b"labels": labels, b"data": data}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return batches


def test_cifar10_source(tmp_path):
    sizes = {**{f"data_batch_{i}": 2 for i in range(1, 6)}, "test_batch": 3}
    batches = cifar_archive(tmp_path / "cifar-10-python.tar.gz", sizes)
    r = ok(invoke("prepare", tmp_path / "cifar-10-python.tar.gz", tmp_path / "c.zip", "--workers", "1"))
    assert "source    cifar10" in r.stdout
    ds = image_zip(path=str(tmp_path / "c.zip"))
    train = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert len(ds) == 10 and ds.shape == (3, 32, 32) and ds.label_dim == max(sum(
        (batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])) + 1
    assert torch.equal(ds.tensors()[0], torch.from_numpy(train))  # exact pixels: no resize at 32x32
    assert ds.tensors()[1].tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert json.loads(zipfile.ZipFile(tmp_path / "c.zip").read("dataset.json"))["classes"] == list(CIFAR10_CLASSES)
    ok(invoke("prepare", tmp_path / "cifar-10-python.tar.gz", tmp_path / "t.zip", "--split", "test", "-r", "64"))
    test = image_zip(path=str(tmp_path / "t.zip"))
    assert len(test) == 3 and test.shape == (3, 64, 64)
    first = batches["test_batch"][0][0].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(pixels(test)[0], np.array(Image.fromarray(first).resize((64, 64), LANCZOS)))


def idx(array: np.ndarray) -> bytes:
    magic = 0x803 if array.ndim == 3 else 0x801
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def test_mnist_and_fashion_mnist_sources(tmp_path):
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), np.array([3, 1, 4, 1, 5], np.uint8)
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx(images)))
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx(labels)))
    ok(invoke("prepare", folder, tmp_path / "m.zip"))
    ds = image_zip(path=str(tmp_path / "m.zip"))
    assert len(ds) == 5 and ds.shape == (1, 32, 32) and ds.label_dim == 6
    np.testing.assert_array_equal(ds.tensors()[0][:, 0].numpy(), np.pad(images, ((0, 0), (2, 2), (2, 2))))
    assert ds.tensors()[1].tolist() == labels.tolist()
    # EDM's way of naming the source (the images file), forced to Fashion-MNIST for its class names
    ok(invoke("prepare", folder / "train-images-idx3-ubyte.gz", tmp_path / "f.zip", "--source", "fashion-mnist"))
    assert (tmp_path / "f.zip").read_bytes() != (tmp_path / "m.zip").read_bytes()
    meta = json.loads(zipfile.ZipFile(tmp_path / "f.zip").read("dataset.json"))
    assert meta["classes"][0] == "T-shirt/top" and meta["labels"] == json.loads(
        zipfile.ZipFile(tmp_path / "m.zip").read("dataset.json"))["labels"]
    err = user_error(invoke("prepare", folder, tmp_path / "x.zip", "--split", "test"))
    assert "has no file t10k-images-idx3-ubyte.gz" in err


def test_npz_source(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", images=images, labels=np.array([2, 0, 2, 1]))
    ok(invoke("prepare", tmp_path / "x.npz", tmp_path / "x.zip"))
    ds = image_zip(path=str(tmp_path / "x.zip"))
    assert ds.label_dim == 3 and ds.tensors()[1].tolist() == [2, 0, 2, 1]
    np.testing.assert_array_equal(np.stack(pixels(ds)), images)
    assert "classes" not in json.loads(zipfile.ZipFile(tmp_path / "x.zip").read("dataset.json"))
    np.savez(tmp_path / "u.npz", images=images[..., :1])
    ok(invoke("prepare", tmp_path / "u.npz", tmp_path / "u.zip"))
    assert image_zip(path=str(tmp_path / "u.zip")).shape == (1, 16, 16)
    err = user_error(invoke("prepare", tmp_path / "u.npz", tmp_path / "v.zip", "--labels"))
    assert "has no labels; store them under the key 'labels', or leave --labels out" in err


@pytest.mark.skipif(not REAL_MNIST.is_dir(), reason="the real MNIST copy is not here")
def test_real_mnist_first_images(tmp_path):
    from dpdm.data.mnist import read_idx

    r = ok(invoke("prepare", REAL_MNIST, tmp_path / "mnist.zip", "--max-images", "300", "--json"))
    assert json.loads(r.stdout)["count"] == 300
    ds = image_zip(path=str(tmp_path / "mnist.zip"))
    images, labels = read_idx(str(REAL_MNIST), "train")
    assert len(ds) == 300 and ds.shape == (1, 32, 32) and ds.label_dim == 10
    x, y = ds.tensors()
    assert torch.equal(x[:, :, 2:30, 2:30], images[:300]) and int(x[:, :, :2].max()) == 0
    assert torch.equal(y, labels[:300])


# --- dpdm data info / download ----------------------------------------------------------------------------------------


def test_info_text_json_and_grid(classes, tmp_path):
    dst = tmp_path / "c.zip"
    ok(invoke("prepare", classes, dst, "-r", "8", "--transform", "center-crop"))
    r = ok(invoke("info", dst, "--grid", tmp_path / "grid.png", "--num", "4"))
    assert r.stdout.splitlines() == [
        f"{dst}: image-zip, split train", "  count       9", "  resolution  8", "  channels    3",
        "  label_dim   3", "       0 n01: 3", "       1 n02: 2", "       2 n03: 4",
        f"  grid        {tmp_path / 'grid.png'}"]
    grid = np.array(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 * 9 + 1, 2 * 9 + 1, 3)  # 2 x 2 tiles of 8 px with 1 px white borders
    ds = image_zip(path=str(dst))
    np.testing.assert_array_equal(grid[1:9, 1:9], pixels(ds)[0])  # items 0, 3, 5, 8: spread over the set
    np.testing.assert_array_equal(grid[10:18, 10:18], pixels(ds)[8])
    facts = json.loads(ok(invoke("info", dst, "--json")).stdout)
    assert facts == {"dataset": "image-zip", "path": str(dst), "kind": "image", "count": 9, "shape": [3, 8, 8],
                     "resolution": 8, "channels": 3, "label_dim": 3, "classes": ["n01", "n02", "n03"],
                     "histogram": [3, 2, 4], "labels_from": "dataset.json", "unreadable": []}
    facts = json.loads(ok(invoke("info", dst, "--json", "--set", "xflip=true", "--set", "labels=false")).stdout)
    assert facts["count"] == 18 and facts["label_dim"] == 0 and facts["histogram"] is None


def test_info_other_datasets_and_errors(tmp_path):
    np.savez(tmp_path / "x.npz", images=np.zeros((3, 4, 4), np.uint8))
    facts = json.loads(ok(invoke("info", tmp_path / "x.npz", "--json")).stdout)
    assert facts["dataset"] == "npz" and facts["count"] == 3 and facts["channels"] == 1
    r = ok(invoke("info", "--dataset", "gaussian-ring", "--set", "num_samples=50"))
    assert "count       50" in r.stdout and "shape       (2,) (vector)" in r.stdout
    err = user_error(invoke("info", "--dataset", "gaussian-ring", "--grid", tmp_path / "g.png"))
    assert err == "error: --grid: the dataset holds vector data, not images; leave --grid out"
    err = user_error(invoke("info", tmp_path / "x.npz", "--set", "colour=1"))
    assert err.startswith("error: dataset npz: got an unexpected keyword argument 'colour'; its options are: path, "
                          "images_key")
    assert "error: give the PATH of a dataset, or --dataset NAME" in user_error(invoke("info"))
    assert not (tmp_path / "g.png").exists()


def test_download_is_wired(tmp_path):
    err = user_error(invoke("download", "imagenet", tmp_path / "d"))
    assert err.startswith("error: cannot download unknown dataset 'imagenet'; downloadable: cifar10, mnist, "
                          "fashion-mnist.")
    assert "download" in ok(invoke("--help")).stdout
    assert os.listdir(tmp_path) == []
