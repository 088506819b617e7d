"""Fréchet Inception Distance the way NVlabs/edm computes it (``fid.py`` there).

- ``feature_stats``: detector features of image batches, accumulated in float64 as Σx and Σxxᵀ;
  μ = Σx / n and the unbiased Σ = (Σxxᵀ − n·μμᵀ) / (n − 1), as EDM's ``calculate_inception_stats``.
- ``frechet_distance``: ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2·sqrtm(Σ₁Σ₂)), with scipy's ``sqrtm`` of the
  product and the real part of the result, as EDM's ``calculate_fid_from_inception_stats``.
- Statistics files are ``.npz`` with EDM's keys ``mu`` (D,) and ``sigma`` (D, D), so EDM's published
  reference files (``https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/<dataset>.npz``) load as they are and
  our files load in EDM; ours add ``num_images`` and ``detector``.
- ``stats_cache_path``: ``$DPDM_CACHE/fid-stats/<dataset>--<detector>.npz``.

scipy is needed only for ``frechet_distance`` (the ``fid`` extra) and is imported there.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Callable, Iterable

import attrs
import fsspec
import numpy as np
import torch

from ..io.cache import cache_dir, local_copy
from ..io.storage import write_atomic
from ..errors import DpdmError


@attrs.frozen
class FeatureStats:
    """Mean (D,) and unbiased covariance (D, D), float64, of ``num_images`` feature vectors."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int | None = None


class StatsAccumulator:
    """Running float64 Σx and Σxxᵀ of (N, D) feature batches; ``stats()`` gives μ and the unbiased Σ."""

    def __init__(self):
        self.n = 0
        self.sum: torch.Tensor | None = None  # (D,)
        self.outer: torch.Tensor | None = None  # (D, D)

    def update(self, features: torch.Tensor) -> None:
        features = torch.as_tensor(features).to(torch.float64)
        if features.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {tuple(features.shape)}")
        if self.sum is None:
            self.sum = torch.zeros(features.shape[1], dtype=torch.float64, device=features.device)
            self.outer = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64, device=features.device)
        elif features.shape[1] != self.sum.shape[0]:
            raise ValueError(f"features have {features.shape[1]} dims, earlier batches had {self.sum.shape[0]}")
        self.n += len(features)
        self.sum += features.sum(0)
        self.outer += features.T @ features

    def stats(self) -> FeatureStats:
        if self.n < 2:
            raise DpdmError(f"FID statistics need at least 2 images, got {self.n}")
        mu = self.sum / self.n
        sigma = (self.outer - torch.outer(mu, mu) * self.n) / (self.n - 1)
        return FeatureStats(mu.cpu().numpy(), sigma.cpu().numpy(), self.n)


@torch.no_grad()
def feature_stats(detector: Callable[[torch.Tensor], torch.Tensor], batches: Iterable) -> FeatureStats:
    """Statistics of ``detector(images)`` over ``batches`` (uint8 (N, C, H, W) tensors, or ``(images, labels)``)."""
    acc = StatsAccumulator()
    for batch in batches:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        if len(images):
            acc.update(detector(images))
    return acc.stats()


def _sqrtm():
    try:
        import scipy.linalg
    except ImportError:
        raise DpdmError("the Fréchet distance needs scipy (its sqrtm, as EDM uses): "
                        "pip install scipy") from None
    return scipy.linalg.sqrtm


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2·sqrtm(Σ₁Σ₂)), real part (EDM ``calculate_fid_from_inception_stats``)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    check_dims(mu1, sigma1, mu2, sigma2)
    s = _sqrtm()(sigma1 @ sigma2)  # may be complex from round-off; the real part is taken at the end
    m = np.square(mu1 - mu2).sum()
    return float(np.real(m + np.trace(sigma1 + sigma2 - 2 * s)))


def check_dims(mu, sigma, mu_ref, sigma_ref, *, ref_name: str = "the reference statistics") -> None:
    """A ``DpdmError`` unless both are a (D,) mean with a (D, D) covariance of the same D."""
    for name, m, s in (("the features", mu, sigma), (ref_name, mu_ref, sigma_ref)):
        if m.ndim != 1 or s.shape != (len(m), len(m)):
            raise DpdmError(f"{name}: expected mu (D,) and sigma (D, D), got {m.shape} and {s.shape}")
    if len(mu) != len(mu_ref):
        raise DpdmError(f"{ref_name} have {len(mu_ref)} dims but the features have {len(mu)}: they were computed "
                        f"with another detector; recompute them with this one (or give the matching detector)")


