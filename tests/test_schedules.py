"""Noise schedules: EDM's time steps (Karras et al. 2022, Eq. 5) and the DPDM schedule (Table 7)."""

from __future__ import annotations

import math

import pytest
import torch

from dpdm.core.schedules import dpdm, dpdm_sigma_min, karras

README_18 = [80, 57.586, 40.786, 28.375, 19.352, 12.910, 8.401, 5.315, 3.257, 1.923, 1.088, 0.585, 0.296,
             0.140, 0.0599, 0.0229, 0.00753, 0.002, 0]


def edm_time_steps(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM's ``edm_sampler`` time steps, re-implemented here in float64 (README §6)."""
    i = torch.arange(n, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


@pytest.mark.parametrize("n", [2, 5, 18, 40, 256])
def test_karras_equals_edm_exactly(n):
    assert torch.equal(karras(n), edm_time_steps(n))


@pytest.mark.parametrize("kw", [dict(sigma_min=0.02, sigma_max=100.0), dict(rho=3.0),
                                dict(sigma_min=0.1, sigma_max=0.1)])
def test_karras_options_equal_edm(kw):
    assert torch.equal(karras(10, **kw), edm_time_steps(10, **kw))


def test_karras_18_matches_readme_values():
    t = karras(18)
    assert len(t) == len(README_18) == 19
    for got, want in zip(t.tolist(), README_18):
        s = repr(float(want))  # printed precision: 3 decimals, or 3 significant digits below 0.1
        if want == 0:
            assert got == 0.0
        elif want >= 0.1:
            assert round(got, 3) == pytest.approx(want, abs=1e-12), (got, want)
        else:
            digits = 3 - 1 - math.floor(math.log10(want))  # 3 significant digits
            assert round(got, digits) == pytest.approx(want, abs=1e-15), (got, want, s)
    assert t[0].item() == 80.0
    assert t[-2].item() == pytest.approx(0.002, rel=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 18, 100])
@pytest.mark.parametrize("fn", [karras, dpdm])
def test_schedule_shape_dtype_order(fn, n):
    t = fn(n)
    assert t.dtype == torch.float64
    assert t.shape == (n + 1,)
    assert t[-1].item() == 0.0
    assert t[0].item() == 80.0
    assert bool((t[1:] < t[:-1]).all()), t
    assert bool((t[:-1] > 0).all())


def test_one_step():
    assert torch.equal(karras(1), torch.tensor([80.0, 0.0], dtype=torch.float64))
    assert torch.equal(karras(1, sigma_max=2.5), torch.tensor([2.5, 0.0], dtype=torch.float64))
    assert torch.equal(dpdm(1), torch.tensor([80.0, 0.0], dtype=torch.float64))
    assert torch.equal(dpdm(1, sigma_max=2.5), torch.tensor([2.5, 0.0], dtype=torch.float64))
    assert torch.equal(dpdm(1, sigma_max=0.1), torch.tensor([0.1, 0.0], dtype=torch.float64))  # below 0.3


@pytest.mark.parametrize("kw", [
    dict(n=0), dict(n=-3), dict(n=2.5),
    dict(n=5, sigma_min=0.0), dict(n=5, sigma_min=-0.1), dict(n=5, sigma_min=10.0, sigma_max=1.0),
    dict(n=5, sigma_max=-1.0), dict(n=5, rho=0.0), dict(n=5, rho=-7.0), dict(n=5, sigma_min=float("nan")),
])
def test_karras_bad_arguments(kw):
    with pytest.raises(ValueError):
        karras(**kw)


@pytest.mark.parametrize("kw", [dict(n=0), dict(n=2.5), dict(n=5, sigma_min=-1.0), dict(n=5, rho=0.0),
                                dict(n=12, sigma_min=100.0)])
def test_dpdm_bad_arguments(kw):
    with pytest.raises(ValueError):
        dpdm(**kw)


TABLE7 = {4: 0.3, 5: 0.2, 6: 0.1, 7: 0.015, 8: 0.0035, 9: 0.00055, 10: 1e-4, 11: 1e-4, 16: 1e-4, 100: 1e-4}


@pytest.mark.parametrize("n,sigma_min", sorted(TABLE7.items()))
def test_dpdm_table7(n, sigma_min):
    assert dpdm_sigma_min(n) == sigma_min
    t = dpdm(n)
    want = edm_time_steps(n, sigma_min=sigma_min, sigma_max=80.0, rho=40.0)  # Appendix B.1
    assert t.tolist() == pytest.approx(want.tolist(), rel=1e-13)
    assert t[0].item() == 80.0
    assert t[n - 1].item() == sigma_min  # the ends exactly
    assert t[n].item() == 0.0


def test_dpdm_rho40_formula():
    """Appendix B.1 written out by hand: σ_k = (80^{1/40} + k/7 (0.0035^{1/40} − 80^{1/40}))^40 at 8 steps."""
    t = dpdm(8)
    a, b = 80.0 ** (1 / 40), 0.0035 ** (1 / 40)
    expected = [(a + k / 7 * (b - a)) ** 40 for k in range(8)] + [0.0]
    assert t.tolist() == pytest.approx(expected, rel=1e-12)
    # the levels the paper's sampler visits at 8 steps (3 significant digits)
    assert [float(f"{v:.3g}") for v in t[:-1].tolist()] == [80.0, 22.1, 5.82, 1.47, 0.353, 0.0803, 0.0173, 0.0035]


def close(a, b):
    return a.tolist() == pytest.approx(b.tolist(), rel=1e-13)


def test_dpdm_overrides():
    assert close(dpdm(6, sigma_min=0.05), edm_time_steps(6, sigma_min=0.05, rho=40.0))
    assert close(dpdm(6, sigma_max=20.0), edm_time_steps(6, sigma_min=0.1, sigma_max=20.0, rho=40.0))
    assert close(dpdm(6, rho=5.0), edm_time_steps(6, sigma_min=0.1, rho=5.0))
    assert close(dpdm(8, rho=7.0), edm_time_steps(8, sigma_min=0.0035, rho=7.0))  # EDM's spacing
    assert not close(dpdm(8), edm_time_steps(8, sigma_min=0.0035, rho=7.0))
    t = dpdm(8, sigma_min=0.01, sigma_max=10.0, rho=3.0)
    assert close(t, edm_time_steps(8, sigma_min=0.01, sigma_max=10.0, rho=3.0))
    # (10^(1/3))^3 is 10.000000000000002 in float64 (as in EDM's karras); dpdm pins its ends
    assert t[0].item() == 10.0 and t[-2].item() == 0.01
