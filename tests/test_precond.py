"""Preconditioning (EDM / VP / VE) against the closed forms of Karras et al. 2022, Table 1
(``shared/edm_ref/README.md`` §3)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dpdm.core.precond import EDMPrecond, VEPrecond, VPPrecond

B = 4
SIGMAS = [0.002, 0.3, 2.5, 80.0]  # one per batch element


class Recorder(nn.Module):
    """A backbone with one float32 parameter that records its inputs and returns a known function of them."""

    def __init__(self, label_dim: int = 0, dtype=torch.float32):
        super().__init__()
        self.label_dim = label_dim
        self.w = nn.Parameter(torch.tensor(0.75, dtype=dtype))
        self.calls = []

    def forward(self, x, noise_labels, class_labels=None):
        self.calls.append((x.detach().clone(), noise_labels.detach().clone(),
                           None if class_labels is None else class_labels.detach().clone()))
        return self.w * torch.sin(x) + noise_labels.reshape(-1, *([1] * (x.ndim - 1)))


def F_ref(a, c_noise):
    """What ``Recorder`` computes, in float64."""
    return 0.75 * torch.sin(a) + c_noise.reshape(-1, *([1] * (a.ndim - 1)))


# --- closed forms, float64 --------------------------------------------------------------------------------------

def edm_ref(sigma, sd):
    return (sd**2 / (sigma**2 + sd**2), sigma * sd / torch.sqrt(sigma**2 + sd**2),
            1 / torch.sqrt(sigma**2 + sd**2), torch.log(sigma) / 4)


def vp_sigma_inv(sigma, beta_d=19.9, beta_min=0.1):
    return (torch.sqrt(beta_min**2 + 2 * beta_d * torch.log(1 + sigma**2)) - beta_min) / beta_d


def vp_ref(sigma):
    return (torch.ones_like(sigma), -sigma, 1 / torch.sqrt(sigma**2 + 1), 999 * vp_sigma_inv(sigma))


def ve_ref(sigma):
    return torch.ones_like(sigma), sigma, torch.ones_like(sigma), torch.log(sigma / 2)


CASES = [
    ("edm-0.5", lambda bb: EDMPrecond(bb), lambda s: edm_ref(s, 0.5)),
    ("edm-1.3", lambda bb: EDMPrecond(bb, sigma_data=1.3), lambda s: edm_ref(s, 1.3)),
    ("vp", lambda bb: VPPrecond(bb), vp_ref),
    ("ve", lambda bb: VEPrecond(bb), ve_ref),
]


def _x():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 2, 3, 3, generator=g, dtype=torch.float64) * 3


@pytest.mark.parametrize("name,make,ref", CASES, ids=[c[0] for c in CASES])
def test_coefficients_float64(name, make, ref):
    pre = make(Recorder())
    sigma = torch.tensor(SIGMAS, dtype=torch.float64).reshape(-1, 1, 1, 1)
    got = pre.coefficients(sigma)
    want = ref(sigma)
    for g, w, label in zip(got, want, ["c_skip", "c_out", "c_in", "c_noise"]):
        assert g.shape == sigma.shape, label
        torch.testing.assert_close(g, w, rtol=1e-12, atol=0, msg=label)


@pytest.mark.parametrize("name,make,ref", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("form", ["tensor-B", "tensor-B111"])
def test_forward_matches_formula(name, make, ref, form):
    bb = Recorder()
    pre = make(bb)
    x = _x()
    sig64 = torch.tensor(SIGMAS, dtype=torch.float64)
    sigma = sig64 if form == "tensor-B" else sig64.reshape(-1, 1, 1, 1)
    out = pre(x, sigma)
    # the backbone runs in its dtype (float32); float64 input comes back in float64 (the sampler state's dtype)
    assert out.dtype == torch.float64 and out.shape == x.shape
    assert pre(x.float(), sigma).dtype == torch.float32
    bb.calls.pop()

    # The backbone saw c_in·x and c_noise flattened to (B,), in float32.
    (a, c_noise, labels), = bb.calls
    assert labels is None
    assert a.dtype == torch.float32 and c_noise.dtype == torch.float32
    assert c_noise.shape == (B,)
    s = sig64.reshape(-1, 1, 1, 1)
    c_skip, c_out, c_in, c_noise_ref = ref(s)
    torch.testing.assert_close(a.double(), c_in * x, rtol=2e-6, atol=1e-6)
    # Like EDM, the coefficients are computed in the backbone's dtype (float32). VP's
    # c_noise = 999·σ⁻¹(σ) loses precision in ln(1+σ²) at small σ (1.3% at σ=0.002, as in EDM),
    # so c_noise is compared with the closed form evaluated in float32.
    c_noise_f32 = ref(s.float())[3].reshape(-1)
    torch.testing.assert_close(c_noise, c_noise_f32, rtol=1e-6, atol=1e-6)
    if name != "vp":
        torch.testing.assert_close(c_noise.double(), c_noise_ref.reshape(-1), rtol=2e-6, atol=1e-6)
    else:
        torch.testing.assert_close(c_noise.double()[1:], c_noise_ref.reshape(-1)[1:], rtol=1e-4, atol=0)
        c_noise_ref = c_noise_f32.double()

    # D = c_skip x + c_out F(c_in x, c_noise), evaluated in float64 from the closed forms.
    want = c_skip * x + c_out * F_ref(c_in * x, c_noise_ref)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5 * float(c_out.abs().max()))


@pytest.mark.parametrize("name,make,ref", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("form", ["float", "0-dim", "B", "B111"])
def test_scalar_and_batched_sigma_agree(name, make, ref, form):
    bb = Recorder()
    pre = make(bb)
    x = _x()
    value = 1.7
    sigma = {"float": value, "0-dim": torch.tensor(value, dtype=torch.float64),
             "B": torch.full((B,), value, dtype=torch.float64),
             "B111": torch.full((B, 1, 1, 1), value, dtype=torch.float64)}[form]
    out = pre(x, sigma)
    (_, c_noise, _), = bb.calls
    assert c_noise.shape == (B,)
    s = torch.full((B, 1, 1, 1), value, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise_ref = ref(s)
    torch.testing.assert_close(c_noise.double(), c_noise_ref.reshape(-1), rtol=2e-6, atol=1e-6)
    want = c_skip * x + c_out * F_ref(c_in * x, c_noise_ref)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [EDMPrecond, VPPrecond, VEPrecond])
@pytest.mark.parametrize("bad", [torch.ones(3), torch.ones(B + 1, 1, 1, 1), torch.ones(2), [1.0, 2.0]])
def test_wrong_number_of_sigmas_raises(make, bad):
    pre = make(Recorder())
    with pytest.raises(ValueError):
        pre(_x(), bad)


def test_sigma_range_attributes():
    vp = VPPrecond(Recorder())
    assert vp.sigma_min == 0.0009765625 == 2.0**-10  # float32, as EDM
    assert vp.sigma_max == 152.16697692871094
    ve = VEPrecond(Recorder())
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100.0)
    edm = EDMPrecond(Recorder())
    assert (edm.sigma_min, edm.sigma_max, edm.sigma_data) == (0.0, math.inf, 0.5)


def test_vp_sigma_and_inverse():
    vp = VPPrecond(Recorder())
    t = torch.tensor([1e-5, 0.01, 0.3, 0.7, 1.0], dtype=torch.float64)
    sigma = vp.sigma(t)
    torch.testing.assert_close(sigma, torch.sqrt(torch.exp(0.5 * 19.9 * t**2 + 0.1 * t) - 1), rtol=1e-14, atol=0)
    torch.testing.assert_close(vp.sigma_inv(sigma), t, rtol=1e-9, atol=0)
    # float64 values differ from the float32 attributes (README §3)
    assert abs(float(sigma[0]) - 0.0010005) < 1e-7
    assert abs(float(sigma[-1]) - 152.16697) < 1e-4


def test_labels_one_hot_and_unconditional_zeros():
    bb = Recorder(label_dim=3)
    pre = EDMPrecond(bb)
    assert pre.label_dim == 3
    x = _x()
    pre(x, 1.0, class_labels=torch.tensor([0, 2, 1, 2]))
    pre(x, 1.0, class_labels=[2, 0, 0, 1])
    pre(x, 1.0)
    onehot = torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 0, 1]], dtype=torch.float32)
    pre(x, 1.0, class_labels=onehot)
    (_, _, l0), (_, _, l1), (_, _, l2), (_, _, l3) = bb.calls
    assert torch.equal(l0, torch.tensor([[1, 0, 0], [0, 0, 1], [0, 1, 0], [0, 0, 1]], dtype=torch.float32))
    assert torch.equal(l1, torch.tensor([[0, 0, 1], [1, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.float32))
    assert torch.equal(l2, torch.zeros(B, 3))
    assert torch.equal(l3, onehot)
    for labels in (l0, l1, l2, l3):
        assert labels.dtype == torch.float32


def test_label_dim_from_argument_overrides_backbone():
    bb = Recorder(label_dim=0)
    pre = EDMPrecond(bb, label_dim=5)
    pre(_x(), 1.0, class_labels=torch.tensor([4, 0, 1, 3]))
    (_, _, labels), = bb.calls
    assert torch.equal(labels, torch.eye(5)[[4, 0, 1, 3]])
    bb2 = Recorder(label_dim=0)
    EDMPrecond(bb2)(_x(), 1.0)
    assert bb2.calls[0][2] is None  # unconditional backbone gets no labels


# --- exact denoiser for Gaussian data -------------------------------------------------------------------------

class GaussianOptimalF(nn.Module):
    """F chosen so that EDM's D equals the exact denoiser of N(mu, s² I).

    From its own inputs only: σ = exp(4·c_noise), x = a·√(σ²+σd²); then F = (D* − c_skip x)/c_out.
    Its parameter is float64 so the whole check runs in float64.
    """

    def __init__(self, mu, s, sigma_data):
        super().__init__()
        self.mu = nn.Parameter(torch.tensor(float(mu), dtype=torch.float64))
        self.s, self.sd = float(s), float(sigma_data)

    def forward(self, a, c_noise, class_labels=None):
        sigma = torch.exp(4 * c_noise).reshape(-1, *([1] * (a.ndim - 1)))
        sd, s, mu = self.sd, self.s, self.mu
        x = a * torch.sqrt(sigma**2 + sd**2)
        d_star = mu + s**2 / (s**2 + sigma**2) * (x - mu)
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / torch.sqrt(sigma**2 + sd**2)
        return (d_star - c_skip * x) / c_out


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_edm_exact_gaussian_denoiser(sigma_data):
    mu, s = 0.4, 0.8
    pre = EDMPrecond(GaussianOptimalF(mu, s, sigma_data), sigma_data=sigma_data)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64) * 5
    sigma = torch.tensor([0.002, 0.05, 0.5, 1.0, 10.0, 80.0], dtype=torch.float64)
    out = pre(x, sigma)
    assert out.dtype == torch.float64
    sig = sigma.reshape(-1, 1, 1, 1)
    want = mu + s**2 / (s**2 + sig**2) * (x - mu)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_edm_zero_backbone_is_exact_when_sigma_data_matches():
    """For N(0, σd²) data the optimal F is 0: D = c_skip·x is the exact denoiser."""

    class Zero(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros((), dtype=torch.float64))

        def forward(self, a, c_noise, class_labels=None):
            return a * self.p

    sd = 0.7
    pre = EDMPrecond(Zero(), sigma_data=sd)
    x = torch.linspace(-3, 3, 7, dtype=torch.float64).reshape(7, 1)
    sigma = torch.logspace(-3, 2, 7, dtype=torch.float64)
    torch.testing.assert_close(pre(x, sigma), sd**2 / (sd**2 + sigma[:, None] ** 2) * x, rtol=1e-14, atol=0)
