"""The dpdm plugin of dpdm-nets: registers the ``mlp`` and ``unet-small`` backbones.

Importing this module does not import torch: the factories below import their networks on
first call, so ``dpdm --help`` and registry lookups stay fast. Their signatures are what the
config layer checks user options against, so every option is a typed keyword with a default.
"""

from __future__ import annotations

from dpdm.core import hookimpl


def mlp(shape: tuple, label_dim: int = 0, hidden: int = 256, depth: int = 4, emb_dim: int = 128,
        dropout: float = 0.0, activation: str = "silu"):
    """Residual MLP for vector data of any shape (see ``dpdm.nets.mlp.make_mlp``)."""
    from .mlp import make_mlp

    return make_mlp(shape, label_dim=label_dim, hidden=hidden, depth=depth, emb_dim=emb_dim, dropout=dropout,
                    activation=activation)


def unet_small(shape: tuple, label_dim: int = 0, channels: int = 64, channel_mult: tuple | list = (1, 2),
               num_blocks: int = 2, emb_dim: int = 256, dropout: float = 0.0, attn: bool = False):
    """Small conv UNet for tiny images, 8x8 to 32x32 (see ``dpdm.nets.unet.make_unet_small``)."""
    from .unet import make_unet_small

    return make_unet_small(shape, label_dim=label_dim, channels=channels, channel_mult=channel_mult,
                           num_blocks=num_blocks, emb_dim=emb_dim, dropout=dropout, attn=attn)


@hookimpl
def register_backbones(register):
    register("mlp", mlp)
    register("unet-small", unet_small)
