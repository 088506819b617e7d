"""Noise-level embeddings shared by the backbones, ours and the official EDM networks' (``dpdm.nets.edm``), as
in EDM's ``training/networks.py``.

Both map a ``(B,)`` tensor of noise labels (for EDM preconditioning ``c_noise = ln(σ)/4``)
to ``(B, num_channels)`` features ``[cos, sin]``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding ``[cos(x f), sin(x f)]`` with ``f_i = (1/max_positions)^(i / (C/2 − endpoint))``,
    i < C/2 (NVlabs/edm ``PositionalEmbedding``).

    DDPM++ (SongUNet) and our own backbones' ``MappingNetwork`` use ``endpoint=True`` (the last frequency is
    exactly ``1/max_positions``), ADM (DhariwalUNet) ``endpoint=False``. EDM computes the frequencies in float32
    and casts them to the input's dtype (``freq_dtype=torch.float32``); ``freq_dtype=None`` computes them in the
    input's own floating dtype (float32 for integer input), which differs from EDM only for non-float32 input.
    """

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False,
                 freq_dtype: torch.dtype | None = torch.float32):
        super().__init__()
        if num_channels < 2 or num_channels % 2 or (endpoint and num_channels < 4):
            raise ValueError(f"num_channels must be even and at least {4 if endpoint else 2}, got {num_channels}")
        self.num_channels = int(num_channels)  # output width C; C/2 frequencies
        self.max_positions = max_positions  # 1/f of the slowest frequency (the longest period)
        self.endpoint = bool(endpoint)  # True: the last frequency is exactly 1/max_positions
        self.freq_dtype = freq_dtype  # dtype the frequencies are computed in; None: the input's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        dtype = x.dtype if x.is_floating_point() else torch.float32  # of the angles x·f
        freqs = torch.arange(half, dtype=self.freq_dtype or dtype, device=x.device)
        freqs = freqs / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs  # (C/2,)
        x = x.reshape(-1, 1).to(dtype) * freqs.to(dtype)  # (B, C/2)
        return torch.cat([x.cos(), x.sin()], dim=1)  # (B, C)


class FourierEmbedding(nn.Module):
    """Random Fourier features ``[cos(2π x f), sin(2π x f)]`` with ``f ~ N(0, scale²)`` (NCSN++; NVlabs/edm
    ``FourierEmbedding``).

    The frequencies are the buffer ``freqs`` (C/2,), drawn at construction and saved with the weights: load
    them from the checkpoint.
    """

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        if num_channels < 2 or num_channels % 2:
            raise ValueError(f"num_channels must be even and at least 2, got {num_channels}")
        self.num_channels = int(num_channels)
        self.register_buffer("freqs", torch.randn(self.num_channels // 2) * scale)  # (C/2,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if x.is_floating_point() else self.freqs.dtype  # of the angles
        x = x.reshape(-1, 1).to(dtype) * (2 * math.pi * self.freqs).to(dtype)  # (B, C/2)
        return torch.cat([x.cos(), x.sin()], dim=1)  # (B, C)


class MappingNetwork(nn.Module):
    """Noise (and class) conditioning shared by the backbones: ``(B,)`` noise labels -> ``(B, emb_dim)``.

    As in ADM's mapping: ``emb = Linear(SiLU(Linear(PositionalEmbedding(c_noise))))``, plus a
    bias-free ``Linear(one-hot)`` for class labels added after the MLP, then SiLU, so each
    block only needs its own linear projection of the result.
    """

    def __init__(self, emb_dim: int, label_dim: int = 0):
        super().__init__()
        self.label_dim = int(label_dim)  # 0: unconditional
        self.map_noise = PositionalEmbedding(emb_dim, endpoint=True, freq_dtype=None)
        self.map_layer0 = nn.Linear(emb_dim, emb_dim)
        self.map_layer1 = nn.Linear(emb_dim, emb_dim)
        self.map_label = nn.Linear(self.label_dim, emb_dim, bias=False) if self.label_dim else None

    def forward(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None, batch: int) -> torch.Tensor:
        dtype = self.map_layer0.weight.dtype
        noise_labels = torch.as_tensor(noise_labels, device=self.map_layer0.weight.device).to(dtype).reshape(-1)
        if noise_labels.numel() == 1:
            noise_labels = noise_labels.expand(batch)  # (B,)
        if noise_labels.numel() != batch:
            raise ValueError(f"noise_labels has {noise_labels.numel()} values for a batch of {batch}")
        emb = self.map_noise(noise_labels)  # (B, emb_dim)
        emb = self.map_layer1(nn.functional.silu(self.map_layer0(emb)))  # (B, emb_dim)
        if class_labels is not None:
            if self.map_label is None:
                raise ValueError("class_labels were given to a backbone built with label_dim=0")
            if class_labels.shape != (batch, self.label_dim):
                raise ValueError(f"class_labels must be one-hot rows of shape ({batch}, {self.label_dim}), "
                                 f"got {tuple(class_labels.shape)}")
            emb = emb + self.map_label(class_labels.to(dtype))  # (B, emb_dim)
        return nn.functional.silu(emb)
