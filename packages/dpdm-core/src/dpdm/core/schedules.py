"""Noise schedules for sampling: ``(n, **options) -> sigmas`` (float64, descending, ending in 0)."""

from __future__ import annotations

import torch

from .utils import accepts

# sigma_min per number of steps, Table 7 of the DPDM paper (10 or more steps: 1e-4).
DPDM_SIGMA_MIN = {4: 0.3, 5: 0.2, 6: 0.1, 7: 0.015, 8: 0.0035, 9: 0.00055}
DPDM_SIGMA_MIN_MANY = 0.0001
DPDM_RHO = 40.0  # Appendix B.1 of the DPDM paper (EDM's ODE schedule uses 7)
DPDM_SIGMA_MAX = 80.0  # Appendix B.1


def _check(n, sigma_min, sigma_max, rho):
    if int(n) != n or n < 1:
        raise ValueError(f"a schedule needs n >= 1 steps, got {n!r}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")


def karras(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
           device=None) -> torch.Tensor:
    """EDM time steps (Karras et al. 2022, Eq. 5): σ_i = (σ_max^{1/ρ} + i/(n−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ.

    Computed in float64 exactly as EDM's ``edm_sampler`` does, with σ_n = 0 appended.
    ``n = 1`` gives ``[sigma_max, 0]`` (EDM's formula divides by zero there).
    """
    _check(n, sigma_min, sigma_max, rho)
    if n == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float64, device=device)
    step_indices = torch.arange(n, dtype=torch.float64, device=device)
    t = (sigma_max ** (1 / rho) + step_indices / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros_like(t[:1])])  # (n + 1,)


def dpdm_sigma_min(n: int) -> float:
    """The DPDM paper's sigma_min for an ``n``-step schedule (Table 7); below 4 steps the 4-step value."""
    if n >= 10:
        return DPDM_SIGMA_MIN_MANY
    return DPDM_SIGMA_MIN[max(int(n), 4)]


def dpdm(n: int, sigma_min: float | None = None, sigma_max: float = DPDM_SIGMA_MAX, rho: float = DPDM_RHO,
         device=None) -> torch.Tensor:
    """The DPDM sampling schedule (Appendix B.1): σ_k = (σ_max^{1/ρ} + k/(n−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ for
    k = 0 … n−1, then 0, with the paper's σ_max = 80, **ρ = 40** and a step-count-dependent ``sigma_min``
    (Table 7: 4→0.3, 5→0.2, 6→0.1, 7→0.015, 8→0.0035, 9→0.00055, ≥10→1e-4; below 4 steps the 4-step
    value). Every value can be overridden (``rho=7`` gives EDM's spacing, the ablation in the README).

    At 8 steps: [80, 22.1, 5.82, 1.47, 0.35, 0.080, 0.017, 0.0035, 0]; with ρ = 7 the middle levels sit
    much higher ([80, 35.7, 14.4, 5.03, 1.47, 0.33, 0.049, 0.0035, 0]). The first and last positive levels
    are exactly ``sigma_max`` and ``sigma_min``.

    With ``n = 1`` the single step is at ``sigma_max``; lower ``sigma_max`` (e.g. 2.5) is often
    better for one-step sampling.
    """
    if sigma_min is None:
        sigma_min = min(dpdm_sigma_min(n), sigma_max)
    t = karras(n, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, device=device)
    # The ends exactly as given: with ρ = 40, (80^{1/40})^{40} is 80.00000000000006 in float64.
    t[0] = sigma_max
    if n > 1:
        t[n - 1] = sigma_min
    return t


def network_sigma_range(denoiser) -> tuple[float, float] | None:
    """``(sigma_min, sigma_max)`` the denoiser declares (``precond.Precond`` does: EDM 0–inf, VE 0.02–100 for
    EDM's checkpoints, VP σ(ε_t)–σ(1)), looked up on a DDP wrapper's ``module`` too; None when it declares none
    (e.g. a plugin preconditioning), which means no clamp."""
    for obj in (denoiser, getattr(denoiser, "module", None)):
        lo, hi = getattr(obj, "sigma_min", None), getattr(obj, "sigma_max", None)
        if lo is not None and hi is not None:
            return float(lo), float(hi)
    return None


def clamp_to_network(schedule, denoiser, *, takes_range: bool | None = None):
    """``schedule`` (``(n, **options) -> sigmas``) with its ends clamped to the denoiser's σ range, as EDM's
    ``generate.py`` does before it builds the steps: σ_min ← max(σ_min, net.sigma_min), σ_max ← min(σ_max,
    net.sigma_max). EDM's VE checkpoints support σ ≥ 0.02, so a Karras schedule down to 0.002 ends at 0.02
    for them (and starts at 80, below their 100); EDM-preconditioned nets (0–inf) are unchanged.

    The ends are those of the schedule as built (its smallest and largest positive σ, e.g. the DPDM schedule's
    per-step-count σ_min); when one lies outside the range, the schedule is rebuilt with ``sigma_min`` and
    ``sigma_max`` set to the clamped ends, so its spacing is that of the clamped interval, as in EDM. A σ_max
    below the network's σ_min is raised to it, and σ_min never exceeds σ_max. A schedule that takes no
    ``sigma_min``/``sigma_max`` options has its positive σ clamped one by one (``takes_range``: whether it
    does; default: read from its signature). Within the range (and with no range declared) the schedule is
    returned as built, bit for bit.
    """
    rng = network_sigma_range(denoiser)
    if rng is None:
        return schedule
    lo, hi = rng
    if takes_range is None:
        takes_range = accepts(schedule, "sigma_min", "sigma_max", var_keyword=True)

    def clamped(n, **options) -> torch.Tensor:
        sigmas = schedule(n, **options)
        positive = sigmas[sigmas > 0]
        if len(positive) == 0:
            return sigmas
        s_max, s_min = float(positive.max()), float(positive.min())
        tol = 1e-12
        if s_min >= lo * (1 - tol) and s_max <= hi * (1 + tol):
            return sigmas
        new_max = min(max(s_max, lo), hi)
        new_min = min(max(s_min, lo), new_max)
        if takes_range:
            return schedule(n, **{**options, "sigma_min": new_min, "sigma_max": new_max})
        return torch.where(sigmas > 0, sigmas.clamp(new_min, new_max), sigmas)

    return clamped
