"""Samplers against closed forms for Gaussian data N(mu, s²) per dimension, whose exact denoiser is
D(x; σ) = mu + s²/(s²+σ²)·(x − mu) and whose PF-ODE solution is x(σ) = mu + (x_T − mu)·√(s²+σ²)/√(s²+σ_T²)."""

from __future__ import annotations

import math

import pytest
import torch

from dpdm.core.samplers import (SAMPLERS, sample_dpdm, sample_dpmpp_2m, sample_euler, sample_euler_stochastic,
                                sample_heun, steps_for_nfe)
from dpdm.core.schedules import dpdm as dpdm_schedule
from dpdm.core.schedules import karras

MU, S = 0.3, 0.5


def exact_denoiser(mu=MU, s=S):
    def D(x, sigma, class_labels=None):
        return mu + s**2 / (s**2 + sigma**2) * (x - mu)

    return D


def pf_ode_solution(x_T, sigma_T, mu=MU, s=S):
    return mu + (x_T - mu) * s / math.sqrt(s**2 + sigma_T**2)


class Counting:
    def __init__(self, D):
        self.D, self.calls = D, 0

    def __call__(self, x, sigma, class_labels=None):
        self.calls += 1
        return self.D(x, sigma, class_labels=class_labels)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def latents(shape=(4096,), seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=gen(seed), dtype=dtype)


def rel_err(out, ref):
    return float((out - ref).norm() / ref.norm())


# --- contract: dtype, shape, NFE, callback -------------------------------------------------------------------

def test_nfe_formulas():
    expected = {"dpdm": lambda n: n, "euler": lambda n: n, "heun": lambda n: 2 * n - 1,
                "euler-stochastic": lambda n: n, "dpmpp-2m": lambda n: n}
    assert set(SAMPLERS) == set(expected)
    for name, f in expected.items():
        for n in range(1, 30):
            assert SAMPLERS[name].nfe(n) == f(n), (name, n)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("n", [1, 2, 5, 18])
def test_counted_nfe_shape_dtype(name, n):
    sampler = SAMPLERS[name]
    sigmas = karras(n)
    for dtype in (torch.float64, torch.float32):
        D = Counting(exact_denoiser())
        x = latents((3, 2, 4, 4), dtype=dtype) * sigmas[0].to(dtype)
        out = sampler(D, x, sigmas, generator=gen(1))
        assert out.dtype == dtype and out.shape == x.shape
        assert D.calls == sampler.nfe(len(sigmas) - 1)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_denoiser_output_cast_to_state_dtype(name):
    """A float32 denoiser (like a float32 network) does not change the float64 state."""
    D64 = exact_denoiser()

    def D32(x, sigma, class_labels=None):
        return D64(x, sigma).float()

    x = latents((64,)) * 80
    out = SAMPLERS[name](D32, x, karras(6), generator=gen(2))
    assert out.dtype == torch.float64


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_callback_once_per_step(name):
    sigmas = karras(7)
    seen = []
    x = latents((16,)) * sigmas[0]
    SAMPLERS[name](exact_denoiser(), x, sigmas, generator=gen(3), callback=seen.append)
    assert len(seen) == 7
    for i, info in enumerate(seen):
        assert set(info) == {"i", "x", "sigma", "denoised"}
        assert info["i"] == i
        assert info["x"].shape == x.shape and info["denoised"].shape == x.shape
    if name != "euler-stochastic":  # no churn: the sigma reported is the schedule's
        assert [float(info["sigma"]) for info in seen] == sigmas[:-1].tolist()
    # the reported denoised value is D at the reported (x, sigma)
    for info in seen:
        torch.testing.assert_close(info["denoised"], exact_denoiser()(info["x"], info["sigma"]), rtol=1e-12, atol=1e-12)


def test_class_labels_are_passed_through():
    got = []

    def D(x, sigma, class_labels=None):
        got.append(class_labels)
        return exact_denoiser()(x, sigma)

    labels = torch.tensor([3, 1])
    for name, sampler in SAMPLERS.items():
        got.clear()
        sampler(D, latents((2, 3)) * 80, karras(3), generator=gen(0), class_labels=labels)
        assert got and all(lab is labels for lab in got), name


