"""The FID feature detector (Inception-v3, 2048-d pool features), loaded from a path or URL.

Every form is called the same way: ``detector(images)`` with uint8 (N, C, H, W) images, C = 3 or
C = 1 (grayscale, repeated to 3 channels as EDM does), returns float32 (N, 2048) on the device.
The file is recognised by its content, never by its name:

- **TorchScript archive** (a zip with ``code/`` and ``constants.pkl``), e.g. StyleGAN2-ADA's
  ``inception-2015-12-05.pt``: loaded with ``torch.jit.load``, which rebuilds TorchScript types
  only and runs no Python code from the file; called as ``net(images_uint8, return_features=True)``
  (the network resizes and normalises itself), as in StyleGAN2-ADA/EDM.
- **A pickle wrapping a TorchScript archive**: ``torch.jit.load(io.BytesIO(archive_bytes))`` as
  pickle opcodes (the globals ``torch.jit._serialization.load`` and ``_io.BytesIO``, whose bytes
  protocol 2 spells with ``_codecs.encode``). A restricted unpickler maps exactly those globals
  to stand-ins that hand the embedded bytes to ``torch.jit.load`` and refuses every other global
  (``os.system``...) before anything is called. EDM's ``inception-2015-12-05.pkl`` is read by EDM
  with a plain ``pickle.load``; if that file instead pickles NVlabs' ``torch_utils.persistence``
  objects (Python source executed on load), it is refused with a message saying so.
- **pytorch-fid weights** ``pt_inception-2015-12-05-*.pth`` (a ``torch.save``'d state dict):
  read with ``torch.load(weights_only=True)`` into ``inception.FIDInceptionV3``; images become
  [0, 1] floats, and the network resizes to 299×299 and scales to [-1, 1] as pytorch-fid does.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import warnings
import zipfile

import fsspec
import torch

from ..io.cache import local_copy
from ..io.edm_pickle import TORCH_MAGIC, _latin1_bytes
from ..io.storage import first_line
from ..errors import DpdmError
from .inception import FEATURE_DIM, FIDInceptionV3

EDM_DETECTOR_URL = ("https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/"
                    "inception-2015-12-05.pkl")  # NVlabs/edm fid.py
STYLEGAN2_ADA_DETECTOR_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                              "inception-2015-12-05.pt")  # NVlabs/stylegan2-ada-pytorch metrics/frechet_inception_distance.py
PYTORCH_FID_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")  # mseitzer/pytorch-fid src/pytorch_fid/inception.py
WHERE = (f"the official detector files are {EDM_DETECTOR_URL} (EDM), {STYLEGAN2_ADA_DETECTOR_URL} (StyleGAN2-ADA, "
         f"TorchScript) and {PYTORCH_FID_URL} (pytorch-fid weights); give one of these URLs or a downloaded copy")


class FeatureDetector:
    """What every detector shares (the FID Inception here, ``classifier.ClassifierDetector`` for ``fd-<dataset>``):
    a frozen network in eval mode on ``device``, its ``name``, the ``digest`` of its weights (sha256, 12 hex digits),
    ``feature_dim``, and ``key``, what cached statistics are keyed by. Subclasses define ``__call__``: uint8
    (N, C, H, W) images → float32 (N, feature_dim)."""

    def __init__(self, net: torch.nn.Module, *, name: str, digest: str, feature_dim: int, device="cpu"):
        self.device = torch.device(device)
        self.net = net.eval().to(self.device)
        for p in self.net.parameters():  # (ScriptModules have no requires_grad_)
            p.requires_grad_(False)
        self.name, self.digest, self.feature_dim = name, digest, int(feature_dim)

    @property
    def key(self) -> str:
        """The name and the weights' digest: statistics made with other weights are never mixed up."""
        return f"{self.name}-{self.digest}" if self.digest else self.name


class Detector(FeatureDetector):
    """uint8 (N, C, H, W) images → float32 (N, 2048) features. ``kind``: ``torchscript`` or ``pytorch-fid``."""

    def __init__(self, net: torch.nn.Module, *, kind: str, name: str, digest: str = "", device="cpu"):
        super().__init__(net, name=name, digest=digest, feature_dim=FEATURE_DIM, device=device)
        self.kind = kind

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise DpdmError(f"the FID detector takes uint8 (N, 3, H, W) or grayscale (N, 1, H, W) images, "
                            f"got {images.dtype} {tuple(images.shape)}")
        images = images.to(self.device)
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)  # grayscale → RGB, as EDM's calculate_inception_stats
        if self.kind == "torchscript":
            features = self.net(images, return_features=True)
        else:
            features = self.net(images.to(torch.float32) / 255)
        features = features.to(torch.float32).reshape(len(images), -1)  # (N, 2048)
        if features.shape[1] != self.feature_dim:
            raise DpdmError(f"detector {self.name!r} returned {features.shape[1]} features per image, expected "
                            f"{self.feature_dim}; it is not an FID Inception-v3")
        return features

    def __repr__(self) -> str:
        return f"Detector({self.name!r}, kind={self.kind!r})"


def detector_name(url: str) -> str:
    """The file's name without extension, e.g. ``inception-2015-12-05`` (the key of cached statistics)."""
    return os.path.splitext(os.path.basename(url.rstrip("/").split("?")[0]))[0] or "detector"


