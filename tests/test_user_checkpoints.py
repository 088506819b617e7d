"""A user's own torch files given as a checkpoint: each kind is recognised from its bytes and gets its own message
(a whole pickled module, a bare state dict, a protocol 0/1 pickle), nothing is unpickled beyond plain data, and a
bare state dict loads into a named backbone (``dpdm convert state-dict``, or a recipe's ``teacher.checkpoint``)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from dpdm.cli.main import app
from dpdm.core.errors import DpdmError
from dpdm.core.io.checkpoint import load_checkpoint, load_denoiser, network_spec, read_checkpoint
from dpdm.core.io.torch_files import PICKLE, SAFETENSORS, TORCH_ZIP, UNKNOWN, file_format
from dpdm.core.plugins.registry import get
from dpdm.core.precond import EDMPrecond

torch.set_num_threads(1)

WIDE = {"COLUMNS": "1000"}
BACKBONE = {"name": "mlp", "hidden": 16, "depth": 2, "emb_dim": 8}


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env=WIDE)


def backbone(seed: int = 0, **options) -> nn.Module:
    """A registered backbone with every weight random (the MLP's output layer starts at zero)."""
    torch.manual_seed(seed)
    opts = {k: v for k, v in {**BACKBONE, **options}.items() if k != "name"}
    net = get("backbone", "mlp")(shape=(2,), label_dim=0, **opts)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
    return net


def outputs(denoiser) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x, sigma = torch.randn(32, 2, generator=g), torch.exp(torch.randn(32, generator=g))
    with torch.no_grad():
        return denoiser(x, sigma)


class Net(nn.Module):  # a user's own class, as torch.save(model) would pickle it
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 2)


def test_file_format_by_magic_bytes(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "a.safetensors")
    torch.save({"w": torch.zeros(2)}, tmp_path / "a.pt")
    assert file_format((tmp_path / "a.safetensors").read_bytes()[:64]) == SAFETENSORS
    assert file_format((tmp_path / "a.pt").read_bytes()[:64]) == TORCH_ZIP
    for protocol in range(6):
        assert file_format(pickle.dumps({"w": [1, 2]}, protocol=protocol)[:64]) == PICKLE, protocol
        assert file_format(pickle.dumps([1.5, "x"], protocol=protocol)[:64]) == PICKLE, protocol
    assert file_format(pickle.dumps(None, protocol=0)) == PICKLE  # "N." is a whole pickle
    for junk in (b"", b"hello world, not a checkpoint", b"(not a pickle", b"\x00" * 64):
        assert file_format(junk) == UNKNOWN, junk


@pytest.mark.parametrize("save", [
    lambda m, p: torch.save(m, p),
    lambda m, p: p.write_bytes(pickle.dumps(m, protocol=0)),
    lambda m, p: p.write_bytes(pickle.dumps({"model": m}, protocol=5)),
], ids=["torch.save", "pickle-0", "pickle-5-in-a-dict"])
@pytest.mark.parametrize("make, name", [(Net, f"{__name__}.Net"),
                                        (lambda: nn.Linear(2, 2), "torch.nn.modules.linear.Linear")])
def test_a_whole_pickled_module_is_named_not_called_tampered(tmp_path, save, make, name, monkeypatch):
    path = tmp_path / "model.pt"
    save(make(), path)
    ran = []
    monkeypatch.setattr(Net, "__setstate__", lambda self, state: ran.append(state), raising=False)
    with pytest.raises(DpdmError) as info:
        load_denoiser(str(path))
    msg = str(info.value)
    assert msg.startswith(f"{str(path)!r} is a whole pickled torch module ({name}, saved with torch.save(model, "
                          "...)); dpdm does not unpickle classes")
    assert "torch.save(model.state_dict(), 'weights.pt')" in msg and "dpdm convert state-dict" in msg
    assert "tampered" not in msg and not ran


def test_a_bare_state_dict_gets_a_short_message(tmp_path):
    path = tmp_path / "weights.pt"
    net = backbone(depth=4)
    torch.save(net.state_dict(), path)
    result = invoke("eval", "fid", "--checkpoint", path, "--ref", tmp_path / "ref.npz")
    assert result.exit_code == 1, result.output
    line = result.output.strip()
    n = len(net.state_dict())
    assert line.startswith(f"error: {str(path)!r} is a bare state dict ({n} tensors: ") and "\n" not in line
    assert "without a network spec" in line and "dpdm convert state-dict" in line
    assert len(line) - len(str(path)) < 400  # not the list of its keys
    assert sum(key in line for key in net.state_dict()) == 3


