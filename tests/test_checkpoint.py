"""Checkpoints: safetensors weights plus the network spec in the metadata, local and fsspec URLs,
clear errors for bad files, and atomic writes."""

from __future__ import annotations

import json
import os

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from safetensors import safe_open

from dpdm.core import DpdmError, load_denoiser
from dpdm.core.io.checkpoint import FORMAT, build_denoiser, network_spec, read_checkpoint, save_denoiser
from dpdm.core.precond import EDMPrecond

torch.set_num_threads(1)

MEM_ROOT = "/test-checkpoint"


def small_spec(label_dim: int = 0) -> dict:
    return network_spec({"name": "mlp", "hidden": 16, "depth": 2, "emb_dim": 8},
                        {"name": "edm", "sigma_data": 0.5}, (2,), label_dim)


def random_denoiser(spec: dict, seed: int = 0) -> torch.nn.Module:
    """A denoiser with every weight random (the MLP's output layer starts at zero, which would hide mistakes)."""
    torch.manual_seed(seed)
    model = build_denoiser(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
    return model


def probe(model, label_dim: int = 0):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 2, generator=g)
    sigma = torch.exp(torch.randn(64, generator=g) * 1.5)
    labels = torch.randint(label_dim, (64,), generator=g) if label_dim else None
    with torch.no_grad():
        return model(x, sigma, class_labels=labels)


@pytest.fixture
def memfs():
    fs = fsspec.filesystem("memory")
    try:
        yield fs
    finally:
        if fs.exists(MEM_ROOT):
            fs.rm(MEM_ROOT, recursive=True)


def check_round_trip(url: str, label_dim: int = 0):
    spec = small_spec(label_dim)
    model = random_denoiser(spec)
    save_denoiser(url, model, spec, {"role": "teacher", "steps": 7})
    loaded = load_denoiser(url)
    assert isinstance(loaded, EDMPrecond) and loaded.sigma_data == 0.5 and loaded.label_dim == label_dim
    assert not loaded.training and not any(m.training for m in loaded.modules())
    assert not any(p.requires_grad for p in loaded.parameters())
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    out, ref = probe(loaded, label_dim), probe(model.eval(), label_dim)
    assert torch.equal(out, ref)
    assert not torch.allclose(ref, probe(random_denoiser(spec, seed=1).eval(), label_dim))  # weights matter
    state, spec_back, extra = read_checkpoint(url)
    assert spec_back == spec == {"backbone": {"name": "mlp", "hidden": 16, "depth": 2, "emb_dim": 8},
                                 "precond": {"name": "edm", "sigma_data": 0.5}, "shape": [2],
                                 "label_dim": label_dim}
    assert extra == {"role": "teacher", "steps": 7}
    assert state.keys() == model.state_dict().keys()


@pytest.mark.parametrize("label_dim", [0, 3])
def test_round_trip_local(tmp_path, label_dim):
    check_round_trip(str(tmp_path / "sub" / "dir" / "d.safetensors"), label_dim)  # parents are created
    assert sorted(os.listdir(tmp_path / "sub" / "dir")) == ["d.safetensors"]  # no temporary file left


def test_round_trip_memory_url(memfs):
    url = f"memory://{MEM_ROOT}/run/d.safetensors"
    check_round_trip(url)
    assert [p.rsplit("/", 1)[1] for p in memfs.ls(f"{MEM_ROOT}/run", detail=False)] == ["d.safetensors"]


def test_file_is_plain_safetensors_with_spec_metadata(tmp_path):
    path = tmp_path / "d.safetensors"
    spec = small_spec()
    model = random_denoiser(spec)
    save_denoiser(str(path), model, spec)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    assert meta == {"format": FORMAT, "network": json.dumps(spec), "extra": "{}"}
    assert FORMAT == "dpdm-denoiser/1"
    assert json.loads(meta["network"]) == spec
    assert keys == set(model.state_dict()) and all(k.startswith("model.") for k in keys)
    for k, v in model.state_dict().items():
        assert torch.equal(tensors[k], v)
    # no pickle anywhere: the file starts with the 8-byte header length and a JSON header
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert json.loads(data[8:8 + n])["__metadata__"]["format"] == FORMAT


