"""dpdm.core: the denoiser contract, registries, schedules, samplers, divergences and algorithms.

Importing this package is cheap (no torch); the rest loads on first use::

    from dpdm.core import get
    x = get("sampler", "heun")(D, x, get("schedule", "karras")(18))
"""

from __future__ import annotations

import importlib

from .errors import ConfigError, DpdmError, DuplicateComponentError, UnknownComponentError
from .plugins.hookspecs import hookimpl
from .plugins.registry import get, names, plugin_manager
from ._moved import install as _install_moved

_install_moved()

_LAZY = {
    "EDMPrecond": "precond",
    "VPPrecond": "precond",
    "VEPrecond": "precond",
    "EDMLoss": "losses",
    "SigmaDist": "sigmas",
    "SmoothedKL": "divergences",
    "IKL": "divergences",
    "DPDM": "train.distill",
    "TeacherTrainer": "train.teacher",
    "TeacherJob": "train.teacher",
    "DistillJob": "train.distill",
    "Trainer": "train.engine",
    "DeviceBatches": "train.engine",
    "Snapshots": "train.snapshots",
    "Precision": "train.precision",
    "init_dist": "train.distributed",
    "EMA": "train.ema",
    "load_denoiser": "io.checkpoint",
    "load_checkpoint": "io.checkpoint",
}

__all__ = [
    "ConfigError", "DpdmError", "DuplicateComponentError", "UnknownComponentError",
    "get", "hookimpl", "names", "plugin_manager", *_LAZY,
]


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