def test_a_protocol_0_pickle_is_read_as_a_pickle(tmp_path):
    path = tmp_path / "old.pkl"
    path.write_bytes(pickle.dumps(backbone().state_dict(), protocol=0))
    with pytest.raises(DpdmError, match=r"is a bare state dict \(.* tensors: "):
        load_denoiser(str(path))
    path.write_bytes(pickle.dumps({"weights": [1, 2]}, protocol=0))
    with pytest.raises(DpdmError) as info:
        load_denoiser(str(path))
    assert str(info.value).startswith(f"{str(path)!r} holds the keys ['weights'], not an EDM network")
    assert "safetensors" not in str(info.value)


@pytest.mark.parametrize("whose", ["backbone", "denoiser"])
def test_convert_state_dict_round_trip(tmp_path, whose):
    """A registered backbone's (or a whole denoiser's) state dict -> dpdm checkpoint -> identical outputs."""
    original = EDMPrecond(backbone(), label_dim=0, sigma_data=0.5)
    src, dst = tmp_path / "weights.pt", tmp_path / "net.safetensors"
    torch.save((original.model if whose == "backbone" else original).state_dict(), src)
    result = invoke("convert", "state-dict", src, dst, "--backbone", json.dumps(BACKBONE), "--shape", "2",
                    "--precond", "{name: edm, sigma_data: 0.5}")
    assert result.exit_code == 0, result.output
    assert f"wrote {dst}" in result.output
    loaded, spec = load_checkpoint(str(dst))
    assert spec == network_spec(BACKBONE, {"name": "edm", "sigma_data": 0.5}, [2], 0)
    assert torch.equal(outputs(loaded), outputs(original.eval()))
    assert read_checkpoint(str(dst))[2] == {"source": str(src)}


def test_convert_state_dict_reports_what_does_not_fit(tmp_path):
    src, dst = tmp_path / "weights.pt", tmp_path / "net.safetensors"
    torch.save(backbone(depth=4).state_dict(), src)
    result = invoke("convert", "state-dict", src, dst, "--backbone", json.dumps(BACKBONE), "--shape", "2")
    assert result.exit_code == 1 and not dst.exists()
    line = result.output.strip()
    assert line.startswith(f"error: checkpoint {str(src)!r} does not fit the backbone mlp ")
    assert "missing [], unexpected ['model.blocks.2." in line and "\n" not in line
    torch.save(backbone(hidden=8).state_dict(), src)  # same keys, other shapes
    result = invoke("convert", "state-dict", src, dst, "--backbone", json.dumps(BACKBONE), "--shape", "2")
    assert result.exit_code == 1 and not dst.exists()
    assert "size mismatch for model." in result.output and "in all)" in result.output
    for args, message in [
        (["--backbone", "{name: mlpp}", "--shape", "2"], "error: --backbone.name: unknown backbone 'mlpp'."),
        (["--backbone", "{name: mlp, hiden: 3}", "--shape", "2"], "error: --backbone.hiden: unknown option"),
        (["--backbone", "mlp", "--shape", "3x32"], "error: --shape: expected positive integers"),
    ]:
        result = invoke("convert", "state-dict", src, dst, *args)
        assert result.exit_code == 1 and result.output.startswith(message), result.output
    assert not dst.exists()


def test_a_recipe_loads_a_bare_state_dict_into_its_model(tmp_path, monkeypatch):
    """``teacher.checkpoint`` naming a bare state dict: the recipe's ``model`` is the network it fits."""
    monkeypatch.chdir(tmp_path)
    opts = {"hidden": 32, "depth": 1, "emb_dim": 16}
    net = backbone(**opts)
    torch.save(net.state_dict(), tmp_path / "teacher.pt")
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "toy2d.yaml"
    overrides = ["train.steps=1", "train.fake_updates=1", "eval.num_samples=50", "eval.recovery_num=50",
                 "eval.teacher_nfe=[1]", "eval.student_steps=[1]", "eval.one_step_sigma_max=[80.0]",
                 *[f"model.backbone.{k}={v}" for k, v in opts.items()], f"teacher.checkpoint={tmp_path / 'teacher.pt'}"]
    result = invoke("run", recipe, *[a for o in overrides for a in ("--set", o)], "--out", "run")
    assert result.exit_code == 0, result.output
    state, spec, _ = read_checkpoint(str(tmp_path / "run" / "checkpoints" / "teacher.safetensors"))
    assert spec["backbone"] == {"name": "mlp", **opts} and spec["shape"] == [2]
    assert all(torch.equal(state[f"model.{k}"], v) for k, v in net.state_dict().items())
