"""The smoothed-KL gradient against the closed form for Gaussian data (DPDM Eq. 3.2-3.4).

Data N(μ, s²); a linear student d(x) = μ + a(x − μ) fed x_t = x0 + σε outputs N(μ, a²(s²+σ²)).
Re-noised at the same σ it matches the σ-smoothed data iff a²(s²+σ²) + σ² = s² + σ², i.e.
a* = s/√(s²+σ²). The diffusion model's posterior mean has a = s²/(s²+σ²) < a* (it shrinks the
variance: the "weak denoiser"), so the divergence must push a up from there.
"""

import math

import pytest
import torch
from torch import nn

from dpdm.core.train.distill import DPDM
from dpdm.core.divergences import IKL, SmoothedKL
from dpdm.core.losses import EDMLoss
from dpdm.core.precond import EDMPrecond
from dpdm.core.sigmas import SigmaDist

MU, S, SIGMA = 0.3, 0.8, 1.5


def gaussian_denoiser(var):
    """Exact denoiser E[x0 | x_t] for data N(MU, var)."""
    return lambda x, sigma, class_labels=None: MU + var / (var + sigma**2) * (x - MU)


def surrogate_grad(a_value, normalize=False, n=400_000, seed=0, weighting="diffusion", dim=1):
    """d/da of the batch-mean surrogate, with the exact teacher and the exact fake for the current a.

    ``dim`` iid dimensions per sample (the normaliser averages over them)."""
    g = torch.Generator().manual_seed(seed)
    div = SmoothedKL(SigmaDist("fixed", max=SIGMA), weighting=weighting, normalize=normalize)
    a = torch.tensor(a_value, dtype=torch.float64, requires_grad=True)
    x0 = MU + S * torch.randn(n, dim, generator=g, dtype=torch.float64)
    x_t, sigma = div.student_input(x0, g)
    x0_hat = MU + a * (x_t - MU)
    sigma = div.renoise_sigma(sigma, g)
    x_t_hat = x0_hat.detach() + sigma[:, None] * torch.randn(n, dim, generator=g, dtype=torch.float64)
    s = sigma[:, None]
    d_teacher = gaussian_denoiser(S**2)(x_t_hat, s)
    v_fake = a_value**2 * (S**2 + SIGMA**2)
    d_fake = gaussian_denoiser(v_fake)(x_t_hat, s)
    div(x0_hat, sigma, d_teacher, d_fake).mean().backward()
    return float(a.grad)


def test_gradient_matches_closed_form():
    # dL/da = (c_fake − c_teacher)·a·(s²+σ²) with c = var/(var+σ²) and w(σ) = σ².
    for a in (0.2, 0.5, 0.9):
        v = a**2 * (S**2 + SIGMA**2)
        expected = (v / (v + SIGMA**2) - S**2 / (S**2 + SIGMA**2)) * a * (S**2 + SIGMA**2)
        got = surrogate_grad(a)
        assert got == pytest.approx(expected, rel=0.02, abs=2e-4)


def test_sign_pushes_posterior_mean_up_and_identity_down():
    a_dm = S**2 / (S**2 + SIGMA**2)  # the teacher's own (posterior-mean) denoiser
    assert surrogate_grad(a_dm) < 0  # descent increases a: restores the variance
    assert surrogate_grad(1.0) > 0  # too much variance: descent decreases a


def test_score_weighting_is_diffusion_weighting_over_sigma_squared():
    a = 0.4
    assert surrogate_grad(a, weighting="score") == pytest.approx(surrogate_grad(a) / SIGMA**2, rel=1e-9)


