"""The dpdm plugin of ``dpdm-plugin-example``: the ``acme-mlp`` backbone and the ``acme-midpoint`` sampler.

dpdm finds this module through the entry point ``[project.entry-points.dpdm] acme = "acme_dpdm.plugin"``
and calls its ``@hookimpl`` functions with a ``register(name, obj)`` callback. torch is imported inside
the factory and the sampler, never at module level, so ``dpdm --help`` and ``dpdm plugins`` stay fast.
"""

from __future__ import annotations

from dpdm.core import hookimpl


def acme_mlp(shape: tuple, label_dim: int = 0, width: int = 64, depth: int = 2):
    """A small residual MLP ``F(x, noise_labels, class_labels=None)`` for data of any per-item shape.

    Items are flattened to ``D`` features; the noise label (and one-hot class label, if ``label_dim > 0``)
    is embedded and added to the hidden state before every residual block. The output layer starts at
    zero, so a preconditioned denoiser starts at ``D(x; σ) = c_skip(σ)·x``.
    """
    import math

    import torch
    from torch import nn

    class AcmeMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.shape = tuple(int(s) for s in shape)
            self.label_dim = int(label_dim)
            dim = math.prod(self.shape)
            self.freqs = nn.Parameter(torch.randn(width // 2) * 4.0, requires_grad=False)  # Fourier noise embedding
            self.embed = nn.Sequential(nn.Linear(2 * (width // 2), width), nn.SiLU(), nn.Linear(width, width))
            self.label = nn.Linear(self.label_dim, width, bias=False) if self.label_dim else None
            self.linear_in = nn.Linear(dim, width)
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, width)) for _ in range(depth))
            self.norm_out = nn.LayerNorm(width)
            self.linear_out = nn.Linear(width, dim)
            nn.init.zeros_(self.linear_out.weight)
            nn.init.zeros_(self.linear_out.bias)

        def forward(self, x, noise_labels, class_labels=None):
            if tuple(x.shape[1:]) != self.shape:
                raise ValueError(f"expected items of shape {self.shape}, got {tuple(x.shape[1:])}")
            b = x.shape[0]
            t = noise_labels.to(self.freqs.dtype).reshape(-1).expand(b) if noise_labels.numel() == 1 \
                else noise_labels.to(self.freqs.dtype).reshape(b)
            angles = t[:, None] * self.freqs[None, :]  # (B, width/2)
            emb = self.embed(torch.cat([angles.cos(), angles.sin()], dim=1))  # (B, width)
            if self.label is not None and class_labels is not None:
                emb = emb + self.label(class_labels.to(emb.dtype).reshape(b, -1))
            h = self.linear_in(x.reshape(b, -1).to(emb.dtype))  # (B, width)
            for block in self.blocks:
                h = h + block(h + emb)
            return self.linear_out(nn.functional.silu(self.norm_out(h))).reshape(x.shape).to(x.dtype)

    return AcmeMLP()


def sample_midpoint(denoiser, x, sigmas, *, generator=None, callback=None, class_labels=None):
    """Explicit midpoint (RK2) on the probability-flow ODE dx/dσ = (x − D(x, σ))/σ.

    Each step from σ_i to σ_{i+1} > 0 takes a half Euler step to σ_mid = (σ_i + σ_{i+1})/2 and then
    the full step with the slope there (second order). The last step,
    to σ = 0, is a plain Euler step, so NFE = 2N − 1 (like Heun). Deterministic; keeps ``x``'s dtype.
    """
    import torch

    with torch.no_grad():
        sigmas = sigmas.to(device=x.device, dtype=x.dtype)
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = denoiser(x, sigma, class_labels=class_labels).to(x.dtype)
            if callback is not None:
                callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})
            d = (x - denoised) / sigma
            if sigma_next > 0:
                sigma_mid = (sigma + sigma_next) / 2
                x_mid = x + (sigma_mid - sigma) * d
                d_mid = (x_mid - denoiser(x_mid, sigma_mid, class_labels=class_labels).to(x.dtype)) / sigma_mid
                x = x + (sigma_next - sigma) * d_mid
            else:
                x = x + (sigma_next - sigma) * d
        return x


@hookimpl
def register_backbones(register):
    register("acme-mlp", acme_mlp)


@hookimpl
def register_samplers(register):
    register("acme-midpoint", sample_midpoint, nfe=lambda steps: 2 * steps - 1)  # network evaluations per steps
