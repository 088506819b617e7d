"""Checkpoints are data, not code (STYLE habit 10): weights as safetensors, with the resolved
network config (backbone and preconditioning names and options, data shape, label_dim) in the
file's metadata, so ``load_denoiser`` rebuilds the model with no pickle at all.

Files go through fsspec (local paths, ``memory://``, ``s3://``, ...; http(s) URLs are downloaded
once into the cache, see ``cache.py``) and are written atomically: on filesystems the bytes go to
a temporary name that is renamed into place only once complete, on object stores (S3, GCS, Azure)
they are one upload, which the store publishes only once complete; so a crash never leaves a file
that looks like a finished checkpoint. Storage that cannot be reached, a missing bucket or key,
and refused permissions are one ``DpdmError`` naming the URL (credentials and custom endpoints
come from the environment, see ``storage.py``).

``load_checkpoint``/``load_denoiser`` also take official NVlabs/edm snapshots (``.pkl``; the
content decides, not the name): they are imported without running their code
(``edm_pickle.py``) and the conversion is cached as a dpdm checkpoint, so a recipe that names a
``.pkl`` imports it once. ``convert_edm_pickle`` writes such a conversion where you want it.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from . import storage
from .cache import import_cache_path, local_copy
from .torch_files import PICKLE, TORCH_ZIP, BareStateDict, file_format
from ..errors import DpdmError, UnknownComponentError
from ..plugins.registry import get

FORMAT = "dpdm-denoiser/1"
IMPORTER = "edm-pkl/1"  # version of the EDM snapshot conversion: part of the import cache key


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


class StorageError(DpdmError, OSError):
    """A checkpoint that cannot be written (a missing bucket, permissions, unreachable storage): one message
    naming the URL; an ``OSError`` too, so callers that tolerate I/O failures (the import cache) still do."""


def save_denoiser(url: str, model: nn.Module | dict[str, torch.Tensor], spec: dict,
                  extra: dict[str, Any] | None = None) -> None:
    """Save weights (a model, or its state dict) and the network spec (plus JSON-able ``extra`` info) to one
    safetensors file."""
    state = model if isinstance(model, dict) else model.state_dict()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    meta = {"format": FORMAT, "network": json.dumps(spec), "extra": json.dumps(extra or {})}
    data = st_save(tensors, metadata=meta)
    try:
        storage.write_atomic(url, data)  # complete or not at all (see the module docstring)
    except storage.errors() as exc:  # FileNotFoundError (no bucket), PermissionError, connection errors, ...
        raise StorageError(f"cannot write checkpoint {url!r}: {storage.first_line(exc)}{storage.hint(url)}") from None
    except (ValueError, ImportError) as exc:  # an unknown protocol, a backend that is not installed
        raise StorageError(f"cannot write checkpoint {url!r}: {storage.first_line(exc)}") from None


def _open(local: str, name: str):
    """The binary file at ``local``, with clear errors naming ``name`` (the user's URL)."""
    try:
        return fsspec.open(local, "rb").open()
    except FileNotFoundError:
        raise DpdmError(f"checkpoint {name!r} not found{_why_missing(local)}") from None
    except Exception as exc:  # unreachable storage, permissions, a directory, ...
        raise DpdmError(f"cannot read checkpoint {name!r}: {storage.first_line(exc)}{storage.hint(name)}") from None


def _why_missing(local: str) -> str:
    """``": the bucket ... does not exist; what to check"`` for a checkpoint URL in a missing bucket, else ``""``."""
    try:
        fs, path = fsspec.core.url_to_fs(local)
        bucket = storage.missing_bucket(fs, path)
    except Exception:  # the storage went away between the two requests: "not found" is still true
        return storage.hint(local)
    if bucket is None:
        return storage.hint(local)
    return f": the bucket {bucket!r} does not exist (or these credentials cannot see it){storage.hint(local)}"


def _read(f, name: str, size: int = -1) -> bytes:
    try:
        return f.read(size)
    except Exception as exc:
        raise DpdmError(f"cannot read checkpoint {name!r}: {storage.first_line(exc)}{storage.hint(name)}") from None


def read_checkpoint(url: str) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """``(state_dict, network_spec, extra)`` of a dpdm checkpoint, with clear errors."""
    with _open(local_copy(url), url) as f:
        return _parse(_read(f, url), url)


def _parse(data: bytes, url: str) -> tuple[dict[str, torch.Tensor], dict, dict]:
    try:
        state = st_load(data)
        meta = safetensors_metadata(data)
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


def safetensors_metadata(data: bytes) -> dict:
    """The ``__metadata__`` of a safetensors file (``{}`` if it has none) from its first bytes: the header's
    length (8 bytes, little-endian), then the JSON header. Raises ``ValueError`` if the header is not JSON."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    return header.get("__metadata__", {}) or {}


def _instantiate(state: dict, spec: dict, url: str, fit: str = "its own network spec") -> nn.Module:
    """The network of ``spec`` with the weights ``state`` (all of them, exactly)."""
    return _load_into(_build(spec, url), state, url, fit)


def _build(spec: dict, url: str) -> nn.Module:
    try:
        return build_denoiser(spec)
    except UnknownComponentError as exc:
        raise DpdmError(f"checkpoint {url!r}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise DpdmError(f"checkpoint {url!r}: cannot build its network {spec['backbone']} ({exc})") from None


def _load_into(model: nn.Module, state: dict, url: str, fit: str) -> nn.Module:
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches: torch lists each on a line of its own
        lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()] or [str(exc)]
        raise DpdmError(f"checkpoint {url!r} does not fit {fit}: {_few(lines)}") from None
    if missing or unexpected:
        raise DpdmError(f"checkpoint {url!r} does not fit {fit}: missing {_few(missing)}, unexpected {_few(unexpected)}")
    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:  # a model that diverged in training: it would only ever give NaN samples
        raise DpdmError(f"checkpoint {url!r} holds non-finite weights (NaN/Inf in {len(bad)} of {len(state)} tensors, "
                        f"e.g. {bad[0]}): the model diverged in training; use an earlier checkpoint, or train again "
                        "with a lower learning rate")
    return model


def _few(items: list[str]) -> str:
    """At most five of ``items``, with their count when there are more."""
    return f"{items[:5]}" + (f" ({len(items)} in all)" if len(items) > 5 else "")


def state_dict_model(state: dict, spec: dict, url: str) -> nn.Module:
    """The network of ``spec`` with the weights of a bare state dict: the denoiser's own (``model.``-prefixed keys)
    or those of its backbone alone (a backbone's ``state_dict()``; the preconditioning keeps it as ``model``)."""
    model = _build(spec, url)
    own = set(model.state_dict())
    if len(set(state) & own) < len({f"model.{k}" for k in state} & own):
        state = {f"model.{k}": v for k, v in state.items()}
    options = {k: v for k, v in spec["backbone"].items() if k != "name"}
    fit = f"the backbone {spec['backbone']['name']} {json.dumps(options)} for shape {list(spec['shape'])}"
    return _load_into(model, state, url, fit)


def sniff(url: str, local: str | None = None) -> str:
    """``"edm"`` for pickles (any protocol) and torch zip files, else ``"safetensors"`` (``torch_files.file_format``
    tells them apart by their first bytes). Anything else is left to the safetensors reader, which explains what is
    wrong with it."""
    with _open(local or local_copy(url), url) as f:
        head = _read(f, url, 256)
    return "edm" if file_format(head) in (TORCH_ZIP, PICKLE) else "safetensors"


def import_edm(url: str, local: str | None = None):
    """``(denoiser, network_spec, snapshot, notes)`` for an official EDM snapshot (``edm_pickle.py``).

    The denoiser is the network ``snapshot_spec`` describes with all of the snapshot's weights.
    """
    from .edm_pickle import read_edm_snapshot, snapshot_spec

    with _open(local or local_copy(url), url) as f:
        snapshot = read_edm_snapshot(f, url)
    spec, notes = snapshot_spec(snapshot)
    fit = f"the {spec['backbone']['name']} network built from its config"
    return _instantiate(snapshot.state_dict, spec, url, fit), spec, snapshot, notes


def _edm_extra(url: str, snapshot) -> dict:
    from .edm_pickle import summary

    return {"source": url, "edm": summary(snapshot)}


def _load_edm(url: str, local: str) -> tuple[nn.Module, dict]:
    """An EDM snapshot through the import cache (``cache.import_cache_path``)."""
    cached = import_cache_path(url, local, IMPORTER)
    if cached.is_file():
        try:
            state, spec, _ = read_checkpoint(str(cached))
            return _instantiate(state, spec, url), spec
        except DpdmError:  # an unreadable cache entry, or a backbone that changed: import afresh
            pass
    model, spec, snapshot, _ = import_edm(url, local)
    try:
        save_denoiser(str(cached), model, spec, _edm_extra(url, snapshot))
    except OSError as exc:
        warnings.warn(f"could not cache the conversion of {url!r} in {cached.parent}: {exc}", stacklevel=3)
    return model, spec


def load_checkpoint(url: str, device="cpu", spec: dict | None = None) -> tuple[nn.Module, dict]:
    """``(denoiser, network_spec)`` from a dpdm checkpoint or an official EDM snapshot (imported on
    the fly, cached); the denoiser ``D(x, sigma, class_labels=None)`` is in eval mode. ``spec``: the network a bare
    state dict (``torch.save(model.state_dict())``) is loaded into; without it such a file is an error."""
    local = local_copy(url)
    if sniff(url, local) == "edm":
        try:
            model, spec = _load_edm(url, local)
        except BareStateDict as exc:
            if spec is None:
                raise
            model = state_dict_model(exc.state, spec, url)
    else:
        with _open(local, url) as f:
            state, spec, _ = _parse(_read(f, url), url)
        model = _instantiate(state, spec, url)
    return model.to(device).eval().requires_grad_(False), spec


def checkpoint_role(url: str) -> str:
    """``"student"`` for a dpdm checkpoint whose metadata says ``{"role": "student"}``, else ``"teacher"`` (an
    official EDM snapshot, or a dpdm checkpoint of a teacher, a fake score or no role): which sampler suits it by
    default. Reads the safetensors header only."""
    local = local_copy(url)
    if sniff(url, local) == "edm":
        return "teacher"
    with _open(local, url) as f:
        head = _read(f, url, 8)
        try:
            header = head + _read(f, url, int.from_bytes(head, "little"))
            extra = json.loads(safetensors_metadata(header).get("extra", "{}"))
        except (ValueError, TypeError, OverflowError, MemoryError) as exc:
            raise DpdmError(f"checkpoint {url!r} is not a valid safetensors file ({exc}); "
                            "was it truncated or written by another program?") from None
    return "student" if isinstance(extra, dict) and extra.get("role") == "student" else "teacher"


def load_denoiser(url: str, device="cpu") -> nn.Module:
    """A ready denoiser ``D(x, sigma, class_labels=None)`` in eval mode from a dpdm checkpoint or an
    official EDM snapshot (see ``load_checkpoint``)."""
    return load_checkpoint(url, device)[0]


def convert_edm_pickle(src: str, dst: str):
    """Import the official EDM snapshot ``src`` and save it as the dpdm checkpoint ``dst``.

    Returns ``(network_spec, snapshot, notes)``; ``dst``'s extra info records the source.
    """
    local = local_copy(src)
    if sniff(src, local) != "edm":
        raise DpdmError(f"{src!r} is not an EDM snapshot pickle (network-snapshot-*.pkl); if it is a dpdm "
                        "checkpoint already, there is nothing to convert")
    model, spec, snapshot, notes = import_edm(src, local)
    save_denoiser(dst, model, spec, _edm_extra(src, snapshot))
    return spec, snapshot, notes


def convert_state_dict(src: str, dst: str, spec: dict) -> nn.Module:
    """Load the bare state dict ``src`` (``torch.save(model.state_dict(), ...)``, read without running code) into
    the network of ``spec`` and save it as the dpdm checkpoint ``dst``; returns the network."""
    local = local_copy(src)
    if sniff(src, local) != "edm":
        raise DpdmError(f"{src!r} is not a torch.save file or pickle; if it is a dpdm checkpoint already, there is "
                        "nothing to convert")
    try:
        import_edm(src, local)
    except BareStateDict as exc:
        model = state_dict_model(exc.state, spec, src)
    else:
        raise DpdmError(f"{src!r} is an official EDM snapshot, not a bare state dict: convert it with "
                        "`dpdm convert edm-pkl`")
    save_denoiser(dst, model, spec, {"source": src})
    return model
