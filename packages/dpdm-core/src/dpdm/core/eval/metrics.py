"""Distribution distances between generated samples and reference data (kind ``"metric"``).

``METRICS`` maps a name to ``factory(**options) -> fn(samples, reference) -> float``. Both
inputs are ``(N, ...)`` / ``(M, ...)`` tensors (or arrays), flattened to ``(N, D)`` float64.

- ``energy``: the squared energy distance of Székely & Rizzo (2013, "Energy statistics: a
  class of statistics based on distances"), D² = 2E|X − Y| − E|X − X'| − E|Y − Y'|, which is
  ≥ 0 and = 0 iff the two laws agree. The within-set means are U-statistics (the diagonal
  i = j is excluded), so the estimate is unbiased and can be slightly negative when the two
  laws are (nearly) equal.
- ``sliced-wasserstein``: the sliced 2-Wasserstein distance (Bonneel et al. 2015),
  SW₂ = sqrt(E_u W₂²(u·X, u·Y)) over unit directions u, estimated with ``num_projections``
  directions drawn from a fixed seed, so the metric is deterministic.
"""

from __future__ import annotations

import functools
import math

import torch

_CHUNK_ELEMENTS = 2**22  # distances held at once by the energy distance (32 MiB in float64)
ENERGY_MAX_IMAGES = 5000  # items per set the energy distance compares on image data (its cost is quadratic)


