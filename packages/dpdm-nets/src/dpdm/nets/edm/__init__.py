"""dpdm.nets.edm: our implementation of the official EDM networks (NVlabs/edm ``training/networks.py``).

``SongUNet`` (DDPM++/NCSN++) and ``DhariwalUNet`` (ADM) reproduce the official state_dict keys,
order, shapes and floating-point operations, so official EDM checkpoints load exactly. They are
registered as the backbones ``edm-songunet`` and ``edm-dhariwal``. Importing this package is cheap
(no torch); the modules load on first use.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "SongUNet": "songunet",
    "DhariwalUNet": "dhariwal",
    "UNetBlock": "layers",
    "Conv2d": "layers",
    "Linear": "layers",
    "GroupNorm": "layers",
    "PositionalEmbedding": ".embeddings",  # dpdm.nets.embeddings: the one implementation, shared with dpdm.nets
    "FourierEmbedding": ".embeddings",
    "attention_weights": "layers",
    "weight_init": "layers",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
