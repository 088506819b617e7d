"""dpdm-data: the toy distributions and the digits dataset honour the dataset contract."""

from __future__ import annotations

import math

import pytest
import torch

from dpdm.core import get
from dpdm.data.toy import TOY_DATASETS

TOY = sorted(TOY_DATASETS)


@pytest.mark.parametrize("name", TOY)
def test_toy_contract(name):
    ds = get("dataset", name)(num_samples=500)
    x, label = ds[3]
    assert len(ds) == 500 and ds.shape == (2,) and ds.kind == "vector" and ds.label_dim == 0
    assert x.dtype == torch.float32 and x.shape == (2,)
    assert label.dtype == torch.int64 and label.item() == 0
    data, labels = ds.tensors()
    assert data.shape == (500, 2) and labels.shape == (500,)
    fresh = ds.sample(64, generator=torch.Generator().manual_seed(0))
    assert fresh.shape == (64, 2) and fresh.dtype == torch.float32
    assert torch.isfinite(data).all()


def test_default_sizes():
    assert len(get("dataset", "two-moons")()) == 20000
    assert len(get("dataset", "two-moons")(split="test")) == 20000


@pytest.mark.parametrize("name", TOY)
def test_seed_determinism_and_splits(name):
    factory = get("dataset", name)
    train = factory(split="train", num_samples=300, seed=3).data
    assert torch.equal(train, factory(split="train", num_samples=300, seed=3).data)
    assert not torch.equal(train, factory(split="test", num_samples=300, seed=3).data)
    assert not torch.equal(train, factory(split="train", num_samples=300, seed=4).data)
    # "test" of seed s is drawn with seed s + 1, as documented
    assert torch.equal(factory(split="test", num_samples=300, seed=3).data, factory(num_samples=300, seed=4).data)
    ds = factory(num_samples=10)
    a = ds.sample(100, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, ds.sample(100, generator=torch.Generator().manual_seed(7)))


def test_unknown_split_names_the_valid_ones():
    with pytest.raises(ValueError, match="'train', 'test'"):
        get("dataset", "gaussian-ring")(split="validation")
    with pytest.raises(ValueError, match="'train', 'test', 'all'"):
        get("dataset", "digits")(split="validation")


def test_ring_radius_and_labels():
    ds = get("dataset", "gaussian-ring")(num_samples=2000, labels=True, radius=2.0, std=0.05)
    assert ds.label_dim == 8
    x = ds.sample(20000, generator=torch.Generator().manual_seed(0))
    assert ((x.norm(dim=1) - 2.0).abs() < 5 * 0.05).all()
    data, labels = ds.tensors()
    assert set(labels.tolist()) == set(range(8))
    angles = 2 * math.pi * labels.to(torch.float64) / 8
    centers = 2.0 * torch.stack([angles.cos(), angles.sin()], dim=1)
    assert ((data.double() - centers).norm(dim=1) < 5 * 0.05).all()
    assert get("dataset", "gaussian-ring")(num_samples=10).label_dim == 0


def test_grid_modes():
    ds = get("dataset", "gaussian-grid")(num_samples=10, grid=5, std=0.02)
    x = ds.sample(20000, generator=torch.Generator().manual_seed(0))
    nearest = torch.round((x + 1) / 0.5)  # grid spacing 2 / (5 - 1)
    assert ((x - (-1 + 0.5 * nearest)).abs() < 5 * 0.02).all()
    assert set(map(tuple, nearest.to(torch.int64).tolist())) == {(i, j) for i in range(5) for j in range(5)}


def test_checkerboard_black_cells():
    ds = get("dataset", "checkerboard")(num_samples=10, cells=4)
    x = ds.sample(20000, generator=torch.Generator().manual_seed(0))
    assert (x.abs() <= 1).all()
    ij = torch.floor((x + 1) / 0.5).to(torch.int64)
    assert (ij.sum(dim=1) % 2 == 0).all()
    counts = torch.bincount(ij[:, 0] * 4 + ij[:, 1], minlength=16)
    black = counts[torch.tensor([i * 4 + j for i in range(4) for j in range(4) if (i + j) % 2 == 0])]
    assert (black - 20000 / 8).abs().max() < 5 * math.sqrt(20000 / 8)  # uniform over the 8 black cells
    assert ds.is_black(x).all() and not ds.is_black(torch.tensor([[-0.9, -0.4], [1.5, 1.5]])).any()


@pytest.mark.parametrize("name", ["two-moons", "swiss-roll"])
def test_curves_are_rescaled(name):
    x = get("dataset", name)(num_samples=10, noise=0.0).sample(5000, generator=torch.Generator().manual_seed(0))
    assert x.abs().max() <= 1 + 1e-5 and x.abs().max() > 0.9


def test_gaussian_moments():
    ds = get("dataset", "gaussian")(num_samples=10, dim=3, mean=1.5, std=0.5)
    assert ds.shape == (3,)
    x = ds.sample(50000, generator=torch.Generator().manual_seed(0)).double()
    assert x.mean(dim=0).sub(1.5).abs().max() < 5 * 0.5 / math.sqrt(50000)
    assert x.std(dim=0).sub(0.5).abs().max() < 0.01


def test_bad_options():
    with pytest.raises(ValueError, match="std"):
        get("dataset", "gaussian")(std=0.0)
    with pytest.raises(ValueError, match="grid"):
        get("dataset", "gaussian-grid")(grid=1)
    with pytest.raises(TypeError):
        get("dataset", "checkerboard")(labels=True)  # unlabelled: no such option


def test_digits():
    factory = get("dataset", "digits")
    train, test, everything = factory(), factory(split="test"), factory(split="all")
    assert len(everything) == 1797 and len(test) == round(0.2 * 1797) and len(train) + len(test) == 1797
    x, label = train[0]
    assert x.dtype == torch.uint8 and x.shape == (1, 8, 8) and train.shape == (1, 8, 8)
    assert train.kind == "image" and train.label_dim == 10 and label.dtype == torch.int64
    assert everything.data.min() == 0 and everything.data.max() == 255
    assert set(everything.labels.tolist()) == set(range(10))
    assert set(torch.unique(everything.data).tolist()) <= {round(v * 255 / 16) for v in range(17)}
    # the splits partition the set, deterministically for a seed
    rows = {tuple(r) for r in torch.cat([train.data, test.data]).flatten(1).tolist()}
    assert rows == {tuple(r) for r in everything.data.flatten(1).tolist()}
    assert torch.equal(test.data, factory(split="test").data)
    assert not torch.equal(test.data, factory(split="test", seed=1).data)
    unlabelled = factory(labels=False)
    assert unlabelled.label_dim == 0 and (unlabelled.labels == 0).all()