def _flatten(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim == 0:
        raise ValueError(f"{name} must have a leading sample dimension, got a scalar")
    return x.reshape(len(x), -1).to(torch.float64)


def _pair(samples, reference, min_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = _flatten(samples, "samples")
    y = _flatten(reference, "reference").to(x.device)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"samples have {x.shape[1]} features per item but reference has {y.shape[1]}")
    if len(x) < min_size or len(y) < min_size:
        raise ValueError(f"need at least {min_size} samples in each set, got {len(x)} and {len(y)}")
    return x, y


def _subsample(x: torch.Tensor, max_samples: int | None, seed: int) -> torch.Tensor:
    """The first ``max_samples`` rows of a seeded permutation (depends only on len(x) and seed)."""
    if max_samples is None or len(x) <= max_samples:
        return x
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[order[:max_samples].to(x.device)]


def _mean_distance(a: torch.Tensor, b: torch.Tensor, same: bool) -> float:
    """Mean Euclidean distance over pairs (a_i, b_j), excluding i = j when ``same`` (a is b)."""
    rows = max(1, _CHUNK_ELEMENTS // len(b))
    total = 0.0
    for start in range(0, len(a), rows):
        d = torch.cdist(a[start:start + rows], b)
        if same:
            i = torch.arange(len(d), device=d.device)
            d[i, start + i] = 0
        total += d.sum().item()
    pairs = len(a) * (len(b) - 1) if same else len(a) * len(b)
    return total / pairs


def energy_distance(samples, reference, *, max_samples: int | None = None, seed: int = 0) -> float:
    """Squared energy distance 2E|X − Y| − E|X − X'| − E|Y − Y'| (unbiased within-set means).

    Pairwise distances are summed in chunks, so 10⁴ × 10⁴ pairs need only tens of MiB. Sets
    larger than ``max_samples`` are first subsampled by a permutation seeded with ``seed``.
    """
    x, y = _pair(samples, reference, min_size=2)
    x, y = _subsample(x, max_samples, seed), _subsample(y, max_samples, seed)
    return 2 * _mean_distance(x, y, same=False) - _mean_distance(x, x, same=True) - _mean_distance(y, y, same=True)


def _quantiles(sorted_values: torch.Tensor, k: int) -> torch.Tensor:
    """Empirical quantiles at levels (i + ½)/k, i < k, of each row of ``sorted_values`` (P, n).

    Level q sits at fractional index q·n − ½ (clamped to [0, n − 1]) and is linearly
    interpolated; for k = n this returns ``sorted_values`` itself.
    """
    n = sorted_values.shape[1]
    levels = (torch.arange(k, dtype=torch.float64, device=sorted_values.device) + 0.5) / k
    position = (levels * n - 0.5).clamp(0, n - 1)
    low = position.floor().to(torch.int64)
    high = (low + 1).clamp(max=n - 1)
    weight = position - low
    return sorted_values[:, low] * (1 - weight) + sorted_values[:, high] * weight


def sliced_wasserstein(samples, reference, *, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance sqrt(mean_u W₂²(u·X, u·Y)) over seeded random unit directions.

    In 1-D, W₂² is the mean squared difference of the two quantile functions: both projected
    sets are sorted and, if their sizes differ, both are interpolated on a common grid of
    max(N, M) levels.
    """
    x, y = _pair(samples, reference, min_size=1)
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(num_projections, x.shape[1], generator=generator, dtype=torch.float64)
    directions = (directions / directions.norm(dim=1, keepdim=True)).to(x.device)
    px = (directions @ x.T).sort(dim=1).values  # (P, N): one sorted projection per row
    py = (directions @ y.T).sort(dim=1).values
    k = max(px.shape[1], py.shape[1])
    w2_squared = (_quantiles(px, k) - _quantiles(py, k)).square().mean(dim=1)
    return math.sqrt(w2_squared.mean().item())


def energy(*, max_samples: int | None = None, seed: int = 0):
    """Factory of ``energy_distance`` (see there for the options)."""
    if max_samples is not None and max_samples < 2:
        raise ValueError(f"energy: max_samples must be >= 2 or None, got {max_samples!r}")
    return functools.partial(energy_distance, max_samples=max_samples, seed=seed)


def sliced(*, num_projections: int = 256, seed: int = 0):
    """Factory of ``sliced_wasserstein`` (see there for the options)."""
    if num_projections < 1:
        raise ValueError(f"sliced-wasserstein: num_projections must be >= 1, got {num_projections!r}")
    return functools.partial(sliced_wasserstein, num_projections=num_projections, seed=seed)


def quadratic_cost_problem(name: str, options: dict, kind: str, num: int) -> str | None:
    """Why ``energy`` (every pair of items: n² distances of dimension D per score) cannot run on ``num`` image items
    per set, or None. Vector data (toy sets) and ``max_samples`` ≤ ``ENERGY_MAX_IMAGES`` are fine; a data metric's
    reference is at most ``eval.num_samples`` items (``references.reference_sets``), so ``num`` bounds both sets."""
    if name != "energy" or kind != "image":
        return None
    used = min(int(num), options.get("max_samples") or num)
    if used <= ENERGY_MAX_IMAGES:
        return None
    return (f"energy compares every pair of items (a quadratic cost): {used} images per set make {used * used:.2g} "
            f"pairwise image distances per score, for every point of the sweeps; set eval.metric.max_samples (at "
            f"most {ENERGY_MAX_IMAGES}) to subsample each set, lower eval.num_samples, or use a feature metric "
            f"(fid, fd-<dataset>)")


def data_problem(name: str, kind: str) -> str | None:
    """Why metric ``name`` does not apply to ``kind`` data (``image`` or ``vector``: a dataset's ``kind``), naming
    the metrics that do, or None; the text starts with ``name``. A metric registered with ``data="image"`` (or ``"vector"``) scores only that."""
    from ..plugins.registry import entries, entry

    wanted = entry("metric", name).meta.get("data")
    if wanted is None or wanted == kind:
        return None
    fitting = [e.meta["family"].replace("{dataset}", "<dataset>") if e.meta.get("family") else e.name
               for e in entries("metric").values() if e.meta.get("data") in (None, kind)]
    what = {"image": "images (in a detector's features)", "vector": "vectors"}
    return (f"{name} scores {what.get(wanted, wanted + ' data')}, not {kind}s like this data; metrics for "
            f"{kind}s: {', '.join(sorted(fitting)) or '(none registered)'}")


def make_metric(name: str, options: dict | None = None, *, data=None, progress=None, device=None):
    """The registered metric ``name`` (or a member of a registered family, ``fd-<dataset>``) built with ``options``.

    ``data``: the recipe's dataset as ``(name, options)``; a family metric over that very dataset (``fd-<that
    name>``) then trains its classifier on the recipe's data (same options, except that ``labels: false``, which
    makes a recipe's generator unconditional, becomes true: the classifier learns the labels, the images are the
    same) unless the metric's own ``data`` option says otherwise. ``progress`` and ``device`` (the run's) go to every
    factory that declares a parameter of that name and whose options do not set it: a plugin's detector metric runs
    on the run's device like ``fid``.
    """
    from ..plugins.registry import build, entry

    options = dict(options or {})
    if data is not None and entry("metric", name).meta.get("family_option") == ("dataset", data[0]) \
            and "data" not in options:
        options["data"] = dict(data[1])
        if options["data"].get("labels") is False:
            options["data"]["labels"] = True
    return build("metric", name, options, optional={"progress": progress,
                                                    "device": None if device is None else str(device)})
