"""Official NVlabs/edm snapshots: imported without running their code (``edm_pickle.py``), converted to
dpdm checkpoints, and loaded with one call from a path or an http URL (``checkpoint.load_checkpoint``,
``dpdm convert edm-pkl``, ``teacher.checkpoint`` in a recipe).

The snapshots are written here in the official format (``../shared/edm_ref/README.md`` §2): while
dumping only, a fake ``torch_utils.persistence`` module provides ``_reconstruct_persistent_obj``, and
every module pickles as ``(_reconstruct_persistent_obj, (meta,), None)`` whose ``meta['module_src']``
would write a marker file and exit if it were executed. ``ModuleDict``s and tensors pickle the normal
way (``torch.storage._load_from_bytes`` blobs). The fake module is gone, and ``torch_utils``/``dnnlib``
are made unimportable, before anything is loaded.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import http.server
import io
import json
import os
import pickle
import subprocess
import sys
import threading
import types
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dpdm.cli.main import app
from dpdm.core import DpdmError, load_checkpoint, load_denoiser
from dpdm.core.io import edm_pickle
from dpdm.core.io.checkpoint import build_denoiser, network_spec, read_checkpoint, save_denoiser
from dpdm.core.io.edm_pickle import EDMSnapshot, EDMUnpickler, read_edm_snapshot, snapshot_spec

torch.set_num_threads(1)

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
# The globals the official snapshot references (facts §2), with numpy spelled as this numpy pickles it.
NUMPY_CORE = "numpy._core.multiarray" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core.multiarray"
FACT_GLOBALS = {
    "torch_utils.persistence._reconstruct_persistent_obj", "collections.OrderedDict", "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_tensor_v2", "torch.storage._load_from_bytes", "torch.nn.modules.container.ModuleDict",
    f"{NUMPY_CORE}.scalar", "numpy.dtype",
}
MODULE_INTERNALS = {k for k in torch.nn.Module().__dict__}  # _parameters, _buffers, _modules, hook dicts, training
SONG = {"model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4], "dropout": 0.0}
DHARIWAL = {"model_channels": 64, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": [8], "dropout": 0.0}


# --- writing snapshots in the official format ------------------------------------------------------------------


@contextlib.contextmanager
def official_persistence():
    """``torch_utils.persistence._reconstruct_persistent_obj`` importable (for pickling only), removed after."""
    package, module = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    package.__path__ = []

    def _reconstruct_persistent_obj(meta):  # what the official loader does: run the embedded source
        exec(meta["module_src"], {})

    _reconstruct_persistent_obj.__module__ = module.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package.persistence = module
    saved = {name: sys.modules.pop(name) for name in ("torch_utils", "torch_utils.persistence") if name in sys.modules}
    sys.modules.update({"torch_utils": package, "torch_utils.persistence": module})
    try:
        yield module
    finally:
        del sys.modules["torch_utils"], sys.modules["torch_utils.persistence"]
        sys.modules.update(saved)  # the blocking None of ``no_official_code`` comes back


class Persistent:
    """Pickles like an object of an official persistent class."""

    def __init__(self, class_name: str, state: dict, module_src: str):
        self.class_name, self.state, self.module_src = class_name, state, module_src

    def __reduce__(self):
        meta = {"type": "class", "version": 6, "module_src": self.module_src, "class_name": self.class_name,
                "state": self.state}
        return (sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,), None)


def evil_source(marker: Path) -> str:
    """Stands in for training/networks.py: executing it leaves ``marker`` behind and exits."""
    return (f"import pathlib\npathlib.Path({str(marker)!r}).write_text('module_src was executed')\n"
            "raise SystemExit('module_src was executed')\n")


def official(module: torch.nn.Module, src: str, class_name: str | None = None, init_kwargs: dict | None = None,
             attrs: dict | None = None):
    """``module`` as the official pickle holds it: persistent objects with ``__dict__`` states (plain attributes,
    numpy ``skip_scale`` as in EDM, ``_init_kwargs``), ``ModuleDict``s as real ``ModuleDict``s."""
    children = {name: None if child is None else official(child, src) for name, child in module._modules.items()}
    if isinstance(module, torch.nn.ModuleDict):
        md = torch.nn.ModuleDict()
        md.__dict__["_modules"] = children
        return md
    state = {k: v for k, v in module.__dict__.items()
             if k in MODULE_INTERNALS or (not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None))))}
    if isinstance(state.get("skip_scale"), float):
        state["skip_scale"] = np.float64(state["skip_scale"])
    state.update(attrs or {}, _modules=children, _init_args=(), _init_kwargs=copy.deepcopy(init_kwargs or {}))
    return Persistent(class_name or type(module).__name__, state, src)


def snapshot_kwargs(spec: dict, precond_class: str, model_class: str) -> tuple[dict, dict, dict]:
    """``(root _init_kwargs, root attributes, model _init_kwargs)`` as EDM's train.py would make them."""
    c, res = spec["shape"][0], spec["shape"][1]
    options = {k: v for k, v in spec["backbone"].items() if k not in ("name", "use_fp16", "fp16_dtype")}
    use_fp16 = bool(spec["backbone"].get("use_fp16", False))
    model = {"img_resolution": res, "in_channels": c, "out_channels": c, "label_dim": spec["label_dim"], **options}
    model["model_channels"] = np.int64(model["model_channels"])  # numpy values must come back as Python numbers
    model["dropout"] = np.float64(model["dropout"])
    root = {"img_resolution": res, "img_channels": c, "label_dim": spec["label_dim"], "use_fp16": use_fp16,
            "model_type": model_class, **options}
    return root, {"img_resolution": res, "img_channels": c, "use_fp16": use_fp16}, model


