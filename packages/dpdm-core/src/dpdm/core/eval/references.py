"""Real data for evaluation, read item by item: no code path holds a whole split in memory.

- ``Items`` (items of a dataset by index, read batch by batch) and ``TensorItems`` (a model-space tensor): what the
  engine (``protocols``) streams, and what the recovery experiment (Section 5.1) noises.
- ``subset``: a seeded random subset of a split, as ``Items``; ``reference_sets``: the in-run reference and
  validation sets of a recipe (fresh samples for toy data, else seeded subsets of the test and train splits).
- ``dataset_stats`` / ``cached_dataset_stats`` / ``dataset_key``: a detector's feature statistics of a dataset (EDM's
  ``fid.py ref``), split over ranks, cached under ``$DPDM_CACHE/fid-stats/<dataset key>-n<items>--<detector>.npz``.

Data metrics (energy, sliced Wasserstein) compare tensors, so their reference is gathered (``gather``), at most
``eval.num_samples`` items of it; feature metrics (``fid``, ``fd-<dataset>``) stream any number of items.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..datasets import to_model
from ..errors import DpdmError
from ..progress import Progress
from ..train.distributed import Dist
from . import generation
from .fid import FeatureStats, StatsAccumulator, load_stats, save_stats, stats_cache_path

log = logging.getLogger(__name__)

REFERENCE_STREAM, VALIDATION_STREAM = 1000, 2000  # the reference/validation sets are seeded with seed + stream


def read(dataset, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of ``indices`` as the dataset stores them (uint8 images of a ZIP): one batch, never the split."""
    if hasattr(dataset, "__getitems__"):
        x, y = dataset.__getitems__(list(indices))
        return x, y
    pairs = [dataset[i] for i in indices]
    return torch.stack([p[0] for p in pairs]), torch.stack([torch.as_tensor(p[1]) for p in pairs])


@dataclass
class Items:
    """Items of a dataset by index (model space), read batch by batch; ``indices`` also name each item's noise."""

    dataset: object
    indices: Sequence[int]

    def __len__(self) -> int:
        return len(self.indices)

    def batches(self, batch_size: int) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor | None]]:
        labelled = bool(getattr(self.dataset, "label_dim", 0))
        for start in range(0, len(self.indices), batch_size):
            idx = [int(i) for i in self.indices[start:start + batch_size]]
            x, y = read(self.dataset, idx)
            yield idx, to_model(x), (y.to(torch.int64) if labelled else None)


@dataclass
class TensorItems:
    """Items given as a model-space tensor (and labels or None); item ``i`` is row ``i``."""

    data: torch.Tensor
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.data)

    def batches(self, batch_size: int):
        for start in range(0, len(self.data), batch_size):
            x = self.data[start:start + batch_size]
            y = None if self.labels is None else self.labels[start:start + batch_size]
            yield list(range(start, start + len(x))), x, y


def as_items(items, labels=None):
    """``items`` if it reads batch by batch (``Items``/``TensorItems``), else a model-space tensor as
    ``TensorItems``."""
    return items if hasattr(items, "batches") else TensorItems(items, labels)


def subset(dataset, num: int, seed: int, *, ordered: bool = True, among: Sequence[int] | None = None) -> Items:
    """``min(num, size)`` items of ``dataset`` drawn without replacement by ``torch.randperm`` seeded with ``seed``,
    read item by item when used. ``ordered``: in index order (all of them, unshuffled, when ``num`` covers the
    split), else in the permutation's order. ``among``: draw from these indices only (default: the whole split)."""
    pool = list(range(len(dataset))) if among is None else [int(i) for i in among]
    num = min(int(num), len(pool))
    if ordered and num == len(pool):
        return Items(dataset, pool)
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(int(seed)))[:num].tolist()
    chosen = [pool[i] for i in order]
    return Items(dataset, sorted(chosen) if ordered else chosen)


def first(items, n: int) -> torch.Tensor:
    """The first ``n`` items (model space), e.g. the data row of a figure or the clean row of Figure 4."""
    parts, got = [], 0
    for _, x0, _ in as_items(items).batches(max(n, 1)):
        parts.append(x0[:n - got])
        got += len(parts[-1])
        if got >= n:
            break
    return torch.cat(parts) if parts else torch.empty(0)


