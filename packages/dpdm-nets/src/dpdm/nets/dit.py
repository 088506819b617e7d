"""``dit``: a pixel-space Diffusion Transformer backbone.

After Peebles & Xie, "Scalable Diffusion Models with Transformers" (ICCV 2023, arXiv:2212.09748),
following the official ``facebookresearch/DiT`` ``models.py``, but on pixels instead of VAE
latents and predicting only ``F`` (no learned variance):

- patchify: a conv with ``kernel = stride = patch_size`` to ``hidden`` channels, plus a fixed
  2-D sin-cos position embedding (a non-persistent buffer, recomputed from the shape);
- conditioning ``c = t_emb + y_emb``: ``t_emb`` is an MLP of the sinusoidal frequency embedding
  of the noise labels (DiT's ``TimestepEmbedder``; under EDM preconditioning the labels are
  ``ln(σ)/4``), ``y_emb`` a table of ``label_dim + 1`` rows whose last row is the null class
  used for classifier-free guidance;
- ``depth`` transformer blocks with adaLN-Zero: a zero-initialised ``Linear(SiLU(c), 6·hidden)``
  gives shift/scale/gate for the attention and MLP branches;
- a final adaLN (shift/scale) layer and a zero-initialised linear to ``patch_size²·C``, then
  unpatchify. At initialisation the network outputs exactly zero.

Presets ``S/B/L/XL`` as in the paper (Table 1); any of ``hidden``, ``depth``, ``num_heads``
overrides its preset value.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .shapes import at_least, square_image

#: ``size -> (hidden, depth, num_heads)`` (Peebles & Xie 2022, Table 1).
PRESETS: dict[str, tuple[int, int, int]] = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x·(1 + scale) + shift`` with ``x`` (B, T, D) and ``shift``, ``scale`` (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """``[sin(pos·ω), cos(pos·ω)]`` with ``ω_i = 10000^(−i/(dim/2))``: ``(M,) -> (M, dim)`` (as MAE/DiT)."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D position embedding of a ``grid_size²`` grid in row-major token order: ``(T, dim)``.

    As DiT's ``get_2d_sincos_pos_embed``: the first ``dim/2`` channels encode the column index,
    the last ``dim/2`` the row index (float64, to be cast by the caller).
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)  # (G², dim)