@pytest.mark.parametrize("normalize", [False, True])
def test_descent_drives_a_to_the_distribution_matching_value(normalize):
    a_star = S / math.sqrt(S**2 + SIGMA**2)
    a = S**2 / (S**2 + SIGMA**2)
    # With the normaliser each sample's gradient is divided by its mean |x̂0 − D_teacher|, which
    # only averages out over several dimensions, so use 16 iid dimensions there.
    dim, lr = (16, 0.02) if normalize else (1, 0.3)
    for step in range(100):
        a -= lr * surrogate_grad(a, normalize=normalize, n=40_000 // dim, seed=step, dim=dim)
    assert a == pytest.approx(a_star, abs=0.01)
    assert a_star > S**2 / (S**2 + SIGMA**2)


def test_gradient_wrt_output_is_weighted_score_difference():
    div = SmoothedKL(SigmaDist("fixed", max=2.0), weighting="diffusion", normalize=False)
    x0_hat = torch.randn(4, 3, requires_grad=True)
    sigma = torch.full((4,), 2.0)
    d_t, d_f = torch.randn(4, 3), torch.randn(4, 3)
    div(x0_hat, sigma, d_t, d_f).sum().backward()
    # w(σ)(s_fake − s_teacher) = σ²·((d_f − x)/σ² − (d_t − x)/σ²) = d_f − d_t
    torch.testing.assert_close(x0_hat.grad, d_f - d_t)


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_edm_weighting_is_edm_training_weight_in_score_form(sigma_data):
    """w(σ) = λ_EDM(σ)·σ⁴ with λ_EDM = (σ² + σ_d²)/(σσ_d)², so g = (1 + σ²/σ_d²)(D_fake − D_teacher)."""
    sigma = torch.tensor([0.01, 0.3, 2.0, 80.0], dtype=torch.float64)
    div = SmoothedKL(SigmaDist("fixed", max=1.0), weighting="edm", sigma_data=sigma_data)
    lam = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    torch.testing.assert_close(div.weight(sigma), lam * sigma**4)
    x0_hat = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    d_t, d_f = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    div(x0_hat, sigma, d_t, d_f).sum().backward()
    torch.testing.assert_close(x0_hat.grad, (1 + sigma[:, None] ** 2 / sigma_data**2) * (d_f - d_t))
    with pytest.raises(ValueError, match="sigma_data must be positive"):
        SmoothedKL(SigmaDist("fixed", max=1.0), weighting="edm", sigma_data=0.0)


def test_paper_defaults_sigma_squared_weighting_no_normaliser():
    """The library's defaults are the paper's reading (w = σ², no DMD normaliser), which IKL shares with Diff-Instruct."""
    dist = SigmaDist("log-uniform")
    assert (SmoothedKL(dist).weighting, SmoothedKL(dist).normalize) == ("diffusion", False)
    assert (IKL(dist).weighting, IKL(dist).normalize) == ("diffusion", False)


def test_normaliser_divides_by_mean_abs_teacher_residual():
    div = SmoothedKL(SigmaDist("fixed", max=1.0), weighting="diffusion", normalize=True)
    x0_hat = torch.randn(5, 2, 2, requires_grad=True)
    sigma = torch.ones(5)
    d_t, d_f = torch.randn(5, 2, 2), torch.randn(5, 2, 2)
    div(x0_hat, sigma, d_t, d_f).sum().backward()
    norm = (x0_hat.detach() - d_t).abs().mean(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(x0_hat.grad, (d_f - d_t) / (norm + 1e-8))


def test_renoise_same_sigma_vs_independent():
    dist = SigmaDist("log-uniform", min=0.01, max=10.0)
    g = torch.Generator().manual_seed(0)
    sigma = dist.draw(64, g)
    assert torch.equal(SmoothedKL(dist).renoise_sigma(sigma, g), sigma)
    other = SmoothedKL(dist, renoise="independent").renoise_sigma(sigma, g)
    assert not torch.equal(other, sigma) and other.min() >= 0.01 and other.max() <= 10.0


def test_renoise_max_caps_the_comparison_sigma():
    dist = SigmaDist("log-uniform", min=0.01, max=80.0)
    sigma = torch.tensor([0.05, 1.0, 2.5, 10.0, 80.0])
    capped = SmoothedKL(dist, renoise_max=2.5).renoise_sigma(sigma)
    assert torch.equal(capped, torch.tensor([0.05, 1.0, 2.5, 2.5, 2.5]))
    with pytest.raises(ValueError, match="renoise_max must be positive"):
        SmoothedKL(dist, renoise_max=0.0)


def test_ikl_feeds_pure_noise_and_integrates_over_sigma():
    div = IKL(SigmaDist("log-uniform", min=0.1, max=5.0), generator_sigma=80.0)
    x0 = torch.full((1000, 2), 123.0)  # data values must not leak into the generator input
    x_in, sigma_in = div.student_input(x0, torch.Generator().manual_seed(1))
    assert torch.all(sigma_in == 80.0)
    assert abs(float(x_in.mean())) < 8.0 and float(x_in.std()) == pytest.approx(80.0, rel=0.05)
    s = div.renoise_sigma(sigma_in, torch.Generator().manual_seed(2))
    assert s.min() >= 0.1 and s.max() <= 5.0


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 32), nn.SiLU(), nn.Dropout(0.5), nn.Linear(32, 2))

    def forward(self, x, noise_labels, class_labels=None):
        return self.net(torch.cat([x, noise_labels[:, None]], dim=1))