def save_stats(url: str, stats: FeatureStats, *, detector: str | None = None) -> None:
    """Write ``mu``/``sigma`` (EDM's keys) plus ``num_images``/``detector`` to an ``.npz`` on any fsspec URL, complete
    or not at all (``storage.write_atomic``)."""
    extra = {}
    if stats.num_images is not None:
        extra["num_images"] = np.int64(stats.num_images)
    if detector is not None:
        extra["detector"] = np.str_(detector)
    buffer = io.BytesIO()
    np.savez(buffer, mu=stats.mu, sigma=stats.sigma, **extra)
    write_atomic(url, buffer.getvalue())


def load_stats(url: str) -> FeatureStats:
    """Statistics from our ``.npz`` or EDM's reference ``.npz`` (``mu``, ``sigma``), a path or URL.

    Read with ``allow_pickle=False``: an ``.npz`` of object arrays is refused, not unpickled.
    """
    local = local_copy(url)
    try:
        with fsspec.open(local, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DpdmError(f"no FID statistics at {url!r}: compute them from the dataset, or give EDM's published "
                        f"reference (https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/<dataset>.npz)") from None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            missing = [k for k in ("mu", "sigma") if k not in npz.files]
            if missing:
                raise DpdmError(f"{url!r} is not an FID statistics file: it lacks {', '.join(missing)} "
                                f"(has {', '.join(npz.files) or 'nothing'})")
            mu, sigma = npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
            n = int(npz["num_images"]) if "num_images" in npz.files else None
    except (ValueError, OSError) as exc:
        raise DpdmError(f"cannot read FID statistics {url!r}: {exc}") from None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise DpdmError(f"{url!r}: expected mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    return FeatureStats(mu, sigma, n)


def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_") or "_"


def stats_cache_path(dataset_key: str, detector_key: str) -> Path:
    """``$DPDM_CACHE/fid-stats/<dataset>--<detector>.npz`` (keys reduced to file-name characters)."""
    return cache_dir() / "fid-stats" / f"{_slug(dataset_key)}--{_slug(detector_key)}.npz"


def feature_metric(detector, *, batch_size: int = 100):
    """``fn(samples, reference) -> float``: the Fréchet distance between ``detector``'s features of two image sets
    given in model space ([-1, 1], ``(N, C, H, W)``), each converted to uint8 as EDM saves its images
    (``datasets.from_model``: x·127.5 + 128, clipped to [0, 255], truncated) and fed in batches of ``batch_size``.

    ``detector``: uint8 (N, C, H, W) → float (N, D), e.g. ``detectors.Detector`` or the ``fd-<dataset>``
    classifier. ``reference`` may also be ``FeatureStats`` (``fn.prepare(images)``, or a loaded ``.npz``), so a
    reference is featurised once however many sample sets are compared with it. The function carries
    ``detector``, ``prepare`` and ``stats_of``.
    """
    if batch_size < 1:
        raise DpdmError(f"batch_size must be at least 1, got {batch_size}")

    def stats_of(images) -> FeatureStats:
        from ..datasets import from_model

        images = torch.as_tensor(images)
        if images.ndim != 4:
            raise DpdmError(f"{getattr(detector, 'name', 'the detector')} compares images (N, C, H, W), "
                            f"got shape {tuple(images.shape)}")
        uint8 = from_model(images, "image")
        return feature_stats(detector, (uint8[i:i + batch_size] for i in range(0, len(uint8), batch_size)))

    def prepare(reference) -> FeatureStats:
        return reference if isinstance(reference, FeatureStats) else stats_of(reference)

    def distance(samples, reference) -> float:
        a = prepare(samples)
        b = prepare(reference)
        check_dims(a.mu, a.sigma, b.mu, b.sigma)
        return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)

    distance.detector, distance.prepare, distance.stats_of = detector, prepare, stats_of
    return distance


def fid_metric(*, detector: str = "", batch_size: int = 100, device: str = "cpu"):
    """The registered metric ``fid``: ``feature_metric`` with the FID Inception-v3 loaded from ``detector`` (a path
    or URL, see ``detectors.load_detector``), once, when the metric is built."""
    from .detectors import load_detector

    if not detector:
        raise DpdmError("fid: no detector given; set the metric's detector option to the FID Inception-v3 file, "
                        "e.g. eval.metric={name: fid, detector: /path/to/inception-2015-12-05.pkl}")
    if batch_size < 1:
        raise DpdmError(f"fid: batch_size must be at least 1, got {batch_size}")
    return feature_metric(load_detector(detector, device=device), batch_size=batch_size)
