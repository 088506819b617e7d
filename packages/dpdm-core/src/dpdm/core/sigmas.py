"""Training-time noise-level distributions: ``draw(batch, generator, device) -> sigma (B,)``.

- ``lognormal``: ln σ ~ N(P_mean, P_std²), EDM's training distribution (Karras et al. 2022, Sec. 5).
- ``log-uniform``: ln σ ~ U(ln σ_min, ln σ_max), which the DPDM student prefers at large σ.
- ``fixed``: a single σ (e.g. σ_max for the data-free IKL generator).
"""

from __future__ import annotations

import math

import attrs
import torch


@attrs.define
class SigmaDist:
    """A distribution over σ. ``kind`` is one of ``lognormal``, ``log-uniform``, ``fixed``."""

    kind: str = "lognormal"
    P_mean: float = -1.2  # lognormal: mean of ln σ
    P_std: float = 1.2  # lognormal: std of ln σ
    min: float = 0.002  # log-uniform: lower end; lognormal: clamp
    max: float = 80.0  # log-uniform: upper end; lognormal: clamp; fixed: the value

    KINDS = ("lognormal", "log-uniform", "fixed")

    def __attrs_post_init__(self):
        if self.kind not in self.KINDS:
            raise ValueError(f"unknown sigma distribution {self.kind!r}; choose one of {', '.join(self.KINDS)}")
        if not self.P_std >= 0:  # a standard deviation (ln σ ~ N(P_mean, P_std²))
            raise ValueError(f"P_std (the standard deviation of ln σ) must be at least 0, got {self.P_std}")
        if not 0 < self.min <= self.max:
            raise ValueError(f"need 0 < min <= max, got min={self.min}, max={self.max}")

    def draw(self, batch: int, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
        if self.kind == "fixed":
            return torch.full((batch,), self.max, device=device, dtype=dtype)
        if self.kind == "lognormal":
            rnd = torch.randn(batch, generator=generator, device=device, dtype=dtype)
            return (rnd * self.P_std + self.P_mean).exp().clamp(self.min, self.max)
        u = torch.rand(batch, generator=generator, device=device, dtype=dtype)
        return (math.log(self.min) + u * (math.log(self.max) - math.log(self.min))).exp()
