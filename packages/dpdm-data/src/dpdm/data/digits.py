"""scikit-learn's 8 × 8 handwritten digits (``sklearn.datasets.load_digits``, UCI "optdigits").

The 1797 images ship with scikit-learn, so no download is needed. Their pixel values are
integers 0..16; they are mapped to uint8 by ``round(v · 255 / 16)`` (0 → 0, 16 → 255) and
stored as ``(1, 8, 8)`` images with the digit 0..9 as label.

Splits come from one fixed permutation (``torch.randperm`` with ``seed``): its first
``round(test_fraction · 1797)`` indices are "test", the rest "train"; "all" is every image
in the original order.
"""

from __future__ import annotations

import functools

import torch

from dpdm.core.datasets import TensorDataset

SPLITS = ("train", "test", "all")
NUM_CLASSES = 10


@functools.lru_cache(maxsize=1)
def _load() -> tuple[torch.Tensor, torch.Tensor]:
    """All images as uint8 (N, 1, 8, 8) and labels as int64 (N,), read once per process."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "the 'digits' dataset needs scikit-learn; install it with `pip install scikit-learn`"
        ) from error
    bunch = load_digits()
    images = torch.from_numpy(bunch.images * 255 / 16).round().to(torch.uint8).unsqueeze(1)
    return images, torch.from_numpy(bunch.target).to(torch.int64)


def digits(split: str = "train", *, seed: int = 0, test_fraction: float = 0.2, labels: bool = True) -> TensorDataset:
    """The digits dataset (``kind="image"``, uint8 ``(1, 8, 8)``, ``label_dim`` 10, or 0 with ``labels=False``)."""
    if split not in SPLITS:
        raise ValueError(f"digits: unknown split {split!r}; valid splits are {', '.join(map(repr, SPLITS))}")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"digits: test_fraction must be in [0, 1), got {test_fraction!r}")
    images, targets = _load()
    if split == "all":
        index = torch.arange(len(images))
    else:
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(int(seed)))
        num_test = round(test_fraction * len(images))
        index = order[:num_test] if split == "test" else order[num_test:]
    return TensorDataset(images[index], targets[index] if labels else None, label_dim=NUM_CLASSES,
                         kind="image", name="digits")
