"""Checkpoints are data, not code (STYLE habit 10): weights as safetensors, with the resolved
network config (backbone and preconditioning names and options, data shape, label_dim) in the
file's metadata, so ``load_denoiser`` rebuilds the model with no pickle at all.

Files go through fsspec (local paths, ``memory://``, ``s3://``, ...) and are written atomically:
the bytes go to a temporary name that is renamed into place only once complete, so a crash
never leaves a file that looks like a finished checkpoint.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .errors import DpdmError
from .registry import get

FORMAT = "dpdm-denoiser/1"


def network_spec(backbone: dict, precond: dict, shape, label_dim: int) -> dict:
    """The resolved description a checkpoint carries: components as ``{"name": ..., **options}``."""
    return {"backbone": dict(backbone), "precond": dict(precond), "shape": list(shape), "label_dim": int(label_dim)}


def build_denoiser(spec: dict) -> nn.Module:
    """Instantiate backbone and preconditioning from a ``network_spec`` (random weights)."""
    backbone_opts = dict(spec["backbone"])
    precond_opts = dict(spec["precond"])
    make_backbone = get("backbone", backbone_opts.pop("name"))
    make_precond = get("preconditioning", precond_opts.pop("name"))
    backbone = make_backbone(shape=tuple(spec["shape"]), label_dim=spec["label_dim"], **backbone_opts)
    return make_precond(backbone, label_dim=spec["label_dim"], **precond_opts)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` via a temporary sibling and a rename."""
    fs, path = fsspec.core.url_to_fs(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def save_denoiser(url: str, model: nn.Module, spec: dict, extra: dict[str, Any] | None = None) -> None:
    """Save weights and the network spec (plus JSON-able ``extra`` info) to one safetensors file."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "network": json.dumps(spec), "extra": json.dumps(extra or {})}
    write_bytes_atomic(url, st_save(tensors, metadata=meta))


def read_checkpoint(url: str) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """``(state_dict, network_spec, extra)`` of a dpdm checkpoint, with clear errors."""
    try:
        with fsspec.open(url, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DpdmError(f"checkpoint {url!r} not found") from None
    except Exception as exc:  # unreachable storage, permissions, ...
        raise DpdmError(f"cannot read checkpoint {url!r}: {exc}") from None
    try:
        state = st_load(data)
        meta = _metadata(data)
    except Exception as exc:  # safetensors raises its own SafetensorError, or ValueError/JSON errors
        raise DpdmError(f"checkpoint {url!r} is not a valid safetensors file ({exc}); "
                        "was it truncated or written by another program?") from None
    if meta.get("format") != FORMAT:
        raise DpdmError(f"checkpoint {url!r} is not a dpdm denoiser checkpoint (format {meta.get('format')!r}, "
                        f"expected {FORMAT!r})")
    try:
        spec, extra = json.loads(meta["network"]), json.loads(meta.get("extra", "{}"))
        if not all(k in spec for k in ("backbone", "precond", "shape", "label_dim")):
            raise ValueError(f"keys {sorted(spec)}")
    except (KeyError, ValueError, TypeError) as exc:
        raise DpdmError(f"checkpoint {url!r} has a corrupt network spec in its metadata ({exc})") from None
    return state, spec, extra


def _metadata(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    return header.get("__metadata__", {}) or {}


def load_denoiser(url: str, device="cpu") -> nn.Module:
    """A ready denoiser ``D(x, sigma, class_labels=None)`` in eval mode from a dpdm checkpoint."""
    state, spec, _ = read_checkpoint(url)
    try:
        model = build_denoiser(spec)
    except (TypeError, ValueError) as exc:
        raise DpdmError(f"checkpoint {url!r}: cannot build its network {spec['backbone']} ({exc})") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise DpdmError(f"checkpoint {url!r} does not fit its own network spec: {exc}") from None
    if missing or unexpected:
        raise DpdmError(f"checkpoint {url!r} does not fit its own network spec: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
    return model.to(device).eval().requires_grad_(False)
