"""The recovery experiment of the DPDM paper (Section 5.1, Table 1, Figure 4): add N(0, σ²) noise to real items,
denoise once with the teacher and with the student (the same noise for both), and measure how far each recovered
set is from the data distribution.

Two protocols (``eval.recovery_protocol``, ``dpdm recover --protocol``):

- ``paper`` (Section 5.1): a seeded random subset of the *training* split is noised; every set is compared with the
  full training set (for ``fid`` / ``fd-<dataset>`` its feature statistics, e.g. EDM's published reference, which
  are training-set statistics; for data metrics the training items other than the noised ones, since a two-sample
  statistic of a set against itself is biased low, or fresh samples for toy data).
- ``heldout``: the first items of the test split are noised; every set is compared with real data independent of
  them (fresh samples, or the train split), so the paired items never enter a two-sample statistic twice.

Item ``i``'s noise at σ comes from its own generator, seeded with ``derive_seed(derive_seed(seed, bits(σ)), i)``
where ``bits(σ)`` is the IEEE-754 pattern of σ as a float64 and ``i`` the item's index in its split: σ = 2 draws
the same noise whether it is asked alone or within a list, and whatever the batch size.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..datasets import to_model
from ..errors import DpdmError
from ..train.distributed import derive_seed
from .fid import load_stats
from .generation import noise_seeds, sigma_stream  # noqa: F401  (the per-item noise of Section 5.1)
from .protocols import distance, is_feature_metric, recovery  # noqa: F401  (the engine's Section 5.1 loop)
from .references import Items, TensorItems, cached_dataset_stats, dataset_key, first, gather, subset  # noqa: F401

PROTOCOLS = ("paper", "heldout")
PROTOCOL_TEXT = {
    "paper": "the paper's protocol (Section 5.1): a random subset of the training split is noised at σ and denoised "
             "once; each set is compared with the full training set",
    "heldout": "held-out protocol: the first test-split items are noised at σ and denoised once; each set is compared "
               "with real data independent of those items",
}
SUBSET_STREAM = 5  # the paper protocol's subset is drawn with derive_seed(seed, SUBSET_STREAM)
REFERENCE_STREAM = 2000  # a data metric's training reference is drawn with seed + REFERENCE_STREAM


def check_protocol(protocol: str, option: str = "--protocol") -> str:
    if protocol not in PROTOCOLS:
        raise DpdmError(f"{option}: unknown recovery protocol {protocol!r}; use 'paper' (Section 5.1: noised training "
                        f"items against the training set) or 'heldout' (noised test items against independent data)")
    return protocol


def select(protocol: str, train_set, test_set, num: int, seed: int) -> tuple[Items, str | None]:
    """``(items to noise, note or None)``: ``paper``: ``num`` training items drawn without replacement with
    ``derive_seed(seed, SUBSET_STREAM)`` (in index order; all of them when ``num`` ≥ the split); ``heldout``: the
    first ``num`` test items. The note says when ``num`` exceeds the split."""
    check_protocol(protocol)
    dataset, split = (train_set, "training") if protocol == "paper" else (test_set, "test")
    size = len(dataset)
    note = None
    if num > size:
        note = f"--num {num} is more than the {size} items of the {split} split; using all {size} of them"
    if protocol == "heldout":
        return Items(dataset, range(min(num, size))), note
    return subset(dataset, num, derive_seed(seed, SUBSET_STREAM)), note


def training_reference(recipe, train_set, metric, *, num_samples: int, exclude: Sequence[int] = (), dist=None,
                       progress=None):
    """``(reference, description)`` of the paper protocol: the training set.

    Feature metrics: the recipe's ``eval.ref`` statistics when set (EDM's published references are training-set
    statistics), else the train split's feature statistics (cached): the full training set, as the paper compares
    (a few thousand noised items against 50k barely move its statistics). Data metrics: fresh samples of the true
    distribution for toy data (``num_samples`` of them, the seed ``recipe.seed + 2000`` as
    ``references.reference_sets``), else the train split **without the ``exclude``d (noised) items**, read item by
    item and capped at ``num_samples`` of them (a seeded random subset; a data metric needs its reference as one
    tensor): a two-sample statistic such as
    the energy distance between a set and a reference holding the very same items is biased low (below zero for
    a good recovery), which made the student/teacher ratio meaningless on small datasets. This is the one departure
    from the paper's literal protocol, and it is named in the description. When nothing is left (``--num`` covers
    the split), the whole split is used and the description says the estimate is biased.
    """
    if is_feature_metric(metric):
        if recipe.eval.ref:
            return load_stats(recipe.eval.ref), recipe.eval.ref
        stats = cached_dataset_stats(dataset_key(recipe.data, "train"), train_set, metric.detector, dist=dist,
                                     progress=progress)
        return stats, f"{recipe.data.name} training split ({len(train_set)} items, feature statistics)"
    if hasattr(train_set, "sample"):
        g = torch.Generator().manual_seed(recipe.seed + REFERENCE_STREAM)
        return to_model(train_set.sample(num_samples, g)), f"{recipe.data.name} fresh samples ({num_samples})"
    excluded = set(int(i) for i in exclude)
    rest = [i for i in range(len(train_set)) if i not in excluded]
    seed = recipe.seed + REFERENCE_STREAM
    if not rest:
        data = gather(subset(train_set, num_samples, seed))
        return data, (f"{recipe.data.name} training split ({_count(len(data), len(train_set))}, the noised items "
                      f"included: biased low for this two-sample metric; use fewer items)")
    data = gather(subset(train_set, num_samples, seed, among=rest))
    what = _count(len(data), len(rest)) + (f", the other {len(excluded)} are the noised ones" if excluded else "")
    return data, f"{recipe.data.name} training split ({what})"


def _count(used: int, available: int) -> str:
    """``"N items"``, or ``"N random items of M (eval.num_samples)"`` when a data metric's reference is capped."""
    return f"{used} items" if used == available else f"{used} random items of {available} (eval.num_samples)"
