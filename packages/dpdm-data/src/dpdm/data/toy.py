"""Toy distributions in 2-D (and an isotropic Gaussian in N-D) with known densities.

Each dataset is a ``TensorDataset`` (``kind="vector"``, float32 items of shape ``(D,)``) holding
``num_samples`` draws, and knows its true distribution: ``sample(n, generator=None)`` returns
``(n, D)`` float32 fresh samples drawn with the given ``torch.Generator`` (the global RNG when
``None``). Generation is fully vectorised.

Splits: the finite split is drawn from a generator seeded with ``seed`` for ``"train"`` and
``seed + 1`` for ``"test"``, so the two splits of one seed are independent samples (note that
``test`` of seed ``s`` therefore equals ``train`` of seed ``s + 1``).

Every class is itself the registered factory ``Cls(split="train", num_samples=20000, seed=0,
**options)``:

- ``gaussian-ring``: 8 Gaussians on a circle (the mixture of Metz et al. 2017, "Unrolled GANs");
- ``gaussian-grid``: a 5 × 5 grid of Gaussians on [-1, 1]² (Azadi et al. 2019, "DRS");
- ``checkerboard``: uniform on the black cells of a checkerboard (Grathwohl et al. 2019, FFJORD);
- ``two-moons`` and ``swiss-roll``: as ``sklearn.datasets.make_moons`` / ``make_swiss_roll``,
  with random (not evenly spaced) positions along the curves, rescaled to about [-1, 1];
- ``gaussian``: N(mean, std² I) in ``dim`` dimensions, for tests with closed forms.
"""

from __future__ import annotations

import abc
import math

import torch

from dpdm.core.datasets import TensorDataset

SPLITS = {"train": 0, "test": 1}  # offset added to ``seed``
DEFAULT_NUM_SAMPLES = 20000


def split_seed(name: str, split: str, seed: int) -> int:
    """The generator seed of a split: ``seed`` for "train", ``seed + 1`` for "test"."""
    if split not in SPLITS:
        valid = ", ".join(repr(s) for s in SPLITS)
        raise ValueError(f"{name}: unknown split {split!r}; valid splits are {valid}")
    return int(seed) + SPLITS[split]


def _positive(name: str, option: str, value: float) -> float:
    if not value > 0:
        raise ValueError(f"{name}: {option} must be positive, got {value!r}")
    return float(value)


def _at_least(name: str, option: str, value: int, low: int) -> int:
    if int(value) != value or value < low:
        raise ValueError(f"{name}: {option} must be an integer >= {low}, got {value!r}")
    return int(value)


