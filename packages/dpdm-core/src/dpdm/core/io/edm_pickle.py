"""Reading official NVlabs/edm snapshots without running the code they embed.

EDM's ``network-snapshot-*.pkl`` files are plain pickles of ``dict(ema=net, loss_fn=...,
augment_pipe=..., dataset_kwargs=...)`` in which every network class was made "persistent"
(``torch_utils.persistence``): each module pickles as ``_reconstruct_persistent_obj(meta)`` with
``meta = {type, version, module_src, class_name, state}``, and the official loader ``exec``s
``module_src``. Following ``../shared/edm_ref/README.md`` §2, this module never does: a
``pickle.Unpickler`` whose ``find_class`` resolves only the handful of globals such a snapshot
references turns every persistent object into an inert ``PersistentObject`` (class name and
state, the source text is dropped), loads each tensor's nested legacy ``torch.save`` blob with
``torch.load(weights_only=True)``, and refuses every other global with a ``DpdmError``. The
module tree is then walked like ``nn.Module.state_dict()`` (parameters, persistent buffers,
children), and the root's and its ``model``'s ``_init_kwargs`` give the network config.

Training-state dumps (``training-state-*.pt``, ``torch.save(dict(net=..., optimizer_state=...))``
in the zip format) go through ``torch.load`` with the same restricted unpickler as its
``pickle_module``; their protocol 2 also needs ``set`` and latin-1 ``_codecs.encode``.
``snapshot_spec`` maps a snapshot onto our network spec (``checkpoint.network_spec``).
"""

from __future__ import annotations

import io
import math
import pickle
import types
import zipfile
from collections import OrderedDict
from typing import Any

import attrs
import numpy as np
import torch

from ..errors import DpdmError
from .storage import first_line
from .torch_files import BareStateDict, is_state_dict, pickled_module_class, whole_module_error

# Preconditioning and backbone classes we can map, with the names they get in our registry.
PRECONDS = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve"}
MODELS = {"SongUNet": "edm-songunet", "DhariwalUNet": "edm-dhariwal"}
GEOMETRY = ("img_resolution", "in_channels", "out_channels", "label_dim")  # become the spec's shape and label_dim
TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # first object of a legacy (pre-zip) torch.save file


class PersistentObject:
    """Inert stand-in for an object of an EDM persistent class: its class name and pickled state."""

    __slots__ = ("class_name", "state")

    def __init__(self, class_name: str, state):
        self.class_name, self.state = class_name, state

    def __repr__(self) -> str:
        return f"<EDM {self.class_name}>"


class ModuleDictState:
    """Inert stand-in for ``torch.nn.ModuleDict`` (pickled by NEWOBJ + BUILD): BUILD fills ``__dict__``."""

    class_name = "ModuleDict"

    @property
    def state(self) -> dict:
        return self.__dict__


class _EasyDict(dict):
    """Stand-in for ``dnnlib.util.EasyDict``: a dict that also accepts a BUILD of attributes."""


def _reconstruct_persistent_obj(meta):
    """Replacement for ``torch_utils.persistence._reconstruct_persistent_obj``: record, never exec."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise ValueError("a persistent object without a class name")
    return PersistentObject(meta["class_name"], meta.get("state"))


class UnsafeTensorBlob(Exception):
    """A nested tensor blob that ``torch.load(weights_only=True)`` could not read."""


def _load_from_bytes(blob: bytes):
    """Replacement for ``torch.storage._load_from_bytes``: the nested legacy blob, loaded weights-only."""
    if not isinstance(blob, (bytes, bytearray)):
        raise UnsafeTensorBlob(f"a {type(blob).__name__} instead of bytes")
    try:
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UnsafeTensorBlob(first_line(exc)) from None


def _no_hooks(hooks) -> None:
    if hooks:
        raise ValueError("a tensor with backward hooks")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    """``torch._utils._rebuild_tensor_v2``, for real storages and without hooks only."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise ValueError(f"a tensor built from a {type(storage).__name__}, not a storage")
    _no_hooks(backward_hooks)
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, OrderedDict(),
                                           metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    """``torch._utils._rebuild_parameter``, for tensors and without hooks only."""
    if not isinstance(data, torch.Tensor):
        raise ValueError(f"a parameter built from a {type(data).__name__}, not a tensor")
    _no_hooks(backward_hooks)
    return torch.nn.Parameter(data, requires_grad=bool(requires_grad))


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as protocol 2 uses it for bytes: latin-1 text to bytes, nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise ValueError(f"an encode call with {type(text).__name__} and {encoding!r}")
    return text.encode("latin-1")