@pytest.mark.parametrize("name", ["smoothed-kl", "ikl"])
def test_student_gradient_is_exactly_zero_at_initialisation(name):
    torch.manual_seed(0)
    teacher = EDMPrecond(TinyNet(), sigma_data=0.5)
    dist = SigmaDist("log-uniform", min=0.002, max=80.0)
    div = SmoothedKL(dist) if name == "smoothed-kl" else IKL(dist)
    algo = DPDM(teacher, div, EDMLoss(), lr=1e-4, fake_updates=2)
    x0 = torch.randn(64, 2)
    algo.student_loss(x0, generator=torch.Generator().manual_seed(0)).mean().backward()
    grads = [p.grad for p in algo.student.parameters()]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)
    assert all(p.grad is None for p in algo.teacher.parameters())


def test_teacher_is_frozen_and_fake_moves():
    torch.manual_seed(0)
    teacher = EDMPrecond(TinyNet(), sigma_data=0.5)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    algo = DPDM(teacher, SmoothedKL(SigmaDist("log-uniform", min=0.01, max=10.0)), EDMLoss(), lr=1e-3, fake_updates=2)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        stats = algo.step(lambda: (torch.randn(32, 2, generator=g), None), generator=g)
    assert set(stats) >= {"student_loss", "fake_loss", "student_grad_norm", "fake_grad_norm"}
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k])
    assert any(not torch.equal(a, b) for a, b in zip(algo.fake.parameters(), teacher.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(algo.student.parameters(), teacher.parameters()))


class TinyImageNet(nn.Module):
    """A dropout-free conv net ``(x, c_noise) -> F`` standing in for an EDM UNet."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(2, 8, 3, padding=1), nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x, noise_labels, class_labels=None):
        c = noise_labels.reshape(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:]).to(x.dtype)
        return self.conv2(torch.nn.functional.silu(self.conv1(torch.cat([x, c], dim=1))))


def test_ikl_gradient_equals_diff_instructs_update():
    """With Diff-Instruct's settings (lognormal σ law unclamped, w = σ² i.e. ``weighting: diffusion``, no
    normaliser, generator fed init_sigma·z at init_sigma) the generator gradient of ``student_loss`` equals that of
    Diff-Instruct's generator loss, transcribed here from its description: σ = exp(N·P_std + P_mean),
    n = N·σ, loss_i = Σ (D_fake(y + n, σ) − D_teacher(y + n, σ))·y over the pixels of generated image y,
    mean over the batch. The draws are made in the same order (z, σ, n) from one generator."""
    from dpdm.core.train.distill import student_loss

    torch.manual_seed(0)
    teacher = EDMPrecond(TinyImageNet(), sigma_data=0.5).double()
    fake = EDMPrecond(TinyImageNet(), sigma_data=0.5).double()  # a fake score that has moved off the teacher
    generator_net = EDMPrecond(TinyImageNet(), sigma_data=0.5).double()
    init_sigma, p_mean, p_std = 2.5, -1.2, 1.2
    div = IKL(SigmaDist("lognormal", P_mean=p_mean, P_std=p_std, min=1e-12, max=1e12), weighting="diffusion",
              normalize=False, generator_sigma=init_sigma)
    shape = (16, 1, 8, 8)
    x0 = torch.zeros(shape, dtype=torch.float64)  # IKL is data-free: only the shape is used

    student_loss(generator_net, teacher, fake, div, x0, generator=torch.Generator().manual_seed(7)).mean().backward()
    ours = [p.grad.clone() for p in generator_net.parameters()]
    generator_net.zero_grad(set_to_none=True)

    g = torch.Generator().manual_seed(7)
    z = init_sigma * torch.randn(shape, generator=g, dtype=torch.float64)
    y = generator_net(z, torch.full((shape[0],), init_sigma, dtype=torch.float64))
    sigma = (torch.randn(shape[0], generator=g, dtype=torch.float64) * p_std + p_mean).exp()
    n = torch.randn(shape, generator=g, dtype=torch.float64) * sigma[:, None, None, None]
    with torch.no_grad():
        d_teacher, d_fake = teacher(y + n, sigma), fake(y + n, sigma)
    ((d_fake - d_teacher) * y).sum(dim=(1, 2, 3)).mean().backward()
    theirs = [p.grad for p in generator_net.parameters()]
    assert any(float(t.abs().max()) > 1e-6 for t in theirs)  # a real, non-zero gradient is compared
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
