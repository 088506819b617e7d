"""Samplers: pure functions ``(denoiser, x, sigmas, *, generator=None, callback=None,
class_labels=None, **options) -> x`` (STYLE habit 2).

``x`` is the initial state at ``sigmas[0]`` (unit noise already multiplied by ``sigmas[0]``),
``sigmas`` descends and ends in 0. The dtype of ``x`` is kept: the denoiser's output is cast
to it. Each sampler carries ``nfe(num_steps)``, the number of denoiser evaluations for a
schedule of ``num_steps`` positive sigmas (``len(sigmas) - 1``).
"""

from __future__ import annotations

import math

import torch


def _nfe(fn):
    def attach(sampler):
        sampler.nfe = fn
        return sampler

    return attach


def noise_like(x: torch.Tensor, generator=None) -> torch.Tensor:
    """Standard normal noise shaped like ``x`` from ``generator``: a ``torch.Generator`` (or None), or
    ``generation.ItemGenerators``, one generator per item, which evaluation passes so that each item's
    noise is independent of the batch it is in. Plugin samplers should draw their noise through this.

    The noise is drawn in float32 and cast to ``x.dtype``, so a float64 sampler state (evaluation's default,
    ``generation.generate_items``) sees the same noise as a float32 one, up to the cast. (EDM's stochastic
    sampler draws ``randn_like`` of its float64 state instead; torch's float64 draws are other numbers.)"""
    if hasattr(generator, "randn"):
        return generator.randn(tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)


def _denoise(denoiser, x, sigma, class_labels):
    return denoiser(x, sigma, class_labels=class_labels).to(x.dtype)


def _report(callback, i, x, sigma, denoised):
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})


@_nfe(lambda n: n)
@torch.no_grad()
def sample_dpdm(denoiser, x, sigmas, *, generator=None, callback=None, class_labels=None):
    """Algorithm 2 of the DPDM paper: start at 0; for each σ_k add σ_k·ε and denoise.

    The given ``x`` (= σ_1·ε) is the first noisy input, i.e. ``0 + σ_1·ε``. Later steps draw
    fresh noise from ``generator``. Zero sigmas are skipped. NFE = number of positive sigmas.
    """
    sigmas = sigmas.to(x.device)
    positive = [s for s in sigmas if s > 0]
    out = x
    for i, sigma in enumerate(positive):
        noisy = x if i == 0 else out + sigma.to(x.dtype) * noise_like(x, generator)
        out = _denoise(denoiser, noisy, sigma.to(x.dtype), class_labels)
        _report(callback, i, noisy, sigma, out)
    return out


@_nfe(lambda n: n)
@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, generator=None, callback=None, class_labels=None):
    """Deterministic Euler on the probability-flow ODE dx/dσ = (x − D(x, σ))/σ (Karras et al. 2022, Eq. 3)."""
    sigmas = sigmas.to(device=x.device, dtype=x.dtype)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(denoiser, x, sigma, class_labels)
        _report(callback, i, x, sigma, denoised)
        x = x + (sigma_next - sigma) * (x - denoised) / sigma
    return x


def _churn(x, sigma, n, generator, s_churn, s_min, s_max, s_noise):
    """EDM's stochastic step (Algorithm 2, lines 4-6): raise σ to σ̂ = σ(1+γ) and add matching noise.

    ``randn`` is drawn every step, even when γ = 0, as in EDM's ``edm_sampler``.
    """
    gamma = min(s_churn / n, math.sqrt(2) - 1) if s_min <= float(sigma) <= s_max else 0.0
    sigma_hat = sigma + gamma * sigma
    eps = noise_like(x, generator)
    x_hat = x + (sigma_hat**2 - sigma**2).sqrt() * s_noise * eps
    return x_hat, sigma_hat


@_nfe(lambda n: 2 * n - 1)
@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, generator=None, callback=None, class_labels=None,
                s_churn: float = 0.0, s_min: float = 0.0, s_max: float = float("inf"), s_noise: float = 1.0):
    """EDM's Heun sampler (Karras et al. 2022, Algorithms 1 and 2); deterministic with ``s_churn=0``.

    The last step (to σ = 0) is a plain Euler step, so NFE = 2N − 1.
    """
    sigmas = sigmas.to(device=x.device, dtype=x.dtype)
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x_hat, sigma_hat = _churn(x, sigma, n, generator, s_churn, s_min, s_max, s_noise) if s_churn > 0 else (x, sigma)
        denoised = _denoise(denoiser, x_hat, sigma_hat, class_labels)
        _report(callback, i, x_hat, sigma_hat, denoised)
        d = (x_hat - denoised) / sigma_hat
        x = x_hat + (sigma_next - sigma_hat) * d
        if sigma_next > 0:
            d_next = (x - _denoise(denoiser, x, sigma_next, class_labels)) / sigma_next
            x = x_hat + (sigma_next - sigma_hat) * (d + d_next) / 2
    return x


@_nfe(lambda n: n)
@torch.no_grad()
def sample_euler_stochastic(denoiser, x, sigmas, *, generator=None, callback=None, class_labels=None,
                            s_churn: float = 0.0, s_min: float = 0.0, s_max: float = float("inf"),
                            s_noise: float = 1.0):
    """Euler with EDM's churn (S_churn, S_min, S_max, S_noise; Karras et al. 2022, Algorithm 2 without the
    second-order correction). With ``s_churn=0`` it equals ``euler`` (but still consumes noise)."""
    sigmas = sigmas.to(device=x.device, dtype=x.dtype)
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x_hat, sigma_hat = _churn(x, sigma, n, generator, s_churn, s_min, s_max, s_noise)
        denoised = _denoise(denoiser, x_hat, sigma_hat, class_labels)
        _report(callback, i, x_hat, sigma_hat, denoised)
        x = x_hat + (sigma_next - sigma_hat) * (x_hat - denoised) / sigma_hat
    return x


@_nfe(lambda n: n)
@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, generator=None, callback=None, class_labels=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in the σ parameterisation, t = −ln σ.

    The first step and the last step (to σ = 0) are first order.
    """
    sigmas = sigmas.to(device=x.device, dtype=x.dtype)
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(denoiser, x, sigma, class_labels)
        _report(callback, i, x, sigma, denoised)
        if sigma_next == 0:
            x = denoised
            break
        h = sigma.log() - sigma_next.log()  # t_next − t
        if old_denoised is None:
            d = denoised
        else:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigma_next / sigma) * x - torch.expm1(-h) * d
        old_denoised, h_last = denoised, h
    return x


SAMPLERS = {
    "dpdm": sample_dpdm,
    "euler": sample_euler,
    "heun": sample_heun,
    "euler-stochastic": sample_euler_stochastic,
    "dpmpp-2m": sample_dpmpp_2m,
}


def steps_for_nfe(sampler, nfe: int) -> int | None:
    """The number of schedule steps that gives exactly ``nfe`` evaluations, or None if none does.

    ``sampler`` is a registered sampler or its ``nfe`` function."""
    nfe_of = getattr(sampler, "nfe", sampler)
    for n in range(1, nfe + 1):
        if nfe_of(n) == nfe:
            return n
    return None