def gather(items, batch_size: int = 1024) -> torch.Tensor:
    """All ``items`` in one model-space tensor: what a data metric (energy, sliced Wasserstein) compares with. Callers
    cap the items at ``eval.num_samples`` (``reference_sets``, ``recovery.training_reference``)."""
    parts = [x for _, x, _ in as_items(items).batches(batch_size)]
    return torch.cat(parts) if parts else torch.empty(0)


def reference_sets(recipe, train_set, test_set, num: int):
    """``(reference, validation)`` real data as items, each read item by item when used.

    ``reference`` scores samples: fresh samples of the true distribution when the dataset can draw them (toy data,
    seed ``recipe.seed + 1000``), else the test split, a seeded subset of at most ``num`` items in index order (all of
    it when ``num`` covers it; feature metrics use the whole split's cached statistics instead). ``validation`` is
    independent of the test split: fresh samples again (seed ``recipe.seed + 2000``), or ``num`` training items in
    the order of a permutation seeded with ``recipe.seed + 2000``; it selects the one-step σ_max
    and is the reference of the ``heldout`` recovery protocol (which noises the test split).
    """
    if hasattr(test_set, "sample"):
        g_ref = torch.Generator().manual_seed(recipe.seed + REFERENCE_STREAM)
        g_val = torch.Generator().manual_seed(recipe.seed + VALIDATION_STREAM)
        return TensorItems(to_model(test_set.sample(num, g_ref))), TensorItems(to_model(test_set.sample(num, g_val)))
    reference = subset(test_set, num, recipe.seed + REFERENCE_STREAM)
    validation = subset(train_set, num, recipe.seed + VALIDATION_STREAM, ordered=False)
    return reference, validation


def dataset_key(data, split: str) -> str:
    """A name for a recipe's data split in caches, ``<dataset>-<hash of its options>-<split>`` (``data``: the
    recipe's ``data`` component, or anything with ``name`` and ``options``)."""
    options = json.dumps(data.options, sort_keys=True, default=str)
    return f"{data.name}-{hashlib.sha256(options.encode()).hexdigest()[:8]}-{split}"


@torch.no_grad()
def dataset_stats(dataset, detector, *, num: int | None = None, batch_size: int = 250, dist: Dist | None = None,
                  progress: Progress | None = None) -> FeatureStats:
    """Statistics of ``detector`` over the first ``num`` items (default: all) of an image ``dataset``, each rank
    reading its shard batch by batch."""
    if getattr(dataset, "kind", "image") != "image":
        raise DpdmError(f"feature statistics need an image dataset; {getattr(dataset, 'name', 'this dataset')} holds "
                        f"vectors (use the energy or sliced-wasserstein metric)")
    dist, progress = dist or Dist(), progress or Progress()
    total = len(dataset) if num is None else min(int(num), len(dataset))
    if num is not None and num > len(dataset):
        log.info("the dataset has %d items; using all of them (asked for %d)", len(dataset), num)
    mine = list(generation.shard(total, dist.rank, dist.world_size))
    acc = StatsAccumulator()
    with progress.task("reference features", len(mine)) as bar:
        for start in range(0, len(mine), batch_size):
            idx = mine[start:start + batch_size]
            images, _ = read(dataset, idx)
            if images.dtype != torch.uint8:
                raise DpdmError(f"feature statistics need uint8 images, the dataset gives {images.dtype}")
            acc.update(detector(images))
            bar.advance(len(idx))
    return generation.all_reduce_stats(acc, dist, detector.feature_dim)


def cached_dataset_stats(dataset_key: str, dataset, detector, *, num: int | None = None, batch_size: int = 250,
                         dist: Dist | None = None, progress: Progress | None = None) -> FeatureStats:
    """``dataset_stats``, read from / written to ``stats_cache_path(dataset_key + "-n<items>", detector.key)``."""
    dist, progress = dist or Dist(), progress or Progress()
    total = len(dataset) if num is None else min(int(num), len(dataset))
    path = stats_cache_path(f"{dataset_key}-n{total}", detector.key)
    if path.exists():
        log.info("reference statistics: %s (cached)", path)
        return load_stats(str(path))
    stats = dataset_stats(dataset, detector, num=num, batch_size=batch_size, dist=dist, progress=progress)
    if dist.is_main:
        save_stats(str(path), stats, detector=detector.key)
        log.info("reference statistics cached in %s", path)
    dist.barrier()
    return stats
