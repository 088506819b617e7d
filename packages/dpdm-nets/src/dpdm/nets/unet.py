"""``unet-small``: a small conv UNet for tiny images (8x8 digits up to 32x32).

A trimmed-down DDPM++/ADM UNet: per level ``num_blocks`` residual blocks conditioned on the
noise (and class) embedding by scale/shift, average-pool downsampling between levels, a
symmetric decoder that concatenates the encoder's output of each level, and an output conv
initialised to zero so ``F = 0`` at initialisation. Optional self-attention at the lowest
resolution.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .embeddings import MappingNetwork
from .shapes import at_least

SKIP_SCALE = 1 / math.sqrt(2)  # residual sums are scaled to keep unit variance (as in EDM)


def num_groups(channels: int) -> int:
    """GroupNorm groups: the largest divisor of ``channels`` not above ``min(32, channels // 4)``."""
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return groups


class ResBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv, scale/shift from the embedding, SiLU, dropout, zero-initialised 3x3 conv.

    A 1x1 conv maps the input when the channel count changes; the sum is scaled by 1/√2.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm0 = nn.GroupNorm(num_groups(in_channels), in_channels)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.affine = nn.Linear(emb_dim, 2 * out_channels)
        self.norm1 = nn.GroupNorm(num_groups(out_channels), out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv1.weight)  # the block starts as (a projection of) the identity
        nn.init.zeros_(self.conv1.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))  # (B, C_out, H, W)
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)  # 2 x (B, C_out, 1, 1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(self.dropout(h))
        return (h + self.skip(x)) * SKIP_SCALE  # (B, C_out, H, W)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over pixels (64 channels per head), zero-initialised output, residual 1/√2."""

    def __init__(self, channels: int):
        super().__init__()
        self.num_heads = max(1, channels // 64)  # heads of 64 channels, as in EDM's SongUNet
        self.norm = nn.GroupNorm(num_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)  # (B, 3, nh, d, HW)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # 3 x (B, nh, HW, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, nh, HW, d)
        out = out.transpose(-1, -2).reshape(b, c, h, w)  # (B, C, H, W)
        return (x + self.proj(out)) * SKIP_SCALE


class SmallUNet(nn.Module):
    """Small UNet ``F(x, noise_labels, class_labels=None)`` for ``(B, C, H, W)`` images."""

    def __init__(self, shape, label_dim: int = 0, channels: int = 64, channel_mult=(1, 2), num_blocks: int = 2,
                 emb_dim: int = 256, dropout: float = 0.0, attn: bool = False):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)  # per-item shape (C, H, W)
        self.label_dim = int(label_dim)  # width of one-hot class labels; 0: unconditional
        mult = tuple(int(m) for m in channel_mult)  # channel multiplier per resolution level
        check_image_shape(self.shape, len(mult))
        at_least(1, channels=channels, channel_mult=mult, num_blocks=num_blocks)
        widths = [channels * m for m in mult]  # channels per level
        self.mapping = MappingNetwork(emb_dim, self.label_dim)
        self.conv_in = nn.Conv2d(self.shape[0], widths[0], 3, padding=1)

        self.enc = nn.ModuleList()  # one ModuleList of blocks per level
        width = widths[0]
        for level_width in widths:
            blocks = nn.ModuleList()
            for _ in range(num_blocks):
                blocks.append(ResBlock(width, level_width, emb_dim, dropout))
                width = level_width
            self.enc.append(blocks)
        self.attn = AttentionBlock(width) if attn else None

        self.dec = nn.ModuleList()  # from the second-lowest level up to full resolution
        for level_width in reversed(widths[:-1]):
            blocks = nn.ModuleList()
            for i in range(num_blocks):
                in_width = width + level_width if i == 0 else level_width  # skip concatenated on entry
                blocks.append(ResBlock(in_width, level_width, emb_dim, dropout))
                width = level_width
            self.dec.append(blocks)

        self.norm_out = nn.GroupNorm(num_groups(width), width)
        self.conv_out = nn.Conv2d(width, self.shape[0], 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # F = 0 at initialisation
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None):
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"expected images of shape {self.shape}, got {tuple(x.shape[1:])}")
        emb = self.mapping(noise_labels, class_labels, x.shape[0])  # (B, emb_dim)
        h = self.conv_in(x.to(emb.dtype))  # (B, C_0, H, W)
        skips = []
        for level, blocks in enumerate(self.enc):
            if level > 0:
                h = F.avg_pool2d(h, 2)  # (B, C, H/2, W/2)
            for block in blocks:
                h = block(h, emb)  # (B, C_level, H_level, W_level)
            skips.append(h)
        if self.attn is not None:
            h = self.attn(h)
        skips.pop()  # the lowest level feeds the decoder directly
        for blocks in self.dec:
            h = F.interpolate(h, scale_factor=2, mode="nearest")  # (B, C, 2H, 2W)
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_level, H_level, W_level)
            for block in blocks:
                h = block(h, emb)  # (B, C_level, H_level, W_level)
        return self.conv_out(F.silu(self.norm_out(h)))  # like x


def check_image_shape(shape: tuple, levels: int) -> None:
    """Raise ``ValueError`` unless ``shape`` is ``(C, H, W)`` with H and W divisible by 2**(levels - 1)."""
    if len(shape) != 3:
        raise ValueError(f"unet-small needs images of shape (C, H, W), got shape {tuple(shape)}")
    factor = 2 ** (levels - 1)
    if shape[1] % factor or shape[2] % factor:
        raise ValueError(
            f"unet-small with {levels} levels (len(channel_mult)={levels}) downsamples by {factor}, so H and W "
            f"must be divisible by {factor}; got H={shape[1]}, W={shape[2]}. Pad the images or use fewer levels."
        )


def make_unet_small(shape, label_dim: int = 0, channels: int = 64, channel_mult: tuple | list = (1, 2),
                    num_blocks: int = 2, emb_dim: int = 256, dropout: float = 0.0, attn: bool = False) -> SmallUNet:
    """Factory of the ``unet-small`` backbone.

    Args:
        shape: per-item image shape ``(C, H, W)``; H and W divisible by ``2**(len(channel_mult) - 1)``.
        label_dim: number of classes (one-hot width); 0 for an unconditional net.
        channels: base channel count; level ``i`` has ``channels * channel_mult[i]``.
        channel_mult: channel multiplier per resolution level (one level per entry).
        num_blocks: residual blocks per level, in the encoder and in the decoder.
        emb_dim: width of the noise/class embedding.
        dropout: dropout probability inside each residual block.
        attn: add a self-attention block at the lowest resolution.
    """
    return SmallUNet(shape, label_dim=label_dim, channels=channels, channel_mult=channel_mult,
                     num_blocks=num_blocks, emb_dim=emb_dim, dropout=dropout, attn=attn)