class ToyDataset(TensorDataset, abc.ABC):
    """A finite split of a known distribution; subclasses implement ``_draw``.

    ``_draw(n, generator) -> (x, labels)`` returns ``(n, D)`` float32 points and ``(n,)`` int64
    component indices (zeros for distributions without components). Subclasses set their
    options before calling ``super().__init__``. The mixtures (``gaussian-ring``, ``gaussian-grid``)
    accept ``labels=True``, which keeps the mode index as the class label with
    ``label_dim = num_components``; the other datasets are unlabelled.
    """

    name = "toy"
    dim = 2
    num_components = 0  # number of label values when labelled

    def __init__(self, split: str = "train", num_samples: int = DEFAULT_NUM_SAMPLES, seed: int = 0,
                 labels: bool = False):
        num_samples = _at_least(self.name, "num_samples", num_samples, 0)
        generator = torch.Generator().manual_seed(split_seed(self.name, split, seed))
        x, y = self._draw(num_samples, generator)
        labels = y if labels else None
        super().__init__(x.to(torch.float32), labels, label_dim=self.num_components, kind="vector", name=self.name)
        self.split, self.seed = split, int(seed)

    @abc.abstractmethod
    def _draw(self, n: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` points (float32 ``(n, D)``) and their component indices (int64 ``(n,)``)."""

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(n, D)`` float32 fresh samples from the true distribution."""
        return self._draw(_at_least(self.name, "n", n, 0), generator)[0].to(torch.float32)


class GaussianRing(ToyDataset):
    """``num_modes`` isotropic Gaussians (``std``) centred evenly on a circle of ``radius``, equal weights.

    Mode k is centred at radius·(cos 2πk/M, sin 2πk/M); labels are the mode index.
    """

    name = "gaussian-ring"

    def __init__(self, split="train", num_samples=DEFAULT_NUM_SAMPLES, seed=0, *, num_modes=8, radius=1.0,
                 std=0.05, labels=False):
        self.num_modes = self.num_components = _at_least(self.name, "num_modes", num_modes, 1)
        self.radius = _positive(self.name, "radius", radius)
        self.std = _positive(self.name, "std", std)
        super().__init__(split, num_samples, seed, labels)

    @property
    def centers(self) -> torch.Tensor:
        angles = 2 * math.pi * torch.arange(self.num_modes, dtype=torch.float64) / self.num_modes
        return (self.radius * torch.stack([angles.cos(), angles.sin()], dim=1)).to(torch.float32)

    def _draw(self, n, generator):
        modes = torch.randint(self.num_modes, (n,), generator=generator)
        noise = torch.randn(n, 2, generator=generator)
        return self.centers[modes] + self.std * noise, modes


class GaussianGrid(ToyDataset):
    """``grid`` × ``grid`` isotropic Gaussians (``std``) on [-1, 1]², spacing 2/(grid − 1), equal weights.

    Mode k = i·grid + j is centred at (−1 + 2i/(grid − 1), −1 + 2j/(grid − 1)); labels are k.
    """

    name = "gaussian-grid"

    def __init__(self, split="train", num_samples=DEFAULT_NUM_SAMPLES, seed=0, *, grid=5, std=0.05, labels=False):
        self.grid = _at_least(self.name, "grid", grid, 2)
        self.num_components = self.grid**2
        self.std = _positive(self.name, "std", std)
        super().__init__(split, num_samples, seed, labels)

    @property
    def centers(self) -> torch.Tensor:
        ticks = torch.linspace(-1, 1, self.grid)
        return torch.cartesian_prod(ticks, ticks)

    def _draw(self, n, generator):
        modes = torch.randint(self.num_components, (n,), generator=generator)
        noise = torch.randn(n, 2, generator=generator)
        return self.centers[modes] + self.std * noise, modes


class Checkerboard(ToyDataset):
    """Uniform on the black cells of a ``cells`` × ``cells`` checkerboard covering [-1, 1]².

    Cell (i, j) spans [−1 + i·w, −1 + (i+1)·w] × [−1 + j·w, −1 + (j+1)·w] with w = 2/cells and
    is black when i + j is even (so the cell at the corner (−1, −1) is black). All cells have
    the same area, so a uniform black cell plus a uniform offset inside it is uniform on the union.
    """

    name = "checkerboard"

    def __init__(self, split="train", num_samples=DEFAULT_NUM_SAMPLES, seed=0, *, cells=4):
        self.cells = _at_least(self.name, "cells", cells, 1)
        super().__init__(split, num_samples, seed)

    @property
    def cell_width(self) -> float:
        return 2 / self.cells

    def black_cells(self) -> torch.Tensor:
        """``(K, 2)`` int64 indices (i, j) of the black cells."""
        ij = torch.cartesian_prod(torch.arange(self.cells), torch.arange(self.cells))
        return ij[ij.sum(dim=1) % 2 == 0]

    def is_black(self, x: torch.Tensor) -> torch.Tensor:
        """Whether each point of ``x`` (N, 2) lies in a black cell (points outside [-1, 1]² are not)."""
        ij = torch.floor((x + 1) / self.cell_width).to(torch.int64)
        inside = ((ij >= 0) & (ij < self.cells)).all(dim=1)
        return inside & (ij.sum(dim=1) % 2 == 0)

    def _draw(self, n, generator):
        black = self.black_cells()
        cell = black[torch.randint(len(black), (n,), generator=generator)]
        offset = torch.rand(n, 2, generator=generator)
        x = -1 + (cell.to(torch.float32) + offset) * self.cell_width
        return x, torch.zeros(n, dtype=torch.int64)


class TwoMoons(ToyDataset):
    """Two interleaving half circles (as ``sklearn.datasets.make_moons``), rescaled to about [-1, 1].

    Upper moon (cos t, sin t), lower moon (1 − cos t, 1/2 − sin t), t ~ U[0, π], each moon with
    probability 1/2. The union spans [−1, 2] × [−1/2, 1]; it is centred and divided by 1.5, giving
    [−1, 1] × [−1/2, 1/2]. Gaussian noise of std ``noise`` is added after rescaling.
    """

    name = "two-moons"

    def __init__(self, split="train", num_samples=DEFAULT_NUM_SAMPLES, seed=0, *, noise=0.05):
        if noise < 0:
            raise ValueError(f"{self.name}: noise must be >= 0, got {noise!r}")
        self.noise = float(noise)
        super().__init__(split, num_samples, seed)

    def _draw(self, n, generator):
        t = math.pi * torch.rand(n, generator=generator)
        lower = torch.rand(n, generator=generator) < 0.5
        upper_xy = torch.stack([t.cos(), t.sin()], dim=1)
        lower_xy = torch.stack([1 - t.cos(), 0.5 - t.sin()], dim=1)
        x = torch.where(lower[:, None], lower_xy, upper_xy)
        x = (x - torch.tensor([0.5, 0.25])) / 1.5
        x = x + self.noise * torch.randn(n, 2, generator=generator)
        return x, torch.zeros(n, dtype=torch.int64)


class SwissRoll(ToyDataset):
    """The 2-D swiss roll (the (x, z) plane of ``sklearn.datasets.make_swiss_roll``), rescaled to about [-1, 1].

    t = 1.5π(1 + 2u), u ~ U[0, 1], point (t cos t, t sin t) / (4.5π), so that the outer end has
    radius 1; Gaussian noise of std ``noise`` is added after rescaling. As in scikit-learn, t (not
    arc length) is uniform, so the inner turns are denser.
    """

    name = "swiss-roll"

    def __init__(self, split="train", num_samples=DEFAULT_NUM_SAMPLES, seed=0, *, noise=0.05):
        if noise < 0:
            raise ValueError(f"{self.name}: noise must be >= 0, got {noise!r}")
        self.noise = float(noise)
        super().__init__(split, num_samples, seed)

    def _draw(self, n, generator):
        t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator))
        x = torch.stack([t * t.cos(), t * t.sin()], dim=1) / (4.5 * math.pi)
        x = x + self.noise * torch.randn(n, 2, generator=generator)
        return x, torch.zeros(n, dtype=torch.int64)


class Gaussian(ToyDataset):
    """N(mean·1, std² I) in ``dim`` dimensions (``mean`` a scalar shared by all coordinates)."""

    name = "gaussian"

    def __init__(self, split="train", num_samples=DEFAULT_NUM_SAMPLES, seed=0, *, dim=2, mean=0.0, std=1.0):
        self.dim = _at_least(self.name, "dim", dim, 1)
        self.mean = float(mean)
        self.std = _positive(self.name, "std", std)
        super().__init__(split, num_samples, seed)

    def _draw(self, n, generator):
        x = self.mean + self.std * torch.randn(n, self.dim, generator=generator)
        return x, torch.zeros(n, dtype=torch.int64)


TOY_DATASETS: dict[str, type[ToyDataset]] = {
    cls.name: cls for cls in (GaussianRing, GaussianGrid, Checkerboard, TwoMoons, SwissRoll, Gaussian)
}
