"""Training snapshots (issue #6): the folder layout, files readable without pickle (safetensors and
``torch.load(weights_only=True)``), atomic saves (a crash mid-save never leaves a folder that looks complete),
retention, world-size checks, and local, ``memory://`` and ``s3://`` (a moto server) storage."""

from __future__ import annotations

import json
import logging
import uuid

import fsspec
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import dpdm.core.train.snapshots as snapshots_module
from dpdm.core.io.checkpoint import StorageError, build_denoiser, network_spec
from dpdm.core.errors import DpdmError
from dpdm.core.train.snapshots import MARKER, Snapshots, load_snapshot

torch.set_num_threads(1)

SPEC = network_spec({"name": "mlp", "hidden": 8, "depth": 1, "emb_dim": 8}, {"name": "edm"}, (2,), 0)


def models(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return {"student": build_denoiser(SPEC), "fake": build_denoiser(SPEC)}


def save(snaps: Snapshots, step: int, seed: int = 0) -> str:
    state = {"format": "test", "step": step, "job": {"lr": 0.5, "betas": (0.9, 0.99), "moments": torch.ones(3)}}
    rank_state = {"rank": 0, "rng": torch.get_rng_state(), "loader": {"epoch": 1, "step": step, "loader": {}}}
    return snaps.save(step, modules=models(seed), state=state, rank_state=rank_state,
                      specs={"student": SPEC, "fake": SPEC})


def steps_of(snaps: Snapshots) -> list[int]:
    return [step for step, _ in snaps.complete()]


def test_layout_and_files_readable_without_pickle(tmp_path):
    snaps = Snapshots(str(tmp_path / "snaps"))
    url = save(snaps, 7)
    folder = tmp_path / "snaps" / "ckpt-000000007"
    assert url == str(folder) and snaps.latest() == url
    assert sorted(p.name for p in folder.iterdir()) == [MARKER, "rank-00000.pt", "state.pt", "weights.safetensors"]
    assert [p.name for p in (tmp_path / "snaps").iterdir()] == ["ckpt-000000007"]  # no temporary folders left
    weights = load_file(str(folder / "weights.safetensors"))
    want = models()
    assert set(weights) == {f"{n}.{k}" for n, m in want.items() for k in m.state_dict()}
    assert torch.equal(weights["fake.model.linear_in.weight"], want["fake"].state_dict()["model.linear_in.weight"])
    with safe_open(str(folder / "weights.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["specs"]) == {"student": SPEC, "fake": SPEC}
    state = torch.load(folder / "state.pt", weights_only=True)
    assert state["job"]["betas"] == (0.9, 0.99) and torch.equal(state["job"]["moments"], torch.ones(3))
    rank = torch.load(folder / "rank-00000.pt", weights_only=True)
    assert rank["loader"]["step"] == 7
    marker = json.loads((folder / MARKER).read_text())
    assert marker["step"] == 7 and marker["world_size"] == 1
    assert marker["files"] == {p.name: p.stat().st_size for p in folder.iterdir() if p.name != MARKER}

    snap = load_snapshot(url)
    assert snap.step == 7 and snap.specs["fake"] == SPEC
    fresh = models(seed=1)
    snap.load_modules(fresh)
    for name in want:
        for a, b in zip(want[name].state_dict().values(), fresh[name].state_dict().values()):
            assert torch.equal(a, b)


def test_engine_snapshot_files_load_with_weights_only(tmp_path):
    """The real thing: what ``Trainer`` saves (Adam states, numpy and python RNG states, the Loader's state)."""
    from test_engine import trainer_for, distill_job  # the same toy setup

    trainer = trainer_for(distill_job(precision=None), snapshots=Snapshots(str(tmp_path)))
    trainer.fit(2)
    folder = tmp_path / "ckpt-000000002"
    state = torch.load(folder / "state.pt", weights_only=True)
    assert state["step"] == 2 and set(state["job"]["parts"]) == {"student", "fake"}
    first = next(trainer.job.fake.module.parameters())
    assert torch.equal(state["job"]["parts"]["fake"]["optimizer"]["state"][0]["exp_avg"],
                       trainer.job.fake.optimizer.state[first]["exp_avg"])
    rank = torch.load(folder / "rank-00000.pt", weights_only=True)
    assert set(rank["rng"]) == {"generator", "torch", "cuda", "numpy", "python"}
    # iterations x (2 fake updates on fresh batches, then the student's: Algorithm 1's order) x accum
    assert rank["loader"]["step"] == 2 * (2 + 1) * 2
    assert set(load_file(str(folder / "weights.safetensors"))) >= {"student.model.linear_in.weight",
                                                                  "ema.model.linear_in.weight",
                                                                  "fake.model.linear_in.weight"}


class Crash(RuntimeError):
    pass


def crash_on_write(monkeypatch, name: str):
    """Make the write of file ``name`` die, as a killed process or a full disk would."""
    real = snapshots_module.write_atomic

    def write(url, data):
        if url.endswith(name):
            raise Crash(f"died writing {url}")
        real(url, data)

    monkeypatch.setattr(snapshots_module, "write_atomic", write)


@pytest.mark.parametrize("dying", ["rank-00000.pt", MARKER])
def test_crash_mid_save_leaves_nothing_that_looks_complete_local(tmp_path, monkeypatch, dying):
    snaps = Snapshots(str(tmp_path))
    first = save(snaps, 1)
    crash_on_write(monkeypatch, dying)
    with pytest.raises(Crash):
        save(snaps, 2)
    assert snaps.latest() == first and steps_of(snaps) == [1]
    assert not (tmp_path / "ckpt-000000002").exists()  # only the hidden .partial folder holds the pieces
    assert (tmp_path / ".ckpt-000000002.partial").is_dir()
    monkeypatch.undo()
    save(snaps, 3)  # the next save clears the stale temporary folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000001", "ckpt-000000003"]


def test_crash_mid_save_on_object_like_storage(monkeypatch):
    root = f"memory://snaps-{uuid.uuid4().hex[:8]}"
    snaps = Snapshots(root)
    first = save(snaps, 1)
    crash_on_write(monkeypatch, MARKER)
    with pytest.raises(Crash):
        save(snaps, 2)
    fs = fsspec.filesystem("memory")
    assert fs.exists(f"{snaps._path}/ckpt-000000002/weights.safetensors")  # written in place, but no marker
    assert snaps.latest() == first
    with pytest.raises(DpdmError, match="no COMPLETE marker"):
        load_snapshot(f"{root}/ckpt-000000002")
    monkeypatch.undo()
    save(snaps, 3)
    assert not fs.exists(f"{snaps._path}/ckpt-000000002")  # the incomplete folder is pruned
    assert steps_of(snaps) == [1, 3]
    fs.rm(snaps._path, recursive=True)


def test_a_truncated_file_makes_the_folder_incomplete(tmp_path):
    snaps = Snapshots(str(tmp_path), keep_last=5)
    save(snaps, 1)
    url = save(snaps, 2)
    weights = tmp_path / "ckpt-000000002" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert steps_of(snaps) == [1] and snaps.latest() != url
    (tmp_path / "ckpt-000000001" / MARKER).write_text("{not json")
    assert snaps.latest() is None


def test_retention_keeps_the_last_k_and_every_nth(tmp_path):
    snaps = Snapshots(str(tmp_path), keep_last=2, keep_every=4)
    for step in range(1, 11):
        save(snaps, step)
    assert steps_of(snaps) == [4, 8, 9, 10]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"ckpt-{s:09d}" for s in (4, 8, 9, 10)]
    only_last = Snapshots(str(tmp_path / "b"), keep_last=1, keep_every=0)
    for step in (5, 6):
        save(only_last, step)
    assert steps_of(only_last) == [6]
    with pytest.raises(DpdmError, match="keep_last"):
        Snapshots(str(tmp_path), keep_last=0)


def test_saving_a_step_again_replaces_it(tmp_path):
    snaps = Snapshots(str(tmp_path))
    save(snaps, 3, seed=0)
    save(snaps, 3, seed=1)
    assert steps_of(snaps) == [3]
    weights = load_snapshot(snaps.latest()).weights["student"]
    assert torch.equal(weights["model.linear_in.weight"], models(1)["student"].state_dict()["model.linear_in.weight"])


def test_world_size_mismatch_is_a_clear_error(tmp_path):
    url = save(Snapshots(str(tmp_path)), 1)
    with pytest.raises(DpdmError, match=r"saved by 1 rank\(s\) but this run has 2; resume with 1 rank"):
        load_snapshot(url, rank=1, world_size=2)
    with pytest.raises(DpdmError, match="no COMPLETE marker"):
        load_snapshot(str(tmp_path / "nothing-here"))


def test_memory_round_trip():
    root = f"memory://snaps-{uuid.uuid4().hex[:8]}"
    snaps = Snapshots(root, keep_last=1)
    save(snaps, 1)
    url = save(snaps, 2)
    assert url == f"{root}/ckpt-000000002" and snaps.latest() == url and steps_of(snaps) == [2]
    snap = snaps.load()
    assert snap.step == 2 and snap.state["job"]["lr"] == 0.5 and snap.rank_state["loader"]["step"] == 2
    fsspec.filesystem("memory").rm(snaps._path, recursive=True)


# --- s3 (moto's server, reached through URLs and AWS_* variables as a user would) ----------------------------------

@pytest.fixture(scope="module")
def s3_bucket():
    moto_server = pytest.importorskip("moto.server", reason="moto[server] runs the local S3 server")
    s3fs = pytest.importorskip("s3fs", reason="s3fs is dpdm's s3:// backend")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
                mp.delenv(name, raising=False)
            mp.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
            for name, value in [("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                                ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_CONFIG_FILE", "/nonexistent/c"),
                                ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/s")]:
                mp.setenv(name, value)
            s3fs.S3FileSystem.clear_instance_cache()
            fs, _ = fsspec.core.url_to_fs("s3://dpdm-snapshots")
            fs.mkdir("dpdm-snapshots")
            yield fs
            s3fs.S3FileSystem.clear_instance_cache()
    finally:
        server.stop()


def test_s3_round_trip_and_retention(s3_bucket, monkeypatch):
    snaps = Snapshots("s3://dpdm-snapshots/run/snaps", keep_last=1, keep_every=2)
    for step in (1, 2, 3):
        url = save(snaps, step)
    assert url == "s3://dpdm-snapshots/run/snaps/ckpt-000000003"
    assert steps_of(snaps) == [2, 3]
    snap = load_snapshot(url)
    assert snap.step == 3 and snap.specs["student"] == SPEC
    crash_on_write(monkeypatch, MARKER)
    with pytest.raises(Crash):
        save(snaps, 4)
    assert snaps.latest() == url
    monkeypatch.undo()
    s3_bucket.invalidate_cache()
    keys = sorted(k.rsplit("/", 2)[-2] for k in s3_bucket.find("dpdm-snapshots/run/snaps"))
    assert set(keys) == {"ckpt-000000002", "ckpt-000000003", "ckpt-000000004"}


def test_s3_missing_bucket_is_a_storage_error(s3_bucket):
    with pytest.raises(StorageError, match="s3://dpdm-no-such-bucket"):
        save(Snapshots("s3://dpdm-no-such-bucket/snaps"), 1)
