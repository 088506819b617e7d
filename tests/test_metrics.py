"""Distribution distances (dpdm.core.eval.metrics) against closed forms and brute force."""

from __future__ import annotations

import math

import pytest
import torch

from dpdm.core import get, names

from dpdm.core.eval import metrics


def _normal(n, dim, seed, shift=0.0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def _energy_closed_form(m: float) -> float:
    """D² between N(0, 1) and N(m, 1).

    X − Y ~ N(−m, 2), so E|X − Y| is a folded-normal mean; X − X' ~ N(0, 2), so E|X − X'| = 2/√π.
    """
    s = math.sqrt(2)
    e_xy = s * math.sqrt(2 / math.pi) * math.exp(-m * m / (2 * s * s)) + m * math.erf(m / (s * math.sqrt(2)))
    return 2 * e_xy - 2 * (2 / math.sqrt(math.pi))


def test_registered():
    assert {"energy", "sliced-wasserstein", "fid", "fd"} <= set(names("metric"))
    assert callable(get("metric", "energy")()) and callable(get("metric", "sliced-wasserstein")())


@pytest.mark.parametrize("m", [0.5, 1.0, 2.0])
def test_energy_matches_closed_form(m):
    fn = get("metric", "energy")()
    value = fn(_normal(3000, 1, 0), _normal(3000, 1, 1, shift=m))
    # the estimator's standard deviation at n = 3000 is ≈ 0.01 (m=0.5) to 0.05 (m=2)
    assert value == pytest.approx(_energy_closed_form(m), abs=0.04 + 0.05 * m)


def test_energy_brute_force_with_tiny_chunks(monkeypatch):
    x, y = _normal(37, 3, 0), _normal(23, 3, 1, shift=0.5)

    def mean(a, b, same):
        d = torch.cdist(a, b)
        return (d.sum() / (len(a) * (len(b) - 1))) if same else d.mean()

    expected = 2 * mean(x, y, False) - mean(x, x, True) - mean(y, y, True)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 50)  # forces chunks of 1-2 rows
    # cdist's matmul path (used for larger chunks) differs by rounding only
    assert metrics.energy_distance(x, y) == pytest.approx(expected.item(), rel=1e-8)


def test_energy_identical_symmetric_and_flattened():
    fn = get("metric", "energy")()
    x, y = _normal(1000, 2, 0), _normal(1200, 2, 1, shift=0.3)
    assert abs(fn(x, x)) < 5e-3  # unbiased within-set means: −2E|X−X'|/N, not exactly 0
    assert fn(x, y) == pytest.approx(fn(y, x), rel=1e-12)
    assert fn(x, y) > 0.01
    images = x.reshape(1000, 2, 1, 1).float()
    assert fn(images, y) == pytest.approx(fn(x.float(), y), rel=1e-9)


def test_energy_max_samples_is_deterministic():
    fn = get("metric", "energy")(max_samples=300)
    x, y = _normal(2000, 2, 0), _normal(2000, 2, 1, shift=1.0)
    assert fn(x, y) == fn(x, y)
    assert fn(x, y) == pytest.approx(metrics.energy_distance(x, y), abs=0.1)
    with pytest.raises(ValueError, match="features"):
        fn(x, _normal(10, 3, 0))


def test_sliced_wasserstein_of_a_shift():
    # projections of x + d along u are those of x shifted by u·d, so W₂ = |u·d| and
    # SW₂ = sqrt(E (u·d)²) = |d| / sqrt(2) for u uniform on the circle
    fn = get("metric", "sliced-wasserstein")()
    d = torch.tensor([0.6, -0.8], dtype=torch.float64)
    x = _normal(4000, 2, 0)
    assert fn(x, x + d) == pytest.approx(1 / math.sqrt(2), abs=0.05)
    assert fn(x, _normal(3000, 2, 1) + d) == pytest.approx(1 / math.sqrt(2), abs=0.07)  # fresh, unequal sizes
    assert fn(x, x) == 0.0


def test_sliced_wasserstein_in_1d_is_w2():
    x, y = _normal(500, 1, 0), _normal(500, 1, 1, shift=0.7)
    w2 = (x.sort(dim=0).values - y.sort(dim=0).values).square().mean().sqrt().item()
    assert metrics.sliced_wasserstein(x, y, num_projections=8) == pytest.approx(w2, rel=1e-12)


def test_sliced_wasserstein_quantile_grid():
    # two samples of one law of different sizes: a point mass vs itself, and a subsample
    x = _normal(1000, 2, 0)
    assert metrics.sliced_wasserstein(x, x[::2]) < 0.1
    point = torch.ones(7, 2)
    assert metrics.sliced_wasserstein(point, torch.ones(3, 2)) == pytest.approx(0.0, abs=1e-12)


def test_sliced_wasserstein_deterministic_given_seed():
    x, y = _normal(800, 4, 0), _normal(900, 4, 1, shift=0.5)
    assert get("metric", "sliced-wasserstein")()(x, y) == get("metric", "sliced-wasserstein")()(x, y)
    a = get("metric", "sliced-wasserstein")(num_projections=16, seed=1)(x, y)
    assert a != get("metric", "sliced-wasserstein")(num_projections=16, seed=2)(x, y)
