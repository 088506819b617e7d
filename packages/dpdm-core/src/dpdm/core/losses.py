"""The EDM denoising loss (Karras et al. 2022, Eq. 2 with λ(σ) of Table 1), used to train teachers
and the DPDM fake-score model."""

from __future__ import annotations

import torch

from .sigmas import SigmaDist
from .utils import append_dims


def sum_per_sample(t: torch.Tensor) -> torch.Tensor:
    """Sum over all but the batch dimension: ``(B, ...) -> (B,)``."""
    return t.reshape(t.shape[0], -1).sum(dim=1)


class EDMLoss:
    """λ(σ)·‖D(y + σε, σ) − y‖², λ(σ) = (σ² + σ_d²)/(σ·σ_d)², ln σ ~ N(P_mean, P_std²).

    Returns one value per sample, summed over pixels; the training loop averages over the
    batch, as EDM's ``training_loop`` does (sum over C·H·W, mean over the batch).
    """

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5,
                 sigma: SigmaDist | None = None):
        self.sigma_data = float(sigma_data)
        self.sigma = sigma or SigmaDist("lognormal", P_mean=P_mean, P_std=P_std, min=1e-12, max=1e12)

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def __call__(self, denoiser, y: torch.Tensor, class_labels=None, generator=None,
                 sigma: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample loss ``(B,)``; ``sigma`` (B,) fixes the noise levels instead of drawing them."""
        if sigma is None:
            sigma = self.sigma.draw(y.shape[0], generator, y.device, y.dtype)  # (B,)
        sigma_b = append_dims(sigma, y.ndim)  # (B, 1, ..., 1)
        noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype) * sigma_b
        denoised = denoiser(y + noise, sigma, class_labels=class_labels)
        return self.weight(sigma) * sum_per_sample((denoised - y) ** 2)  # (B,)
