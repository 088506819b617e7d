"""dpdm on real object storage: an S3-compatible server (moto's server mode) on 127.0.0.1, through s3fs.

Datasets (``image-zip``) and checkpoints are read and written by URL alone, as a user gives them; the
fixture points s3fs at the local server the way a user points dpdm at any S3-compatible server
(MinIO, Ceph, ...), with environment variables read by botocore:

    AWS_ENDPOINT_URL=http://127.0.0.1:9000          (or AWS_ENDPOINT_URL_S3, for S3 only)
    AWS_ACCESS_KEY_ID=...  AWS_SECRET_ACCESS_KEY=...  AWS_DEFAULT_REGION=us-east-1
    AWS_MAX_ATTEMPTS=1  AWS_RETRY_MODE=standard     (optional: fail at once on unreachable storage)

Storage failures (a missing bucket or key, a closed port, a corrupt archive, a refused write) must each
be one ``DpdmError`` naming the URL and what to check, and a failed checkpoint write must leave nothing
behind. Fast fsspec unit tests use ``memory://`` (tests/test_checkpoint.py, tests/test_image_folder.py).
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import socket
import time
import zipfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dpdm.cli.main import app
from dpdm.core.io.checkpoint import (StorageError, build_denoiser, load_checkpoint, network_spec, read_checkpoint,
                                  save_denoiser)
from dpdm.core.io.storage import AtomicPath, write_atomic
from dpdm.core.errors import DpdmError
from dpdm.data.image_folder import image_zip

moto_server = pytest.importorskip("moto.server", reason="moto[server] runs the local S3 server")
s3fs = pytest.importorskip("s3fs", reason="s3fs is dpdm's s3:// backend")

torch.set_num_threads(1)

BUCKET = "dpdm-test"
MISSING_BUCKET = "dpdm-no-such-bucket"
TOY2D = str(Path(__file__).resolve().parent.parent / "recipes" / "toy2d.yaml")
ENDPOINT_HINT = "for an S3-compatible server set AWS_ENDPOINT_URL"


# --- the server ---------------------------------------------------------------------------------------------------

def _free_port() -> int:
    """A port nothing listens on (bound and released at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _point_s3fs_at(mp: pytest.MonkeyPatch, endpoint: str) -> None:
    """Point botocore (and so s3fs) at ``endpoint`` with dummy credentials, ignoring the user's AWS setup, and
    drop the cached filesystems so the next URL makes a new one that reads this environment."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
        mp.delenv(name, raising=False)
    mp.setenv("AWS_ENDPOINT_URL", endpoint)
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    mp.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def s3():
    """An S3 server on 127.0.0.1 with the bucket ``BUCKET``, reached through URLs alone (the environment);
    yields the s3fs filesystem for checking what the code under test left in the bucket."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        with pytest.MonkeyPatch.context() as mp:
            _point_s3fs_at(mp, f"http://{host}:{port}")
            fs, _ = fsspec.core.url_to_fs(f"s3://{BUCKET}")
            fs.mkdir(BUCKET)
            yield fs
            s3fs.S3FileSystem.clear_instance_cache()
    finally:
        server.stop()


@pytest.fixture
def unreachable(s3, monkeypatch):
    """The environment of ``s3`` pointed at a closed port, failing at once (one attempt, no retries)."""
    _point_s3fs_at(monkeypatch, f"http://127.0.0.1:{_free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    yield
    s3fs.S3FileSystem.clear_instance_cache()  # the next test's URLs find the server again


def _keys(fs, prefix: str) -> list[str]:
    """Every object under ``prefix`` in the bucket, read afresh (s3fs caches listings)."""
    fs.invalidate_cache()
    return sorted(fs.find(f"{BUCKET}/{prefix}"))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    """The error's message, checked to be one line."""
    message = str(exc.value)
    assert "\n" not in message, message
    return message


# --- EDM-format datasets (as tests/test_image_folder.py writes them) ----------------------------------------------

def _name(idx: int) -> str:
    return f"{idx:08d}"[:5] + f"/img{idx:08d}.png"


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="png", compress_level=0)
    return buf.getvalue()


def _images(n: int, size: int = 8) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _members(images, labels) -> dict[str, bytes]:
    """The members of an EDM dataset: PNGs and ``dataset.json`` with class indices."""
    members = {_name(i): _png(a) for i, a in enumerate(images)}
    members["dataset.json"] = json.dumps({"labels": [[_name(i), lab] for i, lab in enumerate(labels)]}).encode()
    return members


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    """An uncompressed ZIP of ``members``, as EDM's dataset_tool.py writes it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _chw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.transpose(2, 0, 1).copy())


IMAGES = _images(6)
LABELS = [3, 0, 2, 2, 1, 0]


@pytest.fixture(scope="module")
def dataset_url(s3) -> str:
    s3.pipe_file(f"{BUCKET}/data/ds.zip", _zip_bytes(_members(IMAGES, LABELS)))
    return f"s3://{BUCKET}/data/ds.zip"


def _check_every_item(ds) -> None:
    assert (len(ds), ds.shape, ds.label_dim) == (len(IMAGES), (3, 8, 8), 4)
    for i, (array, label) in enumerate(zip(IMAGES, LABELS)):
        x, y = ds[i]
        assert torch.equal(x, _chw(array)) and int(y) == label, i


# --- reading datasets -------------------------------------------------------------------------------------------

def test_image_zip_on_s3_reads_every_pixel_and_label(dataset_url):
    ds = image_zip(path=dataset_url)
    _check_every_item(ds)
    ds.close()


def test_image_zip_through_simplecache(dataset_url):
    """``simplecache::`` copies the archive to a local temporary file once; random access is then local."""
    ds = image_zip(path=f"simplecache::{dataset_url}")
    _check_every_item(ds)
    ds.close()


def test_image_zip_through_filecache_in_a_chosen_folder(dataset_url, tmp_path, monkeypatch):
    """URLs carry no options, so ``filecache::`` takes its folder from fsspec's configuration, which a user sets
    with ``FSSPEC_FILECACHE_CACHE_STORAGE=/path`` (fsspec reads it on import; here the same dict is patched)."""
    monkeypatch.setitem(fsspec.config.conf, "filecache", {"cache_storage": str(tmp_path / "cache")})
    ds = image_zip(path=f"filecache::{dataset_url}")
    _check_every_item(ds)
    ds.close()
    cached = [p for p in (tmp_path / "cache").iterdir() if p.name != "cache"]  # "cache" is filecache's index
    assert len(cached) == 1 and cached[0].stat().st_size == len(_zip_bytes(_members(IMAGES, LABELS)))


def test_image_zip_on_s3_pickles_into_dataloader_workers(dataset_url):
    """Each worker reopens the archive itself: the pickled dataset holds the URL, not a handle."""
    ds = image_zip(path=dataset_url, xflip=True)
    ds[0]  # open the handle in this process: it must not travel
    clone = pickle.loads(pickle.dumps(ds))
    loader = torch.utils.data.DataLoader(clone, batch_size=3, num_workers=2, shuffle=False)
    x, y = (torch.cat(parts) for parts in zip(*loader))
    expected = torch.stack([_chw(a) for a in IMAGES])
    assert torch.equal(x, torch.cat([expected, expected.flip(-1)]))
    assert y.tolist() == LABELS * 2
    ds.close()


# --- checkpoints ----------------------------------------------------------------------------------------------

def _spec() -> dict:
    return network_spec({"name": "mlp", "hidden": 16, "depth": 2, "emb_dim": 8},
                        {"name": "edm", "sigma_data": 0.5}, (2,), 0)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_denoiser(_spec())
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape))
    return model


def test_checkpoint_round_trip_on_s3(s3):
    url = f"s3://{BUCKET}/run/ckpt.safetensors"
    model = _model()
    save_denoiser(url, model, _spec(), {"role": "student"})
    assert _keys(s3, "run") == [f"{BUCKET}/run/ckpt.safetensors"]  # one upload: no temporary object
    for source in (url, f"simplecache::{url}"):
        loaded, spec = load_checkpoint(source)
        assert spec == _spec()
        assert loaded.state_dict().keys() == model.state_dict().keys()
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
    assert read_checkpoint(url)[2] == {"role": "student"}


def test_checkpoint_write_to_a_missing_bucket_creates_nothing(s3):
    url = f"s3://{MISSING_BUCKET}/run/ckpt.safetensors"
    with pytest.raises(StorageError) as info:
        save_denoiser(url, _model(), _spec())
    message = _one_line(info)
    assert message.startswith(f"cannot write checkpoint {url!r}: The specified bucket does not exist; ")
    assert ENDPOINT_HINT in message
    s3.invalidate_cache()
    assert not s3.exists(MISSING_BUCKET)  # s3fs's makedirs would have created the bucket


def test_failed_multipart_upload_leaves_nothing_behind(s3, monkeypatch):
    """A write that fails half-way (the second of three parts) leaves neither the key nor an open upload, and an
    earlier checkpoint at the same URL stays as it was."""
    url = f"s3://{BUCKET}/atomic/ckpt.safetensors"
    key = url.removeprefix("s3://")
    s3.pipe_file(key, b"the previous checkpoint")
    fs, _ = fsspec.core.url_to_fs(url)
    pipe_file, call_s3 = fs.pipe_file, fs._call_s3
    monkeypatch.setattr(fs, "pipe_file", lambda path, data, **kw: pipe_file(path, data, chunksize=5 << 20, **kw))
    parts = []

    async def flaky(method, *args, **kwargs):
        if method == "upload_part":
            parts.append(kwargs["PartNumber"])
            if kwargs["PartNumber"] == 2:
                raise ConnectionResetError("connection reset by peer")
        return await call_s3(method, *args, **kwargs)

    monkeypatch.setattr(fs, "_call_s3", flaky)
    with pytest.raises(ConnectionResetError, match=r"^connection reset by peer$"):
        write_atomic(url, bytes(11 << 20))  # three 5 MiB parts: a multipart upload
    monkeypatch.undo()
    assert 2 in parts
    assert _keys(s3, "atomic") == [key] and s3.cat_file(key) == b"the previous checkpoint"
    assert s3.call_s3("list_multipart_uploads", Bucket=BUCKET).get("Uploads", []) == []


def test_streamed_write_is_one_upload_or_nothing(s3):
    """``AtomicPath`` stages the file locally and uploads it straight to its key (no temporary key, no move);
    a writer that fails leaves the earlier object as it was."""
    url = f"s3://{BUCKET}/streamed/data.zip"
    key = url.removeprefix("s3://")
    s3.pipe_file(key, b"the previous archive")
    with pytest.raises(ConnectionResetError):
        with AtomicPath(url) as tmp, open(tmp, "wb") as f:
            f.write(b"half of it")
            raise ConnectionResetError("the source went away")
    assert _keys(s3, "streamed") == [key] and s3.cat_file(key) == b"the previous archive"
    with AtomicPath(url) as tmp, open(tmp, "wb") as f:
        f.write(b"the new archive")
    assert not os.path.exists(tmp)
    assert _keys(s3, "streamed") == [key] and s3.cat_file(key) == b"the new archive"


def test_failed_rename_leaves_nothing_behind_on_a_filesystem(monkeypatch):
    """Filesystems (here ``memory://``) get a temporary sibling renamed into place; a failed rename removes it."""
    fs = fsspec.filesystem("memory")
    url = "memory://test-s3-rename/ckpt.safetensors"

    def broken_mv(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(fs, "mv", broken_mv)
    with pytest.raises(StorageError, match=r"^cannot write checkpoint 'memory://.*': read-only file system$"):
        save_denoiser(url, _model(), _spec())
    assert fs.find("/test-s3-rename") == []


# --- errors: missing, unreachable, corrupt -------------------------------------------------------------------------

def test_missing_bucket_and_key_for_datasets(s3):
    url = f"s3://{MISSING_BUCKET}/ds.zip"
    with pytest.raises(DpdmError) as info:
        image_zip(path=url)
    message = _one_line(info)
    assert message.startswith(f"image-zip: cannot open {url!r}: the bucket {MISSING_BUCKET!r} does not exist ")
    assert ENDPOINT_HINT in message
    url = f"s3://{BUCKET}/no-such-key.zip"
    with pytest.raises(DpdmError, match="^" + re.escape(f"image-zip: {url!r} not found; set data.path to the dataset")):
        image_zip(path=url)


def test_missing_bucket_and_key_for_checkpoints(s3):
    url = f"s3://{MISSING_BUCKET}/ckpt.safetensors"
    with pytest.raises(DpdmError) as info:
        load_checkpoint(url)
    message = _one_line(info)
    assert message.startswith(f"checkpoint {url!r} not found: the bucket {MISSING_BUCKET!r} does not exist ")
    assert ENDPOINT_HINT in message
    url = f"s3://{BUCKET}/no-such-key.safetensors"
    with pytest.raises(DpdmError) as info:
        load_checkpoint(url)
    assert _one_line(info).startswith(f"checkpoint {url!r} not found; check the bucket name")


def test_unreachable_storage_fails_fast_with_one_line(unreachable):
    started = time.perf_counter()
    url = f"s3://{BUCKET}/data/ds.zip"
    with pytest.raises(DpdmError) as info:
        image_zip(path=url)
    assert _one_line(info).startswith(f"image-zip: cannot open {url!r}: Could not connect to the endpoint URL")
    url = f"s3://{BUCKET}/run/ckpt.safetensors"
    with pytest.raises(DpdmError) as info:
        load_checkpoint(url)
    assert _one_line(info).startswith(f"cannot read checkpoint {url!r}: Could not connect to the endpoint URL")
    assert ENDPOINT_HINT in str(info.value)
    with pytest.raises(StorageError) as info:
        save_denoiser(url, _model(), _spec())
    assert _one_line(info).startswith(f"cannot write checkpoint {url!r}: Could not connect to the endpoint URL")
    assert time.perf_counter() - started < 10


def test_dataset_worker_finding_the_storage_gone(dataset_url, monkeypatch):
    """A dataset opened while the storage was up, then read in a process where it is not (as a DataLoader
    worker started later would), fails with one line naming the URL."""
    clone = pickle.loads(pickle.dumps(image_zip(path=dataset_url)))
    _point_s3fs_at(monkeypatch, f"http://127.0.0.1:{_free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    try:
        with pytest.raises(DpdmError) as info:
            clone[0]
        assert _one_line(info).startswith(f"image-zip: cannot open {dataset_url!r}: Could not connect to the endpoint")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.parametrize("key, blob, message", [
    ("noise.zip", b"not a zip at all" * 64, r"is not a readable zip archive \(File is not a zip file\)"),
    ("cut.zip", _zip_bytes(_members(IMAGES, LABELS))[:700], r"is not a readable zip archive"),  # no directory
    ("labels.zip", _zip_bytes(_members(IMAGES[:2], LABELS[:1])), r"has no label for '00000/img00000001.png'"),
    ("image.zip", _zip_bytes({**_members(IMAGES[:1], LABELS[:1]), _name(0): _png(IMAGES[0])[:60]}),
     r"cannot decode '00000/img00000000.png' .*truncated or not an image"),
])
def test_corrupt_datasets_on_s3(s3, key, blob, message):
    """A corrupt or truncated archive, a label file that does not match its images and a truncated image."""
    url = f"s3://{BUCKET}/bad/{key}"
    s3.pipe_file(url, blob)
    with pytest.raises(DpdmError, match=rf"^image-zip: .*{message}") as info:
        image_zip(path=url)
    assert repr(url) in _one_line(info)


def test_corrupt_checkpoint_on_s3(s3):
    url = f"s3://{BUCKET}/bad/ckpt.safetensors"
    s3.pipe_file(url, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(DpdmError, match=rf"^checkpoint {url!r} is not a valid safetensors file"):
        load_checkpoint(url)


# --- the CLI ------------------------------------------------------------------------------------------------------

def _cli_error(*args) -> list[str]:
    """The lines of the message ``dpdm`` prints for a user error (exit 1, no traceback)."""
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "1000"})
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert result.stdout == "" and result.stderr.startswith("error: "), result.stderr
    return result.stderr.splitlines()


def _data_problem(lines: list[str], url: str) -> str:
    """The one line of ``dpdm run``'s recipe problems (preflight lists them all) that names ``url``."""
    assert lines[0].startswith("error: invalid recipe ") and lines[0].endswith("(1 problem):"), lines
    assert len(lines) == 2 and lines[1].startswith(f"  - recipe.data: image-zip: cannot open {url!r}: "), lines
    return lines[1]


def test_cli_run_with_a_dataset_in_a_missing_bucket(s3):
    url = f"s3://{MISSING_BUCKET}/ds.zip"
    lines = _cli_error("run", TOY2D, "--dry-run", "--set", "data={name: image-zip, path: " + url + "}")
    problem = _data_problem(lines, url)
    assert f"the bucket {MISSING_BUCKET!r} does not exist" in problem and ENDPOINT_HINT in problem


def test_cli_on_unreachable_storage(unreachable, tmp_path):
    url = f"s3://{BUCKET}/data/ds.zip"
    lines = _cli_error("run", TOY2D, "--dry-run", "--set", "data={name: image-zip, path: " + url + "}")
    assert "Could not connect to the endpoint URL" in _data_problem(lines, url)
    url = f"s3://{BUCKET}/network-snapshot.pkl"
    (line,) = _cli_error("convert", "edm-pkl", url, tmp_path / "out.safetensors")
    assert line.startswith(f"error: cannot read checkpoint {url!r}: Could not connect to the endpoint URL")
    assert not (tmp_path / "out.safetensors").exists()


def test_a_checkpoint_dir_on_unreachable_storage_is_a_recipe_problem(unreachable, tmp_path, monkeypatch):
    """``engine.checkpoint.dir`` is refused by ``--dry-run`` (and so before a real run makes its directory) in one
    line, as a data path on that storage is, not with botocore's traceback at the first snapshot."""
    monkeypatch.chdir(tmp_path)
    started = time.perf_counter()
    url = f"s3://{BUCKET}/ckpt"
    lines = _cli_error("run", TOY2D, "--dry-run", "--set", f"engine.checkpoint.dir={url}")
    assert lines[0].endswith("(1 problem):") and len(lines) == 2, lines
    assert lines[1].startswith(f"  - recipe.engine.checkpoint.dir: cannot write {url}: Could not connect to the "
                               f"endpoint URL") and ENDPOINT_HINT in lines[1]
    (line,) = _cli_error("run", TOY2D, "--out", f"s3://{BUCKET}/run")  # not "the bucket does not exist"
    assert line.startswith(f"error: cannot write the run directory s3://{BUCKET}/run: Could not connect to the "
                           f"endpoint URL")
    assert list(tmp_path.iterdir()) == [] and time.perf_counter() - started < 20


def test_a_checkpoint_dir_in_a_missing_bucket_is_a_recipe_problem(s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = _cli_error("run", TOY2D, "--dry-run", "--set", f"engine.checkpoint.dir=s3://{MISSING_BUCKET}/ckpt")
    assert lines[1].startswith(f"  - recipe.engine.checkpoint.dir: cannot write s3://{MISSING_BUCKET}/ckpt: bucket "
                               f"{MISSING_BUCKET!r} does not exist (dpdm does not create buckets)")
    assert not s3.exists(MISSING_BUCKET) and list(tmp_path.iterdir()) == []
    result = CliRunner().invoke(app, ["run", TOY2D, "--dry-run", "--set", f"engine.checkpoint.dir=s3://{BUCKET}/ok"])
    assert result.exit_code == 0, result.output


# --- a run directory on S3 ----------------------------------------------------------------------------------------

RUN_TINY = ["teacher.train.steps=3", "train.steps=2", "train.fake_updates=1", "eval.num_samples=50",
            "eval.recovery_num=50", "eval.teacher_nfe=[1]", "eval.student_steps=[1]", "eval.one_step_sigma_max=[80.0]",
            "eval.recovery_sigmas=[1.0]", "eval.teacher_samplers=[euler]", "model.backbone.hidden=8",
            "model.backbone.depth=1"]


def test_cli_run_into_s3(s3, tmp_path, monkeypatch):
    """``dpdm run --out s3://...`` writes the whole run to the bucket (nothing local), locks it while it runs (an
    exclusive create: a second claim is refused), and ``dpdm recover --run s3://...`` reads it back."""
    from dpdm.core.pipeline.runlock import RunBusyError, RunLock

    monkeypatch.chdir(tmp_path)
    url = f"s3://{BUCKET}/runs/tiny"
    sets = [part for o in RUN_TINY for part in ("--set", o)]
    result = CliRunner().invoke(app, ["run", TOY2D, *sets, "--out", url], env={"COLUMNS": "1000"})
    assert result.exit_code == 0, (result.output, result.exception)
    keys = {k.removeprefix(f"{BUCKET}/runs/tiny/") for k in _keys(s3, "runs/tiny")}
    assert {"config.yaml", "report.json", "report.md", "metrics.jsonl", "checkpoints/student.safetensors",
            "figures/samples_student.png"} <= keys and ".lock" not in keys
    assert list(tmp_path.iterdir()) == []  # no local folder named "s3:"
    with RunLock(f"{url}/.lock"):
        with pytest.raises(RunBusyError, match=f"pid {os.getpid()} on"):
            RunLock(f"{url}/.lock").acquire()
    rec = CliRunner().invoke(app, ["recover", "--run", url, "--sigma", "1", "--num", "20"], env={"COLUMNS": "1000"})
    assert rec.exit_code == 0, rec.output
    assert f"{BUCKET}/runs/tiny/eval/recover.json" in _keys(s3, "runs/tiny/eval")


def test_cli_run_into_a_missing_bucket_writes_nothing(s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = _cli_error("run", TOY2D, "--out", f"s3://{MISSING_BUCKET}/run")
    assert f"bucket {MISSING_BUCKET!r} does not exist" in " ".join(lines) and ENDPOINT_HINT in " ".join(lines)
    assert list(tmp_path.iterdir()) == []