def load_detector(url: str, device="cpu") -> Detector:
    """The detector in the file at ``url`` (path, fsspec URL or http(s), downloaded once), on ``device``."""
    local = local_copy(url)
    try:
        with fsspec.open(local, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DpdmError(f"no FID detector at {url!r}; {WHERE}") from None
    except OSError as exc:
        raise DpdmError(f"cannot read the FID detector {url!r}: {exc}") from None
    named = dict(name=detector_name(url), digest=hashlib.sha256(data).hexdigest()[:12], device=device)
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = zf.namelist()
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return Detector(_jit_load(data, url), kind="torchscript", **named)
        return Detector(_pytorch_fid(data, url), kind="pytorch-fid", **named)
    if data[:1] == b"\x80":
        if _is_legacy_torch_save(data):
            return Detector(_pytorch_fid(data, url), kind="pytorch-fid", **named)
        return Detector(_unpickle_torchscript(data, url), kind="torchscript", **named)
    raise DpdmError(f"{url!r} is not an FID detector: neither a TorchScript archive, nor a pickle of one, nor "
                    f"pytorch-fid weights; {WHERE}")


def _jit_load(data: bytes, url: str) -> torch.nn.Module:
    try:
        return _torchscript(data)
    except Exception as exc:
        raise DpdmError(f"{url!r}: cannot load its TorchScript archive: {first_line(exc)}") from None


def _is_legacy_torch_save(data: bytes) -> bool:
    """Whether the first pickled object is the magic number of a legacy (pre-zip) ``torch.save`` file."""
    try:
        return _NoGlobals(io.BytesIO(data)).load() == TORCH_MAGIC  # reads the first pickle only
    except Exception:
        return False


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"global {module}.{name}")


def _pytorch_fid(data: bytes, url: str) -> FIDInceptionV3:
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DpdmError(f"{url!r} is not an FID detector: not a TorchScript archive, and not a plain state dict "
                        f"({first_line(exc)}); {WHERE}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DpdmError(f"{url!r} is not pytorch-fid Inception weights (not a state dict of tensors); {WHERE}")
    net = FIDInceptionV3()
    expected = net.state_dict()
    state = dict(state)
    for key in expected:  # files saved without BatchNorm's counters still load
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, expected[key])
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing keys (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})" if unexpected else "",
                 f"wrong shapes for {', '.join(shapes[:3])}" if shapes else ""]
        raise DpdmError(f"{url!r} is not pytorch-fid Inception-v3 weights: {'; '.join(p for p in parts if p)}; {WHERE}")
    net.load_state_dict(state)
    return net


class _ArchiveBuffer:
    """Stand-in for ``io.BytesIO`` in a pickle: holds the bytes its BUILD (``__setstate__``) gives."""

    def __init__(self, initial_bytes: bytes = b""):
        self.data = bytes(initial_bytes) if isinstance(initial_bytes, (bytes, bytearray)) else None

    def __setstate__(self, state):
        value = state[0] if isinstance(state, tuple) and state else state
        self.data = bytes(value) if isinstance(value, (bytes, bytearray)) else None


def _load_embedded_archive(buffer, *args, **kwargs) -> torch.nn.Module:
    """Stand-in for ``torch.jit.load`` in a pickle: TorchScript bytes only, loaded on the CPU."""
    data = buffer.data if isinstance(buffer, _ArchiveBuffer) else None
    if not data or data[:4] != b"PK\x03\x04":
        raise pickle.UnpicklingError("torch.jit.load of something other than an embedded TorchScript archive")
    return _torchscript(data)


def _torchscript(data: bytes) -> torch.nn.Module:
    with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript; the official detectors are TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(io.BytesIO(data), map_location="cpu")


class _TorchScriptUnpickler(pickle.Unpickler):
    ALLOWED = {("torch.jit._serialization", "load"): _load_embedded_archive,
               ("torch.jit", "load"): _load_embedded_archive,
               ("_io", "BytesIO"): _ArchiveBuffer, ("io", "BytesIO"): _ArchiveBuffer,
               ("_codecs", "encode"): _latin1_bytes}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        raise _Refused(module, name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed in a detector pickle")


class _Refused(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.module, self.name = module, name


def _unpickle_torchscript(data: bytes, url: str) -> torch.nn.Module:
    try:
        net = _TorchScriptUnpickler(io.BytesIO(data)).load()
    except _Refused as exc:
        if exc.module.startswith("torch_utils"):
            raise DpdmError(f"{url!r} pickles NVlabs persistent classes ({exc.module}.{exc.name}), whose loading "
                            f"executes Python source stored in the file; dpdm does not run it. Use the TorchScript "
                            f"{STYLEGAN2_ADA_DETECTOR_URL} (the same network) or pytorch-fid's {PYTORCH_FID_URL}") from None
        raise DpdmError(f"{url!r} is not a safe FID detector pickle: it references the global {exc.module}.{exc.name}, "
                        f"and only a TorchScript archive wrapped as torch.jit.load(io.BytesIO(...)) is accepted "
                        f"(nothing was executed); {WHERE}") from None
    except Exception as exc:
        raise DpdmError(f"{url!r} is not an FID detector pickle: {first_line(exc)}; {WHERE}") from None
    if not isinstance(net, torch.jit.ScriptModule):
        raise DpdmError(f"{url!r} unpickles to a {type(net).__name__}, not a TorchScript module; {WHERE}")
    return net