def write_snapshot(path: Path, denoiser: torch.nn.Module, spec: dict, precond_class: str, model_class: str,
                   marker: Path, extra: dict | None = None, training_state: bool = False, **save_kwargs) -> Path:
    """Dump ``denoiser`` as an official ``network-snapshot-*.pkl`` (or ``training-state-*.pt``) at ``path``."""
    root_kwargs, root_attrs, model_kwargs = snapshot_kwargs(spec, precond_class, model_class)
    src = evil_source(marker)
    with official_persistence():
        root = official(denoiser, src, precond_class, root_kwargs, root_attrs)
        root.state["_modules"]["model"] = official(denoiser.model, src, model_class, model_kwargs)
        if training_state:
            torch.save({"net": root, "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-3}]}}, path,
                       **save_kwargs)
            return path
        top = {"ema": root, "loss_fn": Persistent("EDMLoss", {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5}, src),
               "augment_pipe": None,
               "dataset_kwargs": {"class_name": "training.dataset.ImageFolderDataset", "path": "datasets/x.zip",
                                  "use_labels": bool(spec["label_dim"]), "xflip": False, "cache": True,
                                  "resolution": np.int64(spec["shape"][1]), "max_size": 1797}}
        top.update(extra or {})
        path.write_bytes(pickle.dumps(top, protocol=4))
    return path


def randomized(spec: dict, seed: int = 0) -> torch.nn.Module:
    """Our denoiser for ``spec`` with every parameter random (zero-initialised layers would hide mistakes)."""
    torch.manual_seed(seed)
    model = build_denoiser(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.2)
    return model.eval()


def song_spec(label_dim: int = 0, shape=(1, 8, 8), **options) -> dict:
    return network_spec({"name": "edm-songunet", **SONG, **options}, {"name": "edm", "sigma_data": 0.5}, shape,
                        label_dim)


def probe(model, shape, label_dim: int = 0):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, *shape, generator=g)
    sigma = torch.exp(torch.randn(6, generator=g) * 1.5)
    labels = torch.randint(label_dim, (6,), generator=g) if label_dim else None
    with torch.no_grad():
        return model(x, sigma, class_labels=labels)


