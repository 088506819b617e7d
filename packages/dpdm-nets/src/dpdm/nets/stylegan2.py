"""A StyleGAN2-style generator (Karras et al. 2020) adapted to be a DPDM student backbone.

``StyleGAN2Denoiser(shape, label_dim, ...)`` is a raw backbone ``F(x, noise_labels, class_labels=None)``
returning a tensor shaped like ``x``, to be wrapped in ``EDMPrecond``:
``D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, ln(σ)/4)``.

Why a GAN generator as a student at all: DPDM only asks the student's *output distribution* to
match the data (the teacher and the fake score, both EDM UNets, supply the gradient), so the
student need not share the teacher's architecture; a StyleGAN2 synthesis network is a proven
few-step image generator. It is trained from scratch here, while teacher and fake score are EDM
nets (the fake score usually starts as a copy of the teacher).

Design (``forward``):

1. **Encoder.** A GAN generator maps a latent ``z`` to an image, but a DPDM student denoises a
   noisy image ``x_t``: its randomness *is* ``x_t``. So ``x`` goes through a small conv encoder
   (1x1 fromRGB at full resolution, then per resolution a 3x3 conv and an average-pool +
   3x3 conv down to ``base_resolution``, width ``min(channels·H/res, channel_max)``). Its
   globally pooled lowest-resolution features play the role of ``z``.
2. **Mapping network.** ``[normalize(Linear(pooled features)), normalize(emb)]`` goes through
   ``mapping_layers`` lr-equalised FC layers (leaky ReLU) to ``w``, where ``emb`` is the σ and
   class embedding of ``dpdm.nets.embeddings.MappingNetwork`` (sinusoidal embedding of the noise
   labels -> MLP, plus a bias-free Linear of the one-hot class). So ``w`` depends on ``x_t``, σ
   and the class. (StyleGAN2 uses ``lr_multiplier=0.01`` in the mapping to stabilise GAN
   training; here the mapping carries σ and ``x_t`` and learns at full rate by default.)
3. **Synthesis.** Modulated/demodulated 3x3 convolutions (per-sample styles from ``w`` through
   one affine layer per conv, bias-initialised to 1; weights demodulated by the per-output-channel
   norm; implemented as one grouped conv over the batch), per-layer noise inputs with a learned
   per-channel strength (zero-initialised, as in StyleGAN2), bias and ``lrelu·√2``. Resolution
   doubles (bilinear upsampling before the first conv of each block) from ``base_resolution``
   to the image size, with a toRGB (1x1 modulated conv without demodulation) per resolution whose
   outputs are upsampled and summed (the "skip" architecture). The output is that sum.
4. **First synthesis input.** Not a learned constant: a 1x1 conv of the encoder's
   ``base_resolution`` features, so the coarse layout of ``x_t`` seeds the synthesis.
5. **U-Net-like skips.** The encoder's feature map at each finer resolution is added (after a 1x1
   conv) to the synthesis features at the same resolution. At high σ ``w`` (global content) does
   the work; at low σ the denoiser must keep the fine detail of ``x_t``, which a global ``w`` plus
   a 4x4 seed cannot carry, so the skips pass it through.

EDM preconditioning already passes ``c_skip·x`` (≈ ``x`` at low σ) around the network, so ``F``
only needs the (scaled) correction; the toRGB weights are therefore initialised small (×0.01),
so that ``F ≈ 0`` and ``D ≈ c_skip·x`` at initialisation.

Noise inputs: ``noise_mode`` is ``"random"`` (fresh ``torch.randn`` from torch's global RNG per
call), ``"const"`` (a fixed buffer drawn at construction, saved with the weights) or ``"none"``.
In training mode noise is random unless ``noise_mode == "none"``; in eval mode ``noise_mode``
is used as is, and the default ``"const"`` makes the denoiser a deterministic function of its
input, which samplers, the fake-score fit and evaluation metrics rely on (the stochasticity of a
DPDM student comes from ``x_t``, not from hidden noise).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .embeddings import MappingNetwork
from .shapes import square_image

NOISE_MODES = ("random", "const", "none")


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    """Leaky ReLU with StyleGAN's gain √2 (keeps unit second moment)."""
    return F.leaky_relu(x, 0.2) * math.sqrt(2)