def _numpy_scalar():
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar
    return scalar


ALLOWED = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.nn.modules.container", "ModuleDict"): ModuleDictState,
    ("collections", "OrderedDict"): OrderedDict,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar(),
    ("numpy.core.multiarray", "scalar"): _numpy_scalar(),
    ("numpy", "dtype"): np.dtype,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    # Training states are torch.save'd at protocol 2, which spells sets (a module's _non_persistent_buffers_set)
    # and bytes (in numpy scalars) as calls.
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
    ("_codecs", "encode"): _latin1_bytes,
}


class RefusedGlobal(DpdmError):
    """A pickle that references a global outside ``ALLOWED``."""


class EDMUnpickler(pickle.Unpickler):
    """Unpickles an EDM snapshot; any global outside ``ALLOWED`` raises a ``DpdmError``."""

    source = "the snapshot"  # the file's name in messages; set per file by ``unpickler_for``

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise RefusedGlobal(f"refusing to load {self.source!r}: it references the global '{module}.{name}', "
                                "which an EDM snapshot never needs; the file is not an official EDM snapshot or has "
                                "been tampered with") from None


def unpickler_for(source: str) -> type[EDMUnpickler]:
    """An ``EDMUnpickler`` subclass whose messages name ``source``."""
    return type("EDMUnpickler", (EDMUnpickler,), {"source": source})


def _torch_pickle_module(source: str):
    """A ``pickle_module`` for ``torch.load`` whose unpickling goes through ``EDMUnpickler``."""
    unpickler = unpickler_for(source)
    return types.SimpleNamespace(__name__=__name__, Unpickler=unpickler,
                                 load=lambda file, **kwargs: unpickler(file, **kwargs).load())


@attrs.frozen
class EDMSnapshot:
    """What an official EDM snapshot holds, as plain data."""

    source: str
    kind: str  # "network snapshot" ('ema') or "training state" ('net')
    precond_class: str
    precond_kwargs: dict  # the root's _init_kwargs
    precond_attrs: dict  # the root's plain attributes (sigma_data, sigma_min, beta_d, ...), what forward uses
    model_class: str
    model_kwargs: dict  # the child 'model''s _init_kwargs
    state_dict: dict  # key -> detached tensor, exactly as the official state_dict()
    num_params: int  # elements in parameters (buffers excluded)
    dataset_kwargs: dict | None
    others: dict  # other top-level keys -> a short description (class name or type)