def same_weights(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def no_official_code(monkeypatch, tmp_path):
    """Nothing of NVlabs' code is importable, and the cache is private to the test."""
    assert "torch_utils" not in sys.modules
    monkeypatch.setitem(sys.modules, "torch_utils", None)  # any import of it raises ImportError
    monkeypatch.setitem(sys.modules, "dnnlib", None)
    monkeypatch.setenv("DPDM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "module_src-ran"


@pytest.fixture
def song_pkl(tmp_path, no_official_code):
    """An EDMPrecond/SongUNet snapshot of a small random network on 1x8x8 data, with that network."""
    spec = song_spec()
    model = randomized(spec)
    path = write_snapshot(tmp_path / "network-snapshot-000100.pkl", model, spec, "EDMPrecond", "SongUNet",
                          no_official_code)
    return {"path": path, "model": model, "spec": spec, "marker": no_official_code}


def read(path: Path) -> EDMSnapshot:
    with open(path, "rb") as f:
        return read_edm_snapshot(f, str(path))


# --- the importer on records: a hand-made module tree ------------------------------------------------------------


class Tiny(torch.nn.Module):
    """A module tree with what the walk must get right: a bias-free conv (a None parameter), a non-persistent
    buffer, a None child, a ModuleDict, nesting."""

    def __init__(self):
        super().__init__()
        self.map_layer0 = torch.nn.Linear(3, 4)
        self.enc = torch.nn.ModuleDict({"8x8_conv": torch.nn.Conv2d(1, 2, 3, bias=False),
                                        "8x8_block0": torch.nn.Sequential(torch.nn.GroupNorm(1, 2))})
        self.register_buffer("freqs", torch.randn(5))
        self.register_buffer("scratch", torch.ones(2), persistent=False)
        self.map_label = None


class Root(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = Tiny()
        self.sigma_data, self.sigma_min, self.sigma_max = 0.25, 0.0, float("inf")


def test_importer_rebuilds_the_state_dict_from_records(tmp_path, no_official_code):
    torch.manual_seed(0)
    root = Root()
    kwargs = {"img_resolution": 8, "in_channels": 1, "out_channels": 1, "label_dim": 0,
              "model_channels": np.int64(16), "channel_mult": [1, 2], "dropout": np.float64(0.13)}
    spec = {"shape": [1, 8, 8], "label_dim": 0, "backbone": {"name": "x", "model_channels": 16, "channel_mult": [1, 2],
                                                             "dropout": 0.13}}
    path = write_snapshot(tmp_path / "s.pkl", root, dict(spec, backbone=spec["backbone"]), "EDMPrecond", "SongUNet",
                          no_official_code)
    assert sys.modules["torch_utils"] is None and "torch_utils.persistence" not in sys.modules
    snap = read(path)
    assert not no_official_code.exists()  # module_src never ran
    assert same_weights(snap.state_dict, root.state_dict())  # keys, order and values of state_dict()
    assert "model.scratch" not in snap.state_dict and "model.enc.8x8_conv.bias" not in snap.state_dict
    assert all(type(t) is torch.Tensor and not t.requires_grad for t in snap.state_dict.values())
    assert snap.num_params == sum(p.numel() for p in root.parameters())
    assert (snap.kind, snap.precond_class, snap.model_class) == ("network snapshot", "EDMPrecond", "SongUNet")
    assert snap.model_kwargs == {**kwargs, "model_channels": 16, "dropout": 0.13}
    assert type(snap.model_kwargs["model_channels"]) is int and type(snap.model_kwargs["dropout"]) is float
    assert snap.precond_kwargs["model_type"] == "SongUNet" and snap.precond_kwargs["img_channels"] == 1
    assert snap.precond_attrs["sigma_data"] == 0.25 and snap.precond_attrs["sigma_max"] == float("inf")
    assert snap.dataset_kwargs == {"class_name": "training.dataset.ImageFolderDataset", "path": "datasets/x.zip",
                                   "use_labels": False, "xflip": False, "cache": True, "resolution": 8,
                                   "max_size": 1797}
    assert snap.others == {"loss_fn": "EDMLoss", "augment_pipe": "None"}
    assert snapshot_spec(snap)[0]["precond"] == {"name": "edm", "sigma_data": 0.25}


def test_the_written_snapshot_references_exactly_the_official_globals(song_pkl):
    seen = set()

    class Spy(EDMUnpickler):
        def find_class(self, module, name):
            seen.add(f"{module}.{name}")
            return super().find_class(module, name)

    top = Spy(io.BytesIO(song_pkl["path"].read_bytes())).load()
    assert seen == FACT_GLOBALS
    assert isinstance(top["ema"], edm_pickle.PersistentObject) and top["ema"].class_name == "EDMPrecond"
    assert b"module_src was executed" in song_pkl["path"].read_bytes()  # the source is in there, once
    assert song_pkl["path"].read_bytes().count(b"module_src was executed") == 2  # (its two lines, memoised)


def test_training_states(tmp_path, no_official_code):
    """``training-state-*.pt``: torch.save's zip format (protocol 2 inside); the legacy format is refused."""
    torch.manual_seed(0)
    root = Root()
    spec = {"shape": [1, 8, 8], "label_dim": 0, "backbone": {"name": "x", "model_channels": 4, "dropout": 0.0}}
    path = write_snapshot(tmp_path / "training-state.pt", root, spec, "EDMPrecond", "SongUNet", no_official_code,
                          training_state=True)
    assert path.read_bytes()[:4] == b"PK\x03\x04"
    snap = read(path)
    assert snap.kind == "training state" and same_weights(snap.state_dict, root.state_dict())
    assert snap.others == {"optimizer_state": "dict"} and snap.dataset_kwargs is None
    assert snap.model_kwargs["model_channels"] == 4
    assert any("not its EMA" in note for note in snapshot_spec(snap)[1])
    legacy = write_snapshot(tmp_path / "legacy.pt", root, spec, "EDMPrecond", "SongUNet", no_official_code,
                            training_state=True, _use_new_zipfile_serialization=False)
    with pytest.raises(DpdmError, match="is in the legacy torch.save format"):
        read(legacy)
    assert not no_official_code.exists()


# --- mapping onto our network spec ----------------------------------------------------------------------------------


def record(precond="EDMPrecond", model="SongUNet", attrs=None, **model_kwargs) -> EDMSnapshot:
    kwargs = {"img_resolution": 32, "in_channels": 3, "out_channels": 3, "label_dim": 10, "augment_dim": 9,
              "model_channels": 128, "channel_mult": [2, 2, 2], "dropout": 0.13, **model_kwargs}
    return EDMSnapshot(source="x.pkl", kind="network snapshot", precond_class=precond, precond_kwargs={},
                       precond_attrs=attrs or {}, model_class=model, model_kwargs=kwargs, state_dict={},
                       num_params=0, dataset_kwargs=None, others={})


def test_spec_of_edm_vp_ve_songunet_and_dhariwal():
    spec, notes = snapshot_spec(record(attrs={"sigma_data": 0.5, "sigma_min": 0, "sigma_max": float("inf")}))
    assert spec == {"backbone": {"name": "edm-songunet", "augment_dim": 9, "model_channels": 128,
                                 "channel_mult": [2, 2, 2], "dropout": 0.13},
                    "precond": {"name": "edm", "sigma_data": 0.5}, "shape": [3, 32, 32], "label_dim": 10}
    assert notes == []
    spec, _ = snapshot_spec(record(attrs={"sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80}))
    assert spec["precond"] == {"name": "edm", "sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0}
    vp = {"beta_d": 19.9, "beta_min": 0.1, "M": 1000, "epsilon_t": 1e-5, "sigma_min": 2**-10, "sigma_max": 152.2}
    spec, _ = snapshot_spec(record("VPPrecond", attrs=vp))
    assert spec["precond"] == {"name": "vp", "beta_d": 19.9, "beta_min": 0.1, "epsilon_t": 1e-5, "M": 1000}
    spec, _ = snapshot_spec(record("VEPrecond", attrs={"sigma_min": 0.02, "sigma_max": 100}))
    assert spec["precond"] == {"name": "ve", "sigma_min": 0.02, "sigma_max": 100.0}
    spec, notes = snapshot_spec(record(model="DhariwalUNet", attrs={"sigma_data": 0.5, "use_fp16": True},
                                       channel_mult=[1, 2, 3, 4], model_channels=192, img_resolution=64))
    assert spec["backbone"] == {"name": "edm-dhariwal", "augment_dim": 9, "model_channels": 192,
                                "channel_mult": [1, 2, 3, 4], "dropout": 0.13, "use_fp16": True}
    assert spec["shape"] == [3, 64, 64] and notes == []
    _, notes = snapshot_spec(record(attrs={"use_fp16": True}))
    assert notes == ["use_fp16=True of its EDMPrecond is dropped: edm-songunet runs in float32"]


def test_spec_errors():
    with pytest.raises(DpdmError) as info:
        snapshot_spec(record(out_channels=6))
    assert str(info.value).startswith("'x.pkl': its SongUNet maps 3 input channels to 6 outputs; only denoisers")
    with pytest.raises(DpdmError, match="its SongUNet's _init_kwargs lack img_resolution"):
        snapshot_spec(record(img_resolution=None))


@pytest.mark.parametrize("precond, model, message", [
    ("iDDPMPrecond", "DhariwalUNet", "its network is a iDDPMPrecond; supported preconditionings are EDMPrecond, "
                                     "VPPrecond, VEPrecond"),
    ("EDMPrecond", "StyleGAN", "its EDMPrecond wraps a StyleGAN; supported networks are SongUNet, DhariwalUNet"),
])
def test_unsupported_classes(tmp_path, no_official_code, precond, model, message):
    path = write_snapshot(tmp_path / "s.pkl", Root(), {"shape": [1, 8, 8], "label_dim": 0, "backbone": {
        "name": "x", "model_channels": 4, "dropout": 0.0}}, precond, model, no_official_code)
    with pytest.raises(DpdmError) as info:
        load_denoiser(str(path))
    assert str(info.value) == f"{str(path)!r}: {message}"


# --- exact round trips with our EDM backbones -------------------------------------------------------------------


@pytest.mark.parametrize("precond_class", ["EDMPrecond", "VPPrecond", "VEPrecond"])
def test_songunet_round_trip(tmp_path, no_official_code, precond_class):
    name = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve"}[precond_class]
    spec = network_spec({"name": "edm-songunet", **SONG, "embedding_type": "fourier", "channel_mult_noise": 2,
                         "encoder_type": "residual", "resample_filter": [1, 3, 3, 1], "augment_dim": 9},
                        {"name": name}, (2, 8, 8), 3)
    model = randomized(spec)
    path = write_snapshot(tmp_path / "s.pkl", model, spec, precond_class, "SongUNet", no_official_code)
    loaded, got = load_checkpoint(str(path))
    assert got["backbone"] == spec["backbone"] and got["shape"] == [2, 8, 8] and got["label_dim"] == 3
    assert got["precond"]["name"] == name
    assert same_weights(loaded.state_dict(), model.state_dict())
    assert "model.map_noise.freqs" in loaded.state_dict()  # the random Fourier buffer comes from the file
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(probe(loaded, (2, 8, 8), 3), probe(model, (2, 8, 8), 3))
    assert not no_official_code.exists()


def test_dhariwal_round_trip(tmp_path, no_official_code):
    spec = network_spec({"name": "edm-dhariwal", **DHARIWAL, "use_fp16": False}, {"name": "edm", "sigma_data": 0.5},
                        (3, 8, 8), 4)
    model = randomized(spec)
    path = write_snapshot(tmp_path / "s.pkl", model, spec, "EDMPrecond", "DhariwalUNet", no_official_code)
    loaded, got = load_checkpoint(str(path))
    assert got == spec
    assert same_weights(loaded.state_dict(), model.state_dict())
    assert torch.equal(probe(loaded, (3, 8, 8), 4), probe(model, (3, 8, 8), 4))


def test_load_denoiser_takes_pickles_and_safetensors(song_pkl, tmp_path):
    pkl = load_denoiser(str(song_pkl["path"]))
    assert torch.equal(probe(pkl, (1, 8, 8)), probe(song_pkl["model"], (1, 8, 8)))
    ours = tmp_path / "ours.safetensors"
    save_denoiser(str(ours), song_pkl["model"], song_pkl["spec"])
    assert torch.equal(probe(load_denoiser(str(ours)), (1, 8, 8)), probe(pkl, (1, 8, 8)))
    renamed = tmp_path / "named-like-a.safetensors"  # the content decides, not the name
    renamed.write_bytes(song_pkl["path"].read_bytes())
    assert same_weights(load_denoiser(str(renamed)).state_dict(), pkl.state_dict())
    memfs = fsspec.filesystem("memory")  # any fsspec URL
    memfs.pipe("/test-edm-import/edm.pkl", song_pkl["path"].read_bytes())
    try:
        assert same_weights(load_denoiser("memory://test-edm-import/edm.pkl").state_dict(), pkl.state_dict())
    finally:
        memfs.rm("/test-edm-import", recursive=True)


def test_imports_are_cached(song_pkl, monkeypatch):
    path, url = song_pkl["path"], str(song_pkl["path"])
    first, spec = load_checkpoint(url)
    cached = list((Path(os.environ["DPDM_CACHE"]) / "edm-import").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".safetensors"
    _, cached_spec, extra = read_checkpoint(str(cached[0]))
    assert cached_spec == spec and extra["source"] == url and extra["edm"]["model"] == "SongUNet"

    def no_import(*args, **kwargs):
        raise AssertionError("imported again")

    monkeypatch.setattr(edm_pickle, "read_edm_snapshot", no_import)
    again, spec_again = load_checkpoint(url)  # from the cache
    assert spec_again == spec and same_weights(again.state_dict(), first.state_dict())
    os.utime(path, (1, 1))  # a changed file is imported anew
    with pytest.raises(AssertionError, match="imported again"):
        load_checkpoint(url)


# --- refusing what an EDM snapshot never holds --------------------------------------------------------------------


class Smuggle:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("payload, name", [
    (lambda m: Smuggle(exec, f"open({str(m)!r}, 'w').write('ran')"), "builtins.exec"),
    (lambda m: Smuggle(subprocess.Popen, ["touch", str(m)]), "subprocess.Popen"),
    (lambda m: Smuggle(os.system, f"touch {m}"), f"{os.system.__module__}.system"),
])
def test_smuggled_globals_are_refused_without_running(song_pkl, tmp_path, payload, name):
    marker = tmp_path / "payload-ran"
    path = write_snapshot(tmp_path / "evil.pkl", song_pkl["model"], song_pkl["spec"], "EDMPrecond", "SongUNet",
                          song_pkl["marker"], extra={"dataset_kwargs": {"path": payload(marker)}})
    with pytest.raises(DpdmError) as info:
        load_denoiser(str(path))
    assert str(info.value) == (f"refusing to load {str(path)!r}: it references the global '{name}', which an EDM "
                               "snapshot never needs; the file is not an official EDM snapshot or has been "
                               "tampered with")
    assert not marker.exists() and not song_pkl["marker"].exists()
    assert not (Path(os.environ["DPDM_CACHE"]) / "edm-import").exists()


def test_os_system_by_name_is_refused(tmp_path, no_official_code):
    marker = tmp_path / "payload-ran"
    command = f"touch {marker}".encode()
    path = tmp_path / "evil.pkl"  # GLOBAL 'os system', BINUNICODE command, TUPLE1, REDUCE, STOP
    path.write_bytes(b"\x80\x02cos\nsystem\nX" + len(command).to_bytes(4, "little") + command + b"\x85R.")
    with pytest.raises(DpdmError, match=r"^refusing to load '.*evil.pkl': it references the global 'os.system', "):
        load_denoiser(str(path))
    assert not marker.exists()


def test_a_real_torch_tensor_blob_cannot_smuggle_either(tmp_path, no_official_code):
    """The nested tensor blobs are loaded weights-only: a blob with a payload is an error, not a run."""
    marker = tmp_path / "payload-ran"
    blob = pickle.dumps(Smuggle(exec, f"open({str(marker)!r}, 'w').write('ran')"), protocol=2)
    data = pickle.dumps({"ema": Smuggle(torch.storage._load_from_bytes, blob)}, protocol=4)
    path = tmp_path / "evil.pkl"
    path.write_bytes(data)
    with pytest.raises(DpdmError) as info:
        load_denoiser(str(path))
    assert str(info.value).startswith(f"refusing to load {str(path)!r}: one of its tensors is not plain tensor data "
                                      "(Weights only load failed")
    assert str(info.value).endswith("); the file is not an official EDM snapshot or has been tampered with")
    assert not marker.exists()


def test_truncated_and_odd_pickles(song_pkl, tmp_path):
    data = song_pkl["path"].read_bytes()
    path = tmp_path / "cut.pkl"
    for cut in (len(data) - 1, len(data) // 2, 100, 11):
        path.write_bytes(data[:cut])
        with pytest.raises(DpdmError) as info:
            load_denoiser(str(path))
        msg = str(info.value)
        assert msg.startswith(f"cannot read {str(path)!r}: the pickle is truncated or corrupt ("), (cut, msg)
        assert msg.endswith("); download it again or check that it is an official EDM snapshot")
    path.write_bytes(pickle.dumps({"weights": [1, 2]}, protocol=4))
    with pytest.raises(DpdmError) as info:
        load_denoiser(str(path))
    assert str(info.value) == (f"{str(path)!r} holds the keys ['weights'], not an EDM network: only network snapshot "
                               "pickles (network-snapshot-*.pkl, with 'ema') and training states "
                               "(training-state-*.pt, with 'net') are supported")
    path.write_bytes(pickle.dumps([1.0], protocol=4))
    with pytest.raises(DpdmError, match="holds a list, not an EDM network"):
        load_denoiser(str(path))


def test_a_network_that_does_not_fit_our_backbone(song_pkl, tmp_path):
    other = song_spec(attn_resolutions=[])  # the file claims no attention but holds attention weights at 4x4
    path = write_snapshot(tmp_path / "s.pkl", song_pkl["model"], other, "EDMPrecond", "SongUNet", song_pkl["marker"])
    with pytest.raises(DpdmError) as info:
        load_denoiser(str(path))
    assert str(info.value).startswith(f"checkpoint {str(path)!r} does not fit the edm-songunet network built from "
                                      "its config: missing [], unexpected ['model.")
    assert ".qkv." in str(info.value) or ".norm2." in str(info.value)


# --- dpdm convert edm-pkl --------------------------------------------------------------------------------------------


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "1000"})


def test_cli_convert(song_pkl, tmp_path):
    dst = tmp_path / "out" / "teacher.safetensors"
    r = invoke("convert", "edm-pkl", song_pkl["path"], dst)
    assert r.exit_code == 0, (r.output, r.exception)
    n = sum(p.numel() for p in song_pkl["model"].parameters())
    assert f"{song_pkl['path']}: network snapshot, EDMPrecond wrapping SongUNet" in r.stdout
    assert f"{n:,} parameters" in r.stdout and "edm-songunet" in r.stdout and "shape [1, 8, 8]" in r.stdout
    assert r.stdout.rstrip().endswith(f"wrote {dst}")
    assert sorted(p.name for p in dst.parent.iterdir()) == ["teacher.safetensors"]  # atomic: no temporary left
    a, b = load_denoiser(str(dst)), load_denoiser(str(song_pkl["path"]))
    assert same_weights(a.state_dict(), b.state_dict())
    assert torch.equal(probe(a, (1, 8, 8)), probe(b, (1, 8, 8)))
    _, spec, extra = read_checkpoint(str(dst))
    assert spec == song_pkl["spec"] and extra["source"] == str(song_pkl["path"])
    assert extra["edm"]["num_params"] == n and extra["edm"]["dataset_kwargs"]["resolution"] == 8


def test_cli_convert_errors(song_pkl, tmp_path):
    for src, message in [(tmp_path / "missing.pkl", f"checkpoint {str(tmp_path / 'missing.pkl')!r} not found"),
                         (tmp_path / "ours.safetensors", "is not an EDM snapshot pickle (network-snapshot-*.pkl)")]:
        if src.suffix == ".safetensors":
            save_denoiser(str(src), song_pkl["model"], song_pkl["spec"])
        r = invoke("convert", "edm-pkl", src, tmp_path / "dst.safetensors")
        assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
        assert r.stderr.startswith("error: ") and message in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "dst.safetensors").exists()
    assert "edm-pkl" in invoke("convert", "--help").stdout


# --- http URLs -----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def serve(directory: Path):
    """A local http server in a background thread; yields ``(base_url, requested_paths)``."""
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_http_urls_are_downloaded_once(song_pkl, tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    (www / "edm.pkl").write_bytes(song_pkl["path"].read_bytes())
    save_denoiser(str(www / "ours.safetensors"), song_pkl["model"], song_pkl["spec"])
    with serve(www) as (base, requests):
        first, spec = load_checkpoint(f"{base}/edm.pkl")
        second, _ = load_checkpoint(f"{base}/edm.pkl")
        assert requests == ["/edm.pkl"]  # the second load used the cache
        assert spec == song_pkl["spec"] and same_weights(first.state_dict(), second.state_dict())
        assert torch.equal(probe(first, (1, 8, 8)), probe(song_pkl["model"], (1, 8, 8)))
        ours = load_denoiser(f"{base}/ours.safetensors")
        assert same_weights(ours.state_dict(), first.state_dict())
        assert read_checkpoint(f"{base}/ours.safetensors")[1] == spec
        assert requests == ["/edm.pkl", "/ours.safetensors"]
        with pytest.raises(DpdmError) as info:
            load_denoiser(f"{base}/missing.pkl")
        assert str(info.value) == f"cannot download '{base}/missing.pkl': HTTP 404 File not found; check the URL"
    downloads = sorted(p.name.split("-", 1)[1] for p in (Path(os.environ["DPDM_CACHE"]) / "downloads").iterdir())
    assert downloads == ["edm.pkl", "ours.safetensors"]


# --- a recipe whose teacher is an official snapshot -----------------------------------------------------------------

TINY_RUN = ["train.steps=2", "train.batch_size=8", "train.fake_updates=1", "eval.num_samples=32",
            "eval.recovery_num=16", "eval.teacher_nfe=[1,2]", "eval.student_steps=[1]", "eval.figure_samples=16",
            "eval.one_step_sigma_max=[80.0]", "eval.recovery_sigmas=[1.0]", "eval.teacher_samplers=[euler]"]


def test_recipe_with_a_pkl_teacher(song_pkl, tmp_path):
    sets = [a for o in TINY_RUN + [f"teacher.checkpoint={song_pkl['path']}"] for a in ("--set", o)]
    r = invoke("run", RECIPES / "digits.yaml", *sets, "--out", tmp_path / "run")
    assert r.exit_code == 0, (r.output, r.exception)
    state, spec, extra = read_checkpoint(str(tmp_path / "run" / "checkpoints" / "teacher.safetensors"))
    assert spec == song_pkl["spec"] and extra == {"role": "teacher"}
    assert same_weights(dict(sorted(state.items())), dict(sorted(song_pkl["model"].state_dict().items())))
    assert read_checkpoint(str(tmp_path / "run" / "checkpoints" / "student.safetensors"))[1] == spec
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert set(report["sweep"]["teacher"]) == {"euler"}
    assert not song_pkl["marker"].exists()


def test_recipe_with_a_teacher_for_other_data(song_pkl, tmp_path):
    spec = song_spec(shape=(3, 8, 8), label_dim=10)
    path = write_snapshot(tmp_path / "rgb.pkl", randomized(spec), spec, "EDMPrecond", "SongUNet", song_pkl["marker"])
    sets = [a for o in TINY_RUN + [f"teacher.checkpoint={path}"] for a in ("--set", o)]
    r = invoke("run", RECIPES / "digits.yaml", *sets, "--out", tmp_path / "run")
    assert r.exit_code == 1, r.output
    assert " ".join(r.stderr.split()).endswith(
        f"error: recipe.teacher.checkpoint: {str(path)!r} is a network for items of shape [3, 8, 8] with label_dim "
        "10, but the recipe's data has shape [1, 8, 8] with label_dim 0; pick the checkpoint that was trained on "
        "this dataset")