def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale each row to unit mean square (StyleGAN's ``normalize_2nd_moment``)."""
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


def _is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


class EqualizedLinear(nn.Module):
    """Linear layer with equalised learning rate: weight ~ N(0, 1)/lr_mul, scaled by lr_mul/√in at run time."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bias_init: float = 0.0,
                 lr_mul: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)  # (out, in)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init) / lr_mul)) if bias else None
        self.weight_gain = lr_mul / math.sqrt(in_features)
        self.lr_mul = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias * self.lr_mul if self.bias is not None else None
        return F.linear(x, self.weight * self.weight_gain, b)


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, demodulate: bool = True,
                     padding: int = 0, eps: float = 1e-8) -> torch.Tensor:
    """StyleGAN2's modulated convolution as one grouped conv over the batch.

    ``x`` (B, Cin, H, W), ``weight`` (Cout, Cin, k, k), ``styles`` (B, Cin). Per sample b:
    ``w'_b = weight · styles_b`` (scaling input channels), and with ``demodulate``
    ``w''_b[o] = w'_b[o] / √(Σ_{i,k} w'_b[o,i,k]² + eps)``, so each output channel has unit
    variance for unit-variance iid inputs. Returns (B, Cout, H', W').
    """
    batch, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    wts = weight.unsqueeze(0) * styles.reshape(batch, 1, cin, 1, 1)  # (B, Cout, Cin, k, k)
    if demodulate:
        wts = wts * (wts.square().sum(dim=(2, 3, 4), keepdim=True) + eps).rsqrt()
    x = x.reshape(1, batch * cin, h, w)
    out = F.conv2d(x, wts.reshape(batch * cout, cin, kh, kw).to(x.dtype), padding=padding, groups=batch)
    return out.reshape(batch, cout, *out.shape[2:])


class ModulatedConv(nn.Module):
    """Affine(w) -> styles, modulated conv, optional noise input, bias and activation (a StyleGAN2 layer)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, kernel_size: int = 3,
                 resolution: int | None = None, demodulate: bool = True, activate: bool = True,
                 up: bool = False, weight_init: float = 1.0):
        super().__init__()
        self.affine = EqualizedLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size) * weight_init)
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)
        self.padding = kernel_size // 2
        self.demodulate, self.activate, self.up = demodulate, activate, up
        self.use_noise = resolution is not None
        if self.use_noise:
            self.register_buffer("noise_const", torch.randn(resolution, resolution))  # fixed noise, "const" mode
            self.noise_strength = nn.Parameter(torch.zeros(out_channels))  # per channel, zero-init as StyleGAN2

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "const") -> torch.Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        styles = self.affine(w)  # (B, Cin)
        if not self.demodulate:
            styles = styles * self.weight_gain  # toRGB: scale as an equalised 1x1 conv
        x = modulated_conv2d(x, self.weight, styles, demodulate=self.demodulate, padding=self.padding)
        if self.use_noise and noise_mode != "none":
            if noise_mode == "random":
                noise = torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device, dtype=x.dtype)
            else:
                noise = self.noise_const.to(x.dtype)  # (H, W)
            x = x + noise * self.noise_strength.reshape(1, -1, 1, 1)
        x = x + self.bias.reshape(1, -1, 1, 1)
        return _lrelu(x) if self.activate else x