def plain(value):
    """numpy scalars and arrays as Python numbers and lists; dicts, lists and tuples (as lists) recursively."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _describe(value) -> str:
    if value is None:
        return "None"
    return getattr(value, "class_name", None) or type(value).__name__


def _corrupt(source: str, what: str) -> DpdmError:
    return DpdmError(f"{source!r} is not a valid EDM snapshot: {what}")


def _state_of(obj, where: str, source: str) -> dict:
    state = getattr(obj, "state", None) if isinstance(obj, (PersistentObject, ModuleDictState)) else None
    if not isinstance(state, dict) or not all(isinstance(state.get(k), dict) for k in ("_parameters", "_buffers",
                                                                                         "_modules")):
        raise _corrupt(source, f"{where} is a {_describe(obj)}, not a torch module")
    return state


def _walk(obj, prefix: str, out: dict, source: str) -> int:
    """Add ``obj``'s parameters, persistent buffers and children's to ``out``; returns the parameter count."""
    state = _state_of(obj, repr(prefix.rstrip(".")) if prefix else "the network", source)
    count = 0
    skip = state.get("_non_persistent_buffers_set") or set()
    tensors = [(k, v) for k, v in state["_parameters"].items()]
    tensors += [(k, v) for k, v in state["_buffers"].items() if k not in skip]
    for i, (name, value) in enumerate(tensors):
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise _corrupt(source, f"{prefix + name!r} is a {_describe(value)}, not a tensor")
        out[prefix + name] = value.detach().requires_grad_(False)
        if i < len(state["_parameters"]):
            count += value.numel()
    for name, child in state["_modules"].items():
        if child is not None:
            count += _walk(child, f"{prefix}{name}.", out, source)
    return count


def _read_torch_zip(file, source: str):
    """A training-state dump (``torch.save`` zip format), unpickled through ``EDMUnpickler``."""
    with zipfile.ZipFile(file) as archive:
        names = archive.namelist()
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        raise DpdmError(f"refusing to load {source!r}: it is a TorchScript archive, not an EDM snapshot "
                        "(network-snapshot-*.pkl) or training state (training-state-*.pt)")
    file.seek(0)
    return torch.load(file, map_location="cpu", pickle_module=_torch_pickle_module(source), weights_only=False)


def _unpickle(file, source: str):
    head = file.read(4)
    file.seek(0)
    if head == b"PK\x03\x04":
        return _read_torch_zip(file, source)
    top = unpickler_for(source)(file).load()
    if isinstance(top, int) and top == TORCH_MAGIC:
        raise DpdmError(f"{source!r} is in the legacy torch.save format (PyTorch < 1.6), which is not supported; "
                        "EDM's network snapshots are pickles (network-snapshot-*.pkl) and its training states zip "
                        "files (training-state-*.pt)")
    return top


def read_edm_snapshot(file, source: str) -> EDMSnapshot:
    """Read an EDM snapshot from the binary, seekable ``file``; ``source`` names it in messages."""
    try:
        top = _unpickle(file, source)
    except RefusedGlobal:
        module_class = pickled_module_class(file, {f"{m}.{n}" for m, n in ALLOWED})  # torch.save(model): say so
        if module_class:
            raise whole_module_error(source, module_class) from None
        raise
    except DpdmError:
        raise
    except UnsafeTensorBlob as exc:
        raise DpdmError(f"refusing to load {source!r}: one of its tensors is not plain tensor data ({exc}); the "
                        "file is not an official EDM snapshot or has been tampered with") from None
    except Exception as exc:  # truncated data (EOFError, UnpicklingError), our checks on tensors
        raise DpdmError(f"cannot read {source!r}: the pickle is truncated or corrupt ({first_line(exc)}); "
                        "download it again or check that it is an official EDM snapshot") from None
    if is_state_dict(top):
        raise BareStateDict(source, top)
    if not isinstance(top, dict) or not ({"ema", "net"} & set(top)):
        keys = sorted(map(str, top)) if isinstance(top, dict) else None
        keys = keys[:8] + [f"... {len(keys)} in all"] if keys and len(keys) > 8 else keys
        raise DpdmError(f"{source!r} holds {f'the keys {keys}' if keys is not None else f'a {_describe(top)}'}, not "
                        "an EDM network: only network snapshot pickles (network-snapshot-*.pkl, with 'ema') and "
                        "training states (training-state-*.pt, with 'net') are supported")
    kind, key = ("network snapshot", "ema") if "ema" in top else ("training state", "net")
    root = top[key]
    if not isinstance(root, PersistentObject) or root.class_name not in PRECONDS:
        raise DpdmError(f"{source!r}: its network is a {_describe(root)}; supported preconditionings are "
                        f"{', '.join(PRECONDS)}")
    root_state = _state_of(root, "the network", source)
    model = root_state["_modules"].get("model")
    if not isinstance(model, PersistentObject) or model.class_name not in MODELS:
        raise DpdmError(f"{source!r}: its {root.class_name} wraps a {_describe(model)}; supported networks are "
                        f"{', '.join(MODELS)}")
    model_state = _state_of(model, "'model'", source)
    for obj, state in ((root, root_state), (model, model_state)):
        if not isinstance(state.get("_init_kwargs"), dict):
            raise _corrupt(source, f"its {obj.class_name} has no _init_kwargs")
    state_dict: dict[str, torch.Tensor] = {}
    num_params = _walk(root, "", state_dict, source)
    attrs_ = {k: plain(v) for k, v in root_state.items()
              if not k.startswith("_") and isinstance(plain(v), (bool, int, float, str))}
    dataset_kwargs = top.get("dataset_kwargs")
    return EDMSnapshot(
        source=source, kind=kind, precond_class=root.class_name, precond_kwargs=plain(root_state["_init_kwargs"]),
        precond_attrs=attrs_, model_class=model.class_name, model_kwargs=plain(model_state["_init_kwargs"]),
        state_dict=state_dict, num_params=num_params,
        dataset_kwargs=plain(dict(dataset_kwargs)) if isinstance(dataset_kwargs, dict) else None,
        others={str(k): _describe(v) for k, v in top.items() if k not in (key, "dataset_kwargs")},
    )


def _precond_value(snapshot: EDMSnapshot, name: str, default):
    value = snapshot.precond_attrs.get(name, snapshot.precond_kwargs.get(name, default))
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def snapshot_spec(snapshot: EDMSnapshot) -> tuple[dict, list[str]]:
    """Our network spec for ``snapshot`` (see ``checkpoint.network_spec``) and notes on what was left out.

    EDMPrecond -> ``edm`` (sigma_data, and sigma_min/sigma_max where not the defaults 0 and inf),
    VPPrecond -> ``vp`` (beta_d, beta_min, M, epsilon_t), VEPrecond -> ``ve`` (sigma_min, sigma_max);
    SongUNet -> ``edm-songunet``, DhariwalUNet -> ``edm-dhariwal`` (plus the precond's use_fp16) with
    the model's constructor kwargs, whose geometry becomes ``shape`` and ``label_dim``.
    """
    src, kwargs, notes = snapshot.source, dict(snapshot.model_kwargs), []
    missing = [k for k in ("img_resolution", "in_channels") if not isinstance(kwargs.get(k), int)]
    if missing:
        raise _corrupt(src, f"its {snapshot.model_class}'s _init_kwargs lack {', '.join(missing)}")
    channels, resolution = kwargs["in_channels"], kwargs["img_resolution"]
    if kwargs.get("out_channels", channels) != channels:
        raise DpdmError(f"{src!r}: its {snapshot.model_class} maps {channels} input channels to "
                        f"{kwargs['out_channels']} outputs; only denoisers with as many outputs as inputs are "
                        "supported (iDDPM-style models that also predict variances are not)")
    label_dim = int(kwargs.get("label_dim", 0) or 0)
    backbone = {"name": MODELS[snapshot.model_class], **{k: v for k, v in kwargs.items() if k not in GEOMETRY}}
    use_fp16 = bool(_precond_value(snapshot, "use_fp16", False))
    if snapshot.model_class == "DhariwalUNet":
        backbone["use_fp16"] = use_fp16
    elif use_fp16:
        notes.append(f"use_fp16=True of its {snapshot.precond_class} is dropped: edm-songunet runs in float32")
    name = PRECONDS[snapshot.precond_class]
    if name == "edm":
        precond = {"name": "edm", "sigma_data": _precond_value(snapshot, "sigma_data", 0.5)}
        for key, default in (("sigma_min", 0.0), ("sigma_max", math.inf)):
            value = _precond_value(snapshot, key, default)
            if value != default:
                precond[key] = value
    elif name == "vp":
        precond = {"name": "vp", **{k: _precond_value(snapshot, k, d) for k, d in
                                    (("beta_d", 19.9), ("beta_min", 0.1), ("epsilon_t", 1e-5))}}
        precond["M"] = int(_precond_value(snapshot, "M", 1000))
    else:
        precond = {"name": "ve", **{k: _precond_value(snapshot, k, d) for k, d in
                                    (("sigma_min", 0.02), ("sigma_max", 100.0))}}
    if snapshot.kind == "training state":
        notes.append("a training state holds the raw training network, not its EMA; the EMA network that EDM "
                     "samples with is in network-snapshot-*.pkl")
    spec = {"backbone": backbone, "precond": precond, "shape": [channels, resolution, resolution],
            "label_dim": label_dim}
    return spec, notes


def summary(snapshot: EDMSnapshot) -> dict[str, Any]:
    """JSON-able facts about a snapshot, stored as a converted checkpoint's ``extra["edm"]``."""
    def jsonable(value):
        if isinstance(value, dict):
            return {str(k): jsonable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [jsonable(v) for v in value]
        return value if value is None or isinstance(value, (bool, int, float, str)) else repr(value)

    return jsonable({"kind": snapshot.kind, "precond": snapshot.precond_class, "model": snapshot.model_class,
                     "num_params": snapshot.num_params, "dataset_kwargs": snapshot.dataset_kwargs,
                     "others": snapshot.others})
