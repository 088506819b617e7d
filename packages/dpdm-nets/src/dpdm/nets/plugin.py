"""The dpdm plugin of dpdm-nets: registers the ``mlp``, ``unet-small``, ``edm-songunet`` and
``edm-dhariwal`` backbones.

Importing this module does not import torch: the factories below import their networks on
first call, so ``dpdm --help`` and registry lookups stay fast. Their signatures are what the
config layer checks user options against, so every option is a typed keyword with a default.
"""

from __future__ import annotations

from dpdm.core import hookimpl

from .shapes import square_image


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


def edm_songunet(shape: tuple, label_dim: int = 0, augment_dim: int = 0, model_channels: int = 128,
                 channel_mult: list = (1, 2, 2, 2), channel_mult_emb: int = 4, num_blocks: int = 4,
                 attn_resolutions: list = (16,), dropout: float = 0.10, label_dropout: float = 0.0,
                 embedding_type: str = "positional", channel_mult_noise: int = 1, encoder_type: str = "standard",
                 decoder_type: str = "standard", resample_filter: list = (1, 1)):
    """EDM's DDPM++/NCSN++ UNet, loading official checkpoints exactly (see ``dpdm.nets.edm.songunet``)."""
    from .edm.songunet import SongUNet

    channels, resolution = square_image(shape, "EDM UNets")
    return SongUNet(img_resolution=resolution, in_channels=channels, out_channels=channels, label_dim=label_dim,
                    augment_dim=augment_dim, model_channels=model_channels, channel_mult=channel_mult,
                    channel_mult_emb=channel_mult_emb, num_blocks=num_blocks, attn_resolutions=attn_resolutions,
                    dropout=dropout, label_dropout=label_dropout, embedding_type=embedding_type,
                    channel_mult_noise=channel_mult_noise, encoder_type=encoder_type, decoder_type=decoder_type,
                    resample_filter=resample_filter)


def edm_dhariwal(shape: tuple, label_dim: int = 0, augment_dim: int = 0, model_channels: int = 192,
                 channel_mult: list = (1, 2, 3, 4), channel_mult_emb: int = 4, num_blocks: int = 3,
                 attn_resolutions: list = (32, 16, 8), dropout: float = 0.10, label_dropout: float = 0.0,
                 use_fp16: bool = False, fp16_dtype: str = "float16"):
    """EDM's ADM UNet, loading official checkpoints exactly (see ``dpdm.nets.edm.dhariwal``)."""
    from .edm.dhariwal import DhariwalUNet

    channels, resolution = square_image(shape, "EDM UNets")
    return DhariwalUNet(img_resolution=resolution, in_channels=channels, out_channels=channels, label_dim=label_dim,
                        augment_dim=augment_dim, model_channels=model_channels, channel_mult=channel_mult,
                        channel_mult_emb=channel_mult_emb, num_blocks=num_blocks, attn_resolutions=attn_resolutions,
                        dropout=dropout, label_dropout=label_dropout, use_fp16=use_fp16, fp16_dtype=fp16_dtype)


def dit(shape: tuple, label_dim: int = 0, size: str = "S", patch_size: int = 2, hidden: int = 0, depth: int = 0,
        num_heads: int = 0, mlp_ratio: float = 4.0, class_dropout: float = 0.0):
    """Pixel-space Diffusion Transformer, presets S/B/L/XL; 0 takes the preset (see ``dpdm.nets.dit.make_dit``)."""
    from .dit import make_dit

    return make_dit(shape, label_dim=label_dim, size=size, patch_size=patch_size, hidden=hidden, depth=depth,
                    num_heads=num_heads, mlp_ratio=mlp_ratio, class_dropout=class_dropout)


def stylegan2(shape: tuple, label_dim: int = 0, channels: int = 128, channel_max: int = 256, w_dim: int = 256,
              mapping_layers: int = 4, base_resolution: int = 4, noise_mode: str = "const"):
    """StyleGAN2 generator with an x_t encoder, as a few-step student (see ``dpdm.nets.stylegan2``)."""
    from .stylegan2 import StyleGAN2Denoiser

    return StyleGAN2Denoiser(shape, label_dim=label_dim, channels=channels, channel_max=channel_max, w_dim=w_dim,
                             mapping_layers=mapping_layers, base_resolution=base_resolution, noise_mode=noise_mode)


@hookimpl
def register_backbones(register):
    register("mlp", mlp)
    register("dit", dit)
    register("unet-small", unet_small)
    register("edm-songunet", edm_songunet)
    register("edm-dhariwal", edm_dhariwal)
    register("stylegan2", stylegan2)
