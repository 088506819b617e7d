"""``mlp``: a residual MLP backbone for vector data (toy 2-D mixtures and other small vectors).

``x`` of any per-item shape is flattened to ``(B, D)``, passed through ``depth`` pre-norm
residual blocks conditioned on the noise (and class) embedding by FiLM, and reshaped back.
The output layer starts at zero, so ``F = 0`` and a preconditioned denoiser starts at
``D(x; σ) = c_skip(σ)·x``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .embeddings import MappingNetwork
from .shapes import at_least

ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}


def activation_layer(name: str) -> nn.Module:
    """An activation module by name; raises ``ValueError`` listing the known names."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class ResidualBlock(nn.Module):
    """``h + Linear(Dropout(act(LayerNorm(h)·(1 + scale) + shift)))`` with ``(scale, shift)`` from the embedding."""

    def __init__(self, hidden: int, emb_dim: int, dropout: float, activation: str):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.film = nn.Linear(emb_dim, 2 * hidden)
        self.act = activation_layer(activation)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(emb).chunk(2, dim=1)  # 2 x (B, hidden)
        out = self.act(torch.addcmul(shift, self.norm(h), scale + 1))
        return h + self.linear(self.dropout(out))  # (B, hidden)


class MLP(nn.Module):
    """Residual MLP ``F(x, noise_labels, class_labels=None)`` returning a tensor shaped like ``x``."""

    def __init__(self, shape, label_dim: int = 0, hidden: int = 256, depth: int = 4, emb_dim: int = 128,
                 dropout: float = 0.0, activation: str = "silu"):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)  # per-item shape, e.g. (2,)
        self.label_dim = int(label_dim)  # width of one-hot class labels; 0: unconditional
        dim = math.prod(self.shape)
        at_least(1, hidden=hidden)
        at_least(0, depth=depth)
        activation_layer(activation)  # fail early on an unknown name
        self.mapping = MappingNetwork(emb_dim, self.label_dim)
        self.linear_in = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(ResidualBlock(hidden, emb_dim, dropout, activation) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden)
        self.act_out = activation_layer(activation)
        self.linear_out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.linear_out.weight)  # F = 0 at initialisation
        nn.init.zeros_(self.linear_out.bias)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None):
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"expected items of shape {self.shape}, got {tuple(x.shape[1:])}")
        emb = self.mapping(noise_labels, class_labels, x.shape[0])  # (B, emb_dim)
        h = self.linear_in(x.reshape(x.shape[0], -1).to(emb.dtype))  # (B, hidden)
        for block in self.blocks:
            h = block(h, emb)  # (B, hidden)
        out = self.linear_out(self.act_out(self.norm_out(h)))  # (B, D)
        return out.reshape(x.shape)  # like x


def make_mlp(shape, label_dim: int = 0, hidden: int = 256, depth: int = 4, emb_dim: int = 128,
             dropout: float = 0.0, activation: str = "silu") -> MLP:
    """Factory of the ``mlp`` backbone.

    Args:
        shape: per-item shape of the data, e.g. ``(2,)``; it is flattened to ``D`` features.
        label_dim: number of classes (one-hot width); 0 for an unconditional net.
        hidden: width of the residual trunk.
        depth: number of residual blocks.
        emb_dim: width of the noise/class embedding.
        dropout: dropout probability inside each block.
        activation: one of ``silu``, ``gelu``, ``relu``, ``tanh``.
    """
    return MLP(shape, label_dim=label_dim, hidden=hidden, depth=depth, emb_dim=emb_dim, dropout=dropout,
               activation=activation)