class StyleGAN2Denoiser(nn.Module):
    """StyleGAN2 generator with an ``x_t`` encoder: ``forward(x, noise_labels, class_labels=None) -> like x``.

    Args:
        shape: item shape ``(C, H, W)`` with ``H == W`` a power of two, ``H >= base_resolution``.
        label_dim: number of classes (0: unconditional).
        channels: width at the image resolution; doubles per halving of the resolution, up to ``channel_max``.
        w_dim: width of ``w`` (and of the σ/class embedding).
        mapping_layers: FC layers of the mapping network.
        base_resolution: lowest resolution (power of two, at least 2).
        noise_mode: ``"const"``, ``"none"`` or ``"random"``, used in eval mode (see the module docstring).
        mapping_lr_mul: learning-rate multiplier of the mapping network's equalised linears.
        rgb_init: scale of the toRGB weights at initialisation (small, so ``F`` starts near 0).
    """

    def __init__(self, shape, label_dim: int = 0, channels: int = 128, channel_max: int = 256, w_dim: int = 256,
                 mapping_layers: int = 4, base_resolution: int = 4, noise_mode: str = "const",
                 mapping_lr_mul: float = 1.0, rgb_init: float = 0.01):
        super().__init__()
        img_channels, height = square_image(shape, "stylegan2")
        shape = (img_channels, height, height)
        if not _is_pow2(base_resolution) or base_resolution < 2:
            raise ValueError(f"base_resolution must be a power of two >= 2, got {base_resolution}")
        if not _is_pow2(height) or height < base_resolution:
            raise ValueError(f"stylegan2 needs a power-of-two resolution >= base_resolution={base_resolution}, "
                             f"got shape {shape}")
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {', '.join(NOISE_MODES)}, got {noise_mode!r}")
        if mapping_layers < 1 or channels < 1 or channel_max < 1 or w_dim < 4 or w_dim % 2:
            raise ValueError("need mapping_layers >= 1, channels >= 1, channel_max >= 1 and an even w_dim >= 4")
        self.shape, self.label_dim, self.noise_mode = shape, int(label_dim), noise_mode
        self.img_resolution, self.base_resolution = height, base_resolution
        self.resolutions = [base_resolution * 2**i for i in range(int(math.log2(height // base_resolution)) + 1)]
        ch = {res: min(channels * (height // res), channel_max) for res in self.resolutions}
        self.channels_per_res = ch

        # Encoder over x_t: features at every resolution, from fine to coarse.
        self.from_rgb = nn.Conv2d(img_channels, ch[height], 1)
        self.enc_convs = nn.ModuleDict({str(r): nn.Conv2d(ch[r], ch[r], 3, padding=1) for r in self.resolutions})
        self.enc_downs = nn.ModuleDict({str(r): nn.Conv2d(ch[r], ch[r // 2], 3, padding=1)
                                        for r in self.resolutions if r > base_resolution})
        self.enc_pool = nn.Linear(ch[base_resolution], w_dim)

        # Mapping network: [pooled x_t features, σ/class embedding] -> w.
        self.embed = MappingNetwork(w_dim, self.label_dim)
        layers, in_dim = [], 2 * w_dim
        for _ in range(mapping_layers):
            layers.append(EqualizedLinear(in_dim, w_dim, lr_mul=mapping_lr_mul))
            in_dim = w_dim
        self.mapping = nn.ModuleList(layers)

        # Synthesis: seeded by the encoder's base features, with U-Net-like skips from the encoder.
        self.syn_input = nn.Conv2d(ch[base_resolution], ch[base_resolution], 1)
        self.skips = nn.ModuleDict({str(r): nn.Conv2d(ch[r], ch[r], 1) for r in self.resolutions if r > base_resolution})
        self.conv0 = nn.ModuleDict({str(r): ModulatedConv(ch[r // 2], ch[r], w_dim, resolution=r, up=True)
                                    for r in self.resolutions if r > base_resolution})
        self.conv1 = nn.ModuleDict({str(r): ModulatedConv(ch[r], ch[r], w_dim, resolution=r) for r in self.resolutions})
        self.to_rgb = nn.ModuleDict({str(r): ModulatedConv(ch[r], img_channels, w_dim, kernel_size=1, demodulate=False,
                                                           activate=False, weight_init=rgb_init)
                                     for r in self.resolutions})

    def _noise_mode(self) -> str:
        if self.noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {', '.join(NOISE_MODES)}, got {self.noise_mode!r}")
        if self.training and self.noise_mode != "none":
            return "random"
        return self.noise_mode

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None):
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"expected inputs of shape (B, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")
        batch = x.shape[0]
        dtype = self.from_rgb.weight.dtype
        x = x.to(dtype)
        noise_mode = self._noise_mode()

        # Encoder: enc[r] (B, ch[r], r, r) for every resolution.
        enc, h = {}, _lrelu(self.from_rgb(x))
        for r in reversed(self.resolutions):
            h = _lrelu(self.enc_convs[str(r)](h))
            enc[r] = h
            if r > self.base_resolution:
                h = _lrelu(self.enc_downs[str(r)](F.avg_pool2d(h, 2)))
        pooled = self.enc_pool(enc[self.base_resolution].mean(dim=(2, 3)))  # (B, w_dim)

        # Mapping: w depends on x_t, σ and the class.
        emb = self.embed(noise_labels, class_labels, batch)  # (B, w_dim)
        w = torch.cat([normalize_2nd_moment(pooled), normalize_2nd_moment(emb)], dim=1)  # (B, 2 w_dim)
        for layer in self.mapping:
            w = _lrelu(layer(w))  # (B, w_dim)

        # Synthesis with toRGB skips.
        h, img = self.syn_input(enc[self.base_resolution]), None
        for r in self.resolutions:
            if r > self.base_resolution:
                h = self.conv0[str(r)](h, w, noise_mode) + self.skips[str(r)](enc[r])
            h = self.conv1[str(r)](h, w, noise_mode)
            rgb = self.to_rgb[str(r)](h, w)
            if img is not None:
                img = F.interpolate(img, scale_factor=2, mode="bilinear", align_corners=False)
            img = rgb if img is None else img + rgb
        return img
