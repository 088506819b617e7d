"""Preconditioning: wrap a raw backbone ``F`` into a denoiser ``D(x, sigma, class_labels=None)``.

``D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ))`` (Karras et al. 2022, Eq. 7 and
Table 1). Coefficients for EDM, VP and VE follow the official EDM code
(``../shared/edm_ref/README.md`` §3).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .utils import append_dims


def as_sigma(sigma, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sigma as a ``(B, 1, ..., 1)`` tensor broadcastable against ``x`` (a scalar, ``(B,)`` or ``(B, 1, ...)``)."""
    sigma = torch.as_tensor(sigma, dtype=dtype, device=x.device).reshape(-1)
    if sigma.numel() == 1:
        sigma = sigma.expand(x.shape[0])
    if sigma.numel() != x.shape[0]:
        raise ValueError(f"sigma has {sigma.numel()} values for a batch of {x.shape[0]}")
    return append_dims(sigma, x.ndim)  # (B, 1, ..., 1)


def one_hot_labels(class_labels, batch: int, label_dim: int, device, dtype) -> torch.Tensor | None:
    """Class labels as ``(B, label_dim)`` floats: one-hot rows pass through, integer indices are encoded.

    With ``label_dim > 0`` and no labels, zeros are used (the unconditional input, as in EDM).
    """
    if label_dim == 0:
        return None
    if class_labels is None:
        return torch.zeros(batch, label_dim, device=device, dtype=dtype)
    class_labels = torch.as_tensor(class_labels, device=device)
    if class_labels.ndim == 1 and not class_labels.is_floating_point():
        return nn.functional.one_hot(class_labels.long(), label_dim).to(dtype)
    return class_labels.to(dtype).reshape(-1, label_dim)


class Precond(nn.Module):
    """Base class: subclasses define ``coefficients(sigma) -> (c_skip, c_out, c_in, c_noise)``.

    The backbone runs in the dtype of its parameters: its inputs ``c_in·x`` and ``c_noise`` are computed in
    that dtype, as EDM's preconditioning computes them in float32 (``training/networks.py``). The result is
    returned in that dtype, except for float64 input (the sampler state of evaluation, as in EDM's
    ``generate.py``): then ``c_skip·x + c_out·F`` is formed in float64 from float64 coefficients and returned
    in float64, so the skip path keeps the state's precision (EDM forms it in float32; the two differ by
    float32 round-off only).
    """

    sigma_min: float = 0.0
    sigma_max: float = math.inf

    def __init__(self, backbone: nn.Module, label_dim: int | None = None):
        super().__init__()
        self.model = backbone
        self.label_dim = int(label_dim if label_dim is not None else getattr(backbone, "label_dim", 0))

    def coefficients(self, sigma: torch.Tensor):  # pragma: no cover - abstract
        raise NotImplementedError

    def _dtype(self, x: torch.Tensor) -> torch.dtype:
        param = next(self.model.parameters(), None)
        return param.dtype if param is not None else x.dtype

    def forward(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        dtype = self._dtype(x)
        wide = x.dtype == torch.float64 and dtype != torch.float64  # float64 state, narrower network
        x_in = x.to(dtype)
        sigma_in = as_sigma(sigma, x_in, dtype)  # (B, 1, ..., 1)
        labels = one_hot_labels(class_labels, x.shape[0], self.label_dim, x.device, dtype)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma_in)
        f = self.model(c_in * x_in, c_noise.reshape(-1), class_labels=labels)  # like x
        if wide:
            c_skip, c_out, _, _ = self.coefficients(as_sigma(sigma, x, torch.float64))
            return c_skip * x + c_out * f.to(torch.float64)
        return c_skip * x_in + c_out * f.to(dtype)


def _check_range(sigma_min, sigma_max, low: float | None) -> None:
    """The σ range a network supports: ``low <= sigma_min <= sigma_max`` (``low`` None: ``0 < sigma_min``)."""
    bottom = sigma_min >= low if low is not None else sigma_min > 0
    if not (bottom and sigma_min <= sigma_max):
        need = f"{low:g} <= sigma_min" if low is not None else "0 < sigma_min"
        raise ValueError(f"need {need} <= sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")


class EDMPrecond(Precond):
    """EDM preconditioning (Karras et al. 2022, Table 1, "Ours")."""

    def __init__(self, backbone: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.0,
                 sigma_max: float = math.inf, label_dim: int | None = None):
        super().__init__(backbone, label_dim)
        if not sigma_data > 0:  # c_in = 1/√(σ² + σ_data²) and c_skip would silently use |σ_data|
            raise ValueError(f"sigma_data (the standard deviation of the training data) must be positive, "
                             f"got {sigma_data}")
        _check_range(sigma_min, sigma_max, low=0.0)
        self.sigma_data = float(sigma_data)  # std of the data the net is trained on
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def coefficients(self, sigma):
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


class VPPrecond(Precond):
    """Variance-preserving preconditioning (Song et al. 2021, as in EDM's ``VPPrecond``)."""

    def __init__(self, backbone: nn.Module, beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000,
                 epsilon_t: float = 1e-5, label_dim: int | None = None):
        super().__init__(backbone, label_dim)
        problems = [f"{name} must be {what}, got {value}" for name, value, ok, what in (
            ("beta_d", beta_d, beta_d > 0, "positive"), ("beta_min", beta_min, beta_min >= 0, "at least 0"),
            ("M", M, M >= 1, "at least 1"), ("epsilon_t", epsilon_t, 0 < epsilon_t < 1, "in (0, 1)")) if not ok]
        if problems:
            raise ValueError("; ".join(problems))
        self.beta_d, self.beta_min, self.M, self.epsilon_t = float(beta_d), float(beta_min), int(M), float(epsilon_t)
        # EDM computes these in float32: 2**-10 and 152.16697692871094.
        self.sigma_min = float(self.sigma(torch.tensor(epsilon_t, dtype=torch.float32)))
        self.sigma_max = float(self.sigma(torch.tensor(1.0, dtype=torch.float32)))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ(t) = √(exp(½β_d t² + β_min t) − 1)."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * t**2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma: torch.Tensor) -> torch.Tensor:
        """t(σ) = (√(β_min² + 2β_d ln(1+σ²)) − β_min) / β_d."""
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma):
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise


class VEPrecond(Precond):
    """Variance-exploding preconditioning (Song et al. 2021, as in EDM's ``VEPrecond``)."""

    def __init__(self, backbone: nn.Module, sigma_min: float = 0.02, sigma_max: float = 100.0,
                 label_dim: int | None = None):
        super().__init__(backbone, label_dim)
        _check_range(sigma_min, sigma_max, low=None)  # c_noise = ln(σ/2): σ_min > 0
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def coefficients(self, sigma):
        c_skip = torch.ones_like(sigma)
        c_out = sigma
        c_in = torch.ones_like(sigma)
        c_noise = (0.5 * sigma).log()
        return c_skip, c_out, c_in, c_noise