def test_steps_for_nfe():
    assert steps_for_nfe(sample_heun, 5) == 3
    assert steps_for_nfe(sample_heun, 35) == 18
    assert steps_for_nfe(sample_heun, 4) is None
    assert steps_for_nfe(sample_heun, 1) == 1
    assert steps_for_nfe(sample_euler, 7) == 7
    assert steps_for_nfe(sample_dpdm, 4) == 4
    assert steps_for_nfe(sample_dpmpp_2m, 1) == 1


# --- deterministic ODE samplers ------------------------------------------------------------------------------

def edm_heun_reference(D, x, t, s_churn=0.0, s_min=0.0, s_max=float("inf"), s_noise=1.0, generator=None):
    """EDM's edm_sampler loop (README §6), written out independently."""
    n = len(t) - 1
    for i in range(n):
        t_cur, t_next = t[i], t[i + 1]
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_min <= float(t_cur) <= s_max else 0.0
        t_hat = t_cur + gamma * t_cur
        # noise drawn in float32 and cast to the state (samplers.noise_like; EDM draws randn_like of the state)
        eps = torch.randn(x.shape, generator=generator).to(x.dtype) if generator is not None else 0.0
        x_hat = x + (t_hat**2 - t_cur**2).sqrt() * s_noise * eps
        d_cur = (x_hat - D(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < n - 1:
            d_prime = (x_next - D(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
    return x


def test_heun_matches_edm_reference_deterministic():
    t = karras(18)
    x = latents() * t[0]
    out = sample_heun(exact_denoiser(), x, t)
    torch.testing.assert_close(out, edm_heun_reference(exact_denoiser(), x, t), rtol=1e-13, atol=1e-14)


def test_heun_matches_edm_reference_stochastic():
    t = karras(10)
    x = latents() * t[0]
    kw = dict(s_churn=40.0, s_min=0.05, s_max=50.0, s_noise=1.003)
    out = sample_heun(exact_denoiser(), x, t, generator=gen(9), **kw)
    ref = edm_heun_reference(exact_denoiser(), x, t, generator=gen(9), **kw)
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-14)
    assert not torch.allclose(out, sample_heun(exact_denoiser(), x, t))


# Relative L2 errors against the closed-form PF-ODE solution (mu=0.3, s=0.5, 4096 latents, seed 0),
# measured: heun 4.78e-2 (18 steps), 1.06e-2 (36); dpmpp-2m 5.39e-2, 1.13e-2; euler 1.33e-1, 6.75e-2.
# An independent scalar Heun gives the same 18-step error (5.5% for mu=0): it is the discretisation
# error of 18 Karras steps on this problem, not a bug. Heun converges to 1e-3 by ~128 steps.
@pytest.mark.parametrize("name,n,tol", [("heun", 18, 0.055), ("heun", 36, 0.012), ("heun", 128, 1e-3),
                                        ("dpmpp-2m", 18, 0.06), ("dpmpp-2m", 36, 0.013), ("dpmpp-2m", 128, 1e-3),
                                        ("euler", 18, 0.15), ("euler", 128, 0.02)])
def test_pf_ode_closed_form(name, n, tol):
    t = karras(n)
    x_T = latents() * t[0]
    out = SAMPLERS[name](exact_denoiser(), x_T, t)
    assert rel_err(out, pf_ode_solution(x_T, float(t[0]))) < tol


@pytest.mark.parametrize("name,order", [("heun", 2), ("dpmpp-2m", 2), ("euler", 1)])
def test_convergence_order(name, order):
    x_T = latents() * 80.0
    ref = pf_ode_solution(x_T, 80.0)
    errs = [rel_err(SAMPLERS[name](exact_denoiser(), x_T, karras(n)), ref) for n in (32, 64, 128)]
    for coarse, fine in zip(errs, errs[1:]):
        ratio = coarse / fine
        assert 2**order * 0.8 < ratio < 2**order * 1.25, (errs, ratio)


@pytest.mark.parametrize("n", [6, 10, 18, 40])
def test_dpmpp_2m_beats_euler(n):
    t = karras(n)
    x_T = latents() * t[0]
    ref = pf_ode_solution(x_T, float(t[0]))
    e_euler = rel_err(sample_euler(exact_denoiser(), x_T, t), ref)
    e_2m = rel_err(sample_dpmpp_2m(exact_denoiser(), x_T, t), ref)
    assert e_2m < e_euler


def test_dpmpp_2m_last_step_returns_denoised():
    t = karras(5)
    seen = []
    out = sample_dpmpp_2m(exact_denoiser(), latents((8,)) * t[0], t, callback=seen.append)
    assert torch.equal(out, seen[-1]["denoised"])


def test_euler_single_step_is_denoiser():
    x = latents((8,)) * 80
    out = sample_euler(exact_denoiser(), x, karras(1))
    # x − σ·(x − D)/σ: cancellation against |x| ~ 80 leaves ~80·eps of rounding
    torch.testing.assert_close(out, exact_denoiser()(x, torch.tensor(80.0, dtype=torch.float64)),
                               rtol=0, atol=1e-12)


# --- euler-stochastic ----------------------------------------------------------------------------------------

def test_euler_stochastic_without_churn_equals_euler():
    t = karras(12)
    x = latents() * t[0]
    assert torch.equal(sample_euler_stochastic(exact_denoiser(), x, t, generator=gen(4)),
                       sample_euler(exact_denoiser(), x, t))


def test_euler_stochastic_with_churn():
    t = karras(12)
    x = latents() * t[0]
    kw = dict(s_churn=10.0, s_min=0.05, s_max=50.0, s_noise=1.003)
    a = sample_euler_stochastic(exact_denoiser(), x, t, generator=gen(5), **kw)
    b = sample_euler_stochastic(exact_denoiser(), x, t, generator=gen(5), **kw)
    c = sample_euler_stochastic(exact_denoiser(), x, t, generator=gen(6), **kw)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert (a - sample_euler(exact_denoiser(), x, t)).abs().max() > 1e-3


def test_euler_stochastic_churn_step_closed_form():
    """One step at σ with churn: σ̂ = σ(1+γ), x̂ = x + √(σ̂²−σ²)·S_noise·ε, x' = x̂ + (σ_next−σ̂)(x̂−D(x̂,σ̂))/σ̂."""
    t = torch.tensor([2.0, 0.0], dtype=torch.float64)
    x = latents((32,)) * 2.0
    s_churn, s_noise = 0.3, 1.01
    seen = []
    out = sample_euler_stochastic(exact_denoiser(), x, t, generator=gen(7), callback=seen.append,
                                  s_churn=s_churn, s_noise=s_noise)
    eps = torch.randn(x.shape, generator=gen(7)).double()  # float32 draw, cast (samplers.noise_like)
    sigma_hat = 2.0 * (1 + min(s_churn, math.sqrt(2) - 1))
    x_hat = x + math.sqrt(sigma_hat**2 - 4.0) * s_noise * eps
    assert float(seen[0]["sigma"]) == pytest.approx(sigma_hat, rel=1e-15)
    torch.testing.assert_close(seen[0]["x"], x_hat, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(out, exact_denoiser()(x_hat, sigma_hat), rtol=1e-13, atol=1e-14)


# --- dpdm (Algorithm 2): Gaussian output with a recursion for mean and variance ---------------------------

def dpdm_moments(sigmas, mu=MU, s=S):
    m, v = 0.0, 0.0
    for sigma in sigmas:
        c = s**2 / (s**2 + sigma**2)
        m, v = mu + c * (m - mu), c**2 * (v + sigma**2)
    return m, v


def _check_moments(samples, m, v, k=5.0):
    n = samples.numel()
    mean, var = float(samples.mean()), float(samples.var())
    se_mean, se_var = math.sqrt(v / n), v * math.sqrt(2 / (n - 1))
    assert abs(mean - m) < k * se_mean, (mean, m, se_mean)
    assert abs(var - v) < k * se_var, (var, v, se_var)


@pytest.mark.parametrize("n", [2, 4, 6])
def test_dpdm_sampler_moments(n):
    sigmas = dpdm_schedule(n)
    positive = [float(s) for s in sigmas if s > 0]
    N = 200_000
    x = latents((N,), seed=11) * sigmas[0]
    out = sample_dpdm(exact_denoiser(), x, sigmas, generator=gen(12))
    m, v = dpdm_moments(positive)
    _check_moments(out, m, v)
    assert out.dtype == torch.float64


def test_dpdm_moment_recursion_is_discriminative():
    """The test above could not pass by accident: other schedules give clearly different moments."""
    m4, v4 = dpdm_moments([float(s) for s in dpdm_schedule(4)[:-1]])
    m6, v6 = dpdm_moments([float(s) for s in dpdm_schedule(6)[:-1]])
    assert abs(v4 - v6) / v6 > 0.05 and abs(v4 - S**2) / S**2 > 0.05


def test_dpdm_sampler_one_step_is_weak_denoiser():
    sigma = 80.0
    N = 200_000
    x = latents((N,), seed=13) * sigma
    out = sample_dpdm(exact_denoiser(), x, torch.tensor([sigma, 0.0], dtype=torch.float64), generator=gen(14))
    c = S**2 / (S**2 + sigma**2)
    m, v = MU + c * (0 - MU), c**2 * sigma**2
    _check_moments(out, m, v)
    # Gaussian shape: 68.27% within one standard deviation
    inside = float(((out - m).abs() < math.sqrt(v)).double().mean())
    assert abs(inside - 0.682689) < 5 * math.sqrt(0.682689 * 0.317311 / N)
    # and nowhere near the data distribution N(MU, S²): the variance is ~1e-4 of S²
    assert float(out.var()) < 1e-3 * S**2
    # deterministic given x: a single step draws no noise
    assert torch.equal(out, exact_denoiser()(x, torch.tensor(sigma, dtype=torch.float64)))


def test_dpdm_sampler_steps_add_fresh_noise():
    sigmas = torch.tensor([10.0, 1.0, 0.1, 0.0], dtype=torch.float64)
    x = latents((64,)) * 10.0
    seen = []
    out = sample_dpdm(exact_denoiser(), x, sigmas, generator=gen(15), callback=seen.append)
    g = gen(15)
    D = exact_denoiser()
    y = D(x, sigmas[0])
    for sigma in sigmas[1:3]:
        y = D(y + sigma * torch.randn(x.shape, generator=g).double(), sigma)  # float32 draw, cast to the state
    torch.testing.assert_close(out, y, rtol=1e-14, atol=1e-14)
    assert [float(i["sigma"]) for i in seen] == [10.0, 1.0, 0.1]
    assert torch.equal(seen[0]["x"], x)
    # reproducible for a fixed generator, different for another seed
    assert torch.equal(out, sample_dpdm(D, x, sigmas, generator=gen(15)))
    assert not torch.allclose(out, sample_dpdm(D, x, sigmas, generator=gen(16)))


# --- the public registry -------------------------------------------------------------------------------------

def test_registry_lookup():
    from dpdm.core import get
    from dpdm.core.precond import EDMPrecond, VEPrecond, VPPrecond
    from dpdm.core.schedules import dpdm, karras as karras_fn

    assert get("schedule", "karras") is karras_fn
    assert get("schedule", "dpdm") is dpdm
    for name, fn in SAMPLERS.items():
        assert get("sampler", name) is fn
    assert get("preconditioning", "edm") is EDMPrecond
    assert get("preconditioning", "vp") is VPPrecond
    assert get("preconditioning", "ve") is VEPrecond
    t = get("schedule", "karras")(18)
    out = get("sampler", "heun")(exact_denoiser(), latents() * t[0], t)
    assert rel_err(out, pf_ode_solution(latents() * t[0], 80.0)) < 0.055