class TimestepEmbedder(nn.Module):
    """Noise labels (B,) -> (B, hidden): ``Linear(SiLU(Linear([cos(t f), sin(t f)])))``, f_i = 10000^(−i/half)."""

    def __init__(self, hidden: int, frequency_size: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.frequency_size = int(frequency_size)
        self.max_period = float(max_period)
        self.mlp = nn.Sequential(nn.Linear(self.frequency_size, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def frequency_embedding(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.reshape(-1, 1).float() * freqs[None]  # (B, half)
        emb = torch.cat([args.cos(), args.sin()], dim=1)
        if self.frequency_size % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
        return emb  # (B, frequency_size)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        dtype = self.mlp[0].weight.dtype
        return self.mlp(self.frequency_embedding(t).to(dtype))


class LabelEmbedder(nn.Module):
    """One-hot labels ``(B, label_dim)`` -> ``(B, hidden)`` via a table of ``label_dim + 1`` rows.

    Indices are the argmax of each row; all-zero rows (EDM's unconditional input) and, in
    training mode, a ``dropout`` fraction of the rows take the last (null) row.
    """

    def __init__(self, label_dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.label_dim = int(label_dim)
        self.dropout = float(dropout)
        self.table = nn.Embedding(self.label_dim + 1, hidden)

    @property
    def null_class(self) -> int:
        return self.label_dim

    def indices(self, class_labels: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        if class_labels is None:
            return torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        idx = class_labels.argmax(dim=1)
        return torch.where((class_labels != 0).any(dim=1), idx, torch.full_like(idx, self.null_class))

    def forward(self, class_labels: torch.Tensor | None, batch: int) -> torch.Tensor:
        device = self.table.weight.device
        idx = self.indices(class_labels, batch, device)  # (B,)
        if self.training and self.dropout > 0:
            drop = torch.rand(batch, device=device) < self.dropout
            idx = torch.where(drop, torch.full_like(idx, self.null_class), idx)
        return self.table(idx)


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, hidden: int, num_heads: int):
        super().__init__()
        self.num_heads = int(num_heads)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, T, d/heads)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    """``Linear -> GELU(tanh) -> Linear``."""

    def __init__(self, hidden: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift/scale) then a linear to ``patch_size²·C`` per token."""

    def __init__(self, hidden: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Pixel-space DiT: ``forward(x (B, C, H, W), noise_labels (B,), class_labels (B, label_dim) | None)``."""

    def __init__(self, shape, label_dim: int = 0, size: str = "S", patch_size: int = 2, hidden: int | None = None,
                 depth: int | None = None, num_heads: int | None = None, mlp_ratio: float = 4.0,
                 class_dropout: float = 0.0):
        super().__init__()
        channels, height = square_image(shape, "dit")
        shape, width = (channels, height, height), height
        patch_size = int(patch_size)
        if patch_size < 1 or height % patch_size:
            raise ValueError(f"dit: image size {height}x{width} is not divisible by patch_size={patch_size}")
        key = str(size).upper().removeprefix("DIT-")
        if key not in PRESETS:
            raise ValueError(f"dit: unknown size {size!r}; choose one of {sorted(PRESETS)}")
        at_least(0, "dit: ", hidden=hidden or 0, depth=depth or 0, num_heads=num_heads or 0)  # 0: the preset's
        if not mlp_ratio > 0:
            raise ValueError(f"dit: mlp_ratio must be positive, got {mlp_ratio}")
        p_hidden, p_depth, p_heads = PRESETS[key]
        hidden, depth, num_heads = int(hidden or p_hidden), int(depth or p_depth), int(num_heads or p_heads)
        if hidden % num_heads:
            raise ValueError(f"dit: hidden={hidden} is not divisible by num_heads={num_heads}")
        if hidden % 4:
            raise ValueError(f"dit: hidden={hidden} must be divisible by 4 (2-D sin-cos position embedding)")
        if not 0.0 <= class_dropout <= 1.0:
            raise ValueError(f"dit: class_dropout must lie in [0, 1], got {class_dropout}")

        self.shape = shape
        self.label_dim = int(label_dim)  # width of one-hot class labels; 0: unconditional
        self.size = key
        self.in_channels = self.out_channels = channels
        self.patch_size, self.hidden, self.depth, self.num_heads = patch_size, hidden, depth, num_heads
        self.mlp_ratio = float(mlp_ratio)
        self.grid_size = height // patch_size

        self.x_embedder = nn.Conv2d(channels, hidden, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden)
        self.y_embedder = LabelEmbedder(self.label_dim, hidden, class_dropout) if self.label_dim else None
        self.register_buffer("pos_embed", sincos_2d(hidden, self.grid_size).float().unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden, num_heads, self.mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden, patch_size, channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: xavier-uniform linears, zero adaLN modulations and final layer."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.weight  # the patch embedding initialised like a linear layer
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, p²·C) -> (B, C, H, W)``."""
        p, g, c = self.patch_size, self.grid_size, self.out_channels
        x = x.reshape(x.shape[0], g, g, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"dit was built for items of shape {self.shape}, got {tuple(x.shape[1:])}")
        batch = x.shape[0]
        dtype = self.x_embedder.weight.dtype
        x = x.to(dtype)
        noise_labels = torch.as_tensor(noise_labels, device=x.device).reshape(-1)
        if noise_labels.numel() == 1:
            noise_labels = noise_labels.expand(batch)
        if noise_labels.numel() != batch:
            raise ValueError(f"noise_labels has {noise_labels.numel()} values for a batch of {batch}")

        c = self.t_embedder(noise_labels)  # (B, D)
        if self.y_embedder is not None:
            if class_labels is not None and tuple(class_labels.shape) != (batch, self.label_dim):
                raise ValueError(f"class_labels must be one-hot rows of shape ({batch}, {self.label_dim}), "
                                 f"got {tuple(class_labels.shape)}")
            c = c + self.y_embedder(class_labels, batch)
        elif class_labels is not None:
            raise ValueError("class_labels were given to a backbone built with label_dim=0")

        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed.to(dtype)  # (B, T, D)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))  # (B, C, H, W)


def make_dit(shape, label_dim: int = 0, size: str = "S", patch_size: int = 2, hidden: int | None = None,
             depth: int | None = None, num_heads: int | None = None, mlp_ratio: float = 4.0,
             class_dropout: float = 0.0) -> DiT:
    """Build a :class:`DiT`; ``hidden``, ``depth``, ``num_heads`` of ``None`` or 0 take the ``size`` preset.

    Args:
        shape: item shape ``(C, H, W)`` with ``H == W`` divisible by ``patch_size``.
        label_dim: number of classes (one-hot width); 0 for an unconditional net.
        size: preset ``"S"``, ``"B"``, ``"L"`` or ``"XL"``.
        patch_size: patch side in pixels (2 or 4 are usual in pixel space).
        mlp_ratio: MLP width as a multiple of ``hidden``.
        class_dropout: fraction of labels replaced by the null class in training mode (CFG).
    """
    return DiT(shape, label_dim=label_dim, size=size, patch_size=patch_size, hidden=hidden, depth=depth,
               num_heads=num_heads, mlp_ratio=mlp_ratio, class_dropout=class_dropout)