def test_truncated_file(tmp_path):
    path = tmp_path / "d.safetensors"
    spec = small_spec()
    save_denoiser(str(path), random_denoiser(spec), spec)
    data = path.read_bytes()
    for cut in (len(data) - 100, len(data) // 2, 20, 5, 0):
        path.write_bytes(data[:cut])
        with pytest.raises(DpdmError) as info:
            load_denoiser(str(path))
        msg = str(info.value)
        assert msg.startswith(f"checkpoint {str(path)!r} is not a valid safetensors file ("), (cut, msg)
        assert msg.endswith("); was it truncated or written by another program?")


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(DpdmError) as info:
        load_denoiser(str(path))
    assert str(info.value).startswith(f"checkpoint {str(path)!r} is not a valid safetensors file (")
    assert "noise.safetensors" in str(info.value)


def test_safetensors_from_another_program(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(DpdmError) as info:
        load_denoiser(str(path))
    assert str(info.value) == (f"checkpoint {str(path)!r} is not a dpdm denoiser checkpoint (format None, "
                               "expected 'dpdm-denoiser/1')")


def test_missing_file(tmp_path, memfs):
    path = str(tmp_path / "missing.safetensors")
    with pytest.raises(DpdmError) as info:
        load_denoiser(path)
    assert str(info.value) == f"checkpoint {path!r} not found"
    url = f"memory://{MEM_ROOT}/missing.safetensors"
    with pytest.raises(DpdmError, match="not found"):
        load_denoiser(url)


def test_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(DpdmError) as info:
        load_denoiser(str(tmp_path))
    assert str(info.value).startswith(f"cannot read checkpoint {str(tmp_path)!r}: ")


def test_weights_that_do_not_fit_the_spec(tmp_path):
    path = str(tmp_path / "d.safetensors")
    spec = small_spec()
    model = random_denoiser(spec)
    other = dict(spec, backbone={**spec["backbone"], "depth": 1})  # one residual block fewer
    save_denoiser(path, model, other)
    with pytest.raises(DpdmError) as info:
        load_denoiser(path)
    msg = str(info.value)
    assert msg.startswith(f"checkpoint {path!r} does not fit its own network spec: missing [], unexpected [")
    assert "model.blocks.1." in msg


def test_weights_of_the_wrong_shape(tmp_path):
    path = str(tmp_path / "d.safetensors")
    spec = small_spec()
    other = dict(spec, backbone={**spec["backbone"], "hidden": 8})  # same keys, other shapes
    save_denoiser(path, random_denoiser(spec), other)
    with pytest.raises(DpdmError) as info:
        load_denoiser(path)
    assert str(info.value).startswith(f"checkpoint {path!r} does not fit its own network spec: ")
    assert "size mismatch" in str(info.value)


def test_corrupt_network_spec(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": FORMAT, "network": "{not json"})
    with pytest.raises(DpdmError) as info:
        load_denoiser(str(path))
    assert str(info.value).startswith(f"checkpoint {str(path)!r} has a corrupt network spec in its metadata")
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": FORMAT, "network": json.dumps({"shape": [2]})})
    with pytest.raises(DpdmError, match="corrupt network spec"):
        read_checkpoint(str(path))


# --- atomic writes ------------------------------------------------------------------------------------------


class Boom(RuntimeError):
    pass


def _failing_mv(self, *args, **kwargs):
    raise Boom("disk full")


def _failing_replace(*args, **kwargs):
    raise Boom("disk full")


def test_failed_write_leaves_nothing_local(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "replace", _failing_replace)  # the rename of a local temporary file
    spec = small_spec()
    target = tmp_path / "d.safetensors"
    with pytest.raises(Boom):
        save_denoiser(str(target), random_denoiser(spec), spec)
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    spec = small_spec()
    target = tmp_path / "d.safetensors"
    old = random_denoiser(spec, seed=0)
    save_denoiser(str(target), old, spec)
    before = target.read_bytes()
    monkeypatch.setattr(os, "replace", _failing_replace)
    with pytest.raises(Boom):
        save_denoiser(str(target), random_denoiser(spec, seed=1), spec)
    assert os.listdir(tmp_path) == ["d.safetensors"]
    assert target.read_bytes() == before
    monkeypatch.undo()
    assert torch.equal(probe(load_denoiser(str(target))), probe(old.eval()))


def test_failed_write_leaves_nothing_in_memory(memfs, monkeypatch):
    monkeypatch.setattr(MemoryFileSystem, "mv", _failing_mv)
    spec = small_spec()
    url = f"memory://{MEM_ROOT}/d.safetensors"
    with pytest.raises(Boom):
        save_denoiser(url, random_denoiser(spec), spec)
    assert not memfs.exists(f"{MEM_ROOT}/d.safetensors")
    assert memfs.ls(MEM_ROOT, detail=False) == []


def test_overwrite_replaces_the_checkpoint(tmp_path):
    spec = small_spec()
    target = str(tmp_path / "d.safetensors")
    save_denoiser(target, random_denoiser(spec, seed=0), spec)
    new = random_denoiser(spec, seed=1)
    save_denoiser(target, new, spec, {"role": "student"})
    assert torch.equal(probe(load_denoiser(target)), probe(new.eval()))
    assert read_checkpoint(target)[2] == {"role": "student"}
    assert os.listdir(tmp_path) == ["d.safetensors"]
