"""dpdm.nets: backbone networks for dpdm, registered through the ``dpdm`` entry-point group.

Importing this package is cheap (no torch); the networks load on first use::

    from dpdm.core import get
    net = get("backbone", "mlp")(shape=(2,), label_dim=0, hidden=256)

Backbones follow the contract of ``dpdm.core.plugins.hookspecs``: ``forward(x, noise_labels,
class_labels=None)`` returns a tensor shaped like ``x``.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "MLP": "mlp",
    "make_mlp": "mlp",
    "SmallUNet": "unet",
    "make_unet_small": "unet",
    "PositionalEmbedding": "embeddings",
    "FourierEmbedding": "embeddings",
    "MappingNetwork": "embeddings",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
