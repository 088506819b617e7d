"""Noise-level embeddings shared by the backbones (as in EDM's ``training/networks.py``).

Both map a ``(B,)`` tensor of noise labels (for EDM preconditioning ``c_noise = ln(σ)/4``)
to ``(B, num_channels)`` features ``[cos, sin]``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of SongUNet (DDPM++): f_i = (1/max_positions)^(i/(C/2 − endpoint)), i < C/2.

    ``endpoint=True`` (SongUNet) makes the last frequency exactly ``1/max_positions``;
    ADM uses ``endpoint=False``. The output is ``[cos(x f), sin(x f)]``.
    """

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = True):
        super().__init__()
        if num_channels < 4 or num_channels % 2:
            raise ValueError(f"num_channels must be even and at least 4, got {num_channels}")
        self.num_channels = num_channels  # output width C
        self.max_positions = max_positions  # 1/f of the slowest frequency
        self.endpoint = endpoint  # include f = 1/max_positions exactly

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        dtype = x.dtype if x.is_floating_point() else torch.float32
        freqs = torch.arange(half, dtype=dtype, device=x.device)  # (C/2,)
        freqs = (1 / self.max_positions) ** (freqs / (half - (1 if self.endpoint else 0)))
        x = x.reshape(-1, 1).to(freqs.dtype) * freqs  # (B, C/2)
        return torch.cat([x.cos(), x.sin()], dim=1)  # (B, C)


class FourierEmbedding(nn.Module):
    """Random Fourier features of NCSN++: f ~ N(0, scale²) (a buffer), output ``[cos(2π x f), sin(2π x f)]``."""

    def __init__(self, num_channels: int, scale: float = 16.0):
        super().__init__()
        if num_channels < 2 or num_channels % 2:
            raise ValueError(f"num_channels must be even and at least 2, got {num_channels}")
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)  # (C/2,), saved with the weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1).to(self.freqs.dtype) * (2 * math.pi * self.freqs)  # (B, C/2)
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
        self.map_noise = PositionalEmbedding(emb_dim)
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
