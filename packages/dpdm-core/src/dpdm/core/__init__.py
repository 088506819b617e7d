"""dpdm.core: the denoiser contract, registries, schedules, samplers, divergences and algorithms.

Importing this package is cheap (no torch); the rest loads on first use::

    from dpdm.core import get
    x = get("sampler", "heun")(D, x, get("schedule", "karras")(18))
"""

from __future__ import annotations

import importlib

from .errors import ConfigError, DpdmError, DuplicateComponentError, UnknownComponentError
from .hookspecs import hookimpl
from .registry import get, names, plugin_manager

_LAZY = {
    "EDMPrecond": "precond",
    "VPPrecond": "precond",
    "VEPrecond": "precond",
    "EDMLoss": "losses",
    "SigmaDist": "sigmas",
    "SmoothedKL": "divergences",
    "IKL": "divergences",
    "DPDM": "distill",
    "TeacherTrainer": "teacher",
    "TeacherJob": "teacher",
    "DistillJob": "distill",
    "Trainer": "engine",
    "DeviceBatches": "engine",
    "Snapshots": "snapshots",
    "Precision": "precision",
    "init_dist": "distributed",
    "EMA": "ema",
    "load_denoiser": "checkpoint",
    "load_checkpoint": "checkpoint",
}

__all__ = [
    "ConfigError", "DpdmError", "DuplicateComponentError", "UnknownComponentError",
    "get", "hookimpl", "names", "plugin_manager", *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
