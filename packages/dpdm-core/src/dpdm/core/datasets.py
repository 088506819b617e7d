"""The dataset contract shared by dpdm-data and third-party dataset plugins.

A dataset factory is ``factory(split="train", **options) -> Dataset``; the dataset is a
``torch.utils.data.Dataset`` whose items are ``(x, label)``:

- ``x``: ``uint8`` ``(C, H, W)`` for images, ``float32`` ``(D,)`` for vector (toy) data;
- ``label``: an ``int64`` scalar class index (0 when the dataset is unlabelled);

and which has the attributes ``shape`` (the per-item shape), ``label_dim`` (number of
classes, 0 if unlabelled) and ``kind`` (``"image"`` or ``"vector"``). Small in-memory datasets
subclass ``TensorDataset``, which also offers ``tensors()`` for fast random batches.
Datasets that know their true distribution (the toy ones) also have
``sample(n, generator=None) -> (n, D)`` float tensors of fresh samples.

Model space: images are mapped to [-1, 1] by ``to_model`` (x/127.5 − 1, as EDM does) and
back by ``from_model`` (as EDM saves images: x·127.5 + 128, clipped, truncated); vector data is used as is.
"""

from __future__ import annotations

import torch


def to_model(x: torch.Tensor) -> torch.Tensor:
    """uint8 images → float32 in [-1, 1] (x/127.5 − 1); float data → float32 unchanged."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32) / 127.5 - 1
    return x.to(torch.float32)


def from_model(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Inverse of ``to_model``: images → uint8 as EDM's ``generate.py`` saves them,
    ``(x * 127.5 + 128).clip(0, 255).to(torch.uint8)``: the +128 (not +127.5) and the truncation of the cast
    together map [k − 0.5, k + 0.5) of the continuous pixel value x·127.5 + 127.5 to k, i.e. round half up
    (``to_model``'s values come back exactly); out-of-range values are clipped. Computed in float64 (EDM's
    images are its float64 sampler state), so a float32 ``x`` is converted from its exact value.
    Vectors are returned unchanged."""
    if kind == "image":
        return (x.to(torch.float64) * 127.5 + 128).clip(0, 255).to(torch.uint8)
    return x


def with_xflip(images: torch.Tensor, labels: torch.Tensor | None):
    """x-flip augmentation as EDM does it: mirrored copies appended, item ``i + N`` is item ``i`` flipped
    left-right (``images`` ``(N, C, H, W)``; ``labels`` ``(N,)`` or None)."""
    flipped = torch.cat([images, images.flip(-1)])
    return flipped, (torch.cat([labels, labels]) if labels is not None else None)


class Batch(tuple):
    """``(x (B, ...), labels (B,))`` already collated by a dataset's ``__getitems__`` (one indexing operation
    instead of B items stacked again); loaders pass it through as it is."""


class TensorDataset(torch.utils.data.Dataset):
    """An in-memory dataset: ``data`` (N, *shape) and optional ``labels`` (N,) int64."""

    def __init__(self, data: torch.Tensor, labels: torch.Tensor | None = None, label_dim: int = 0,
                 kind: str = "vector", name: str = "tensor"):
        if kind not in ("image", "vector"):
            raise ValueError(f"kind must be 'image' or 'vector', got {kind!r}")
        if labels is not None and len(labels) != len(data):
            raise ValueError(f"{name}: {len(labels)} labels for {len(data)} items")
        self.data = data
        self.labels = labels.to(torch.int64) if labels is not None else torch.zeros(len(data), dtype=torch.int64)
        self.label_dim = int(label_dim) if labels is not None else 0
        self.kind = kind
        self.name = name

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[1:])

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i], self.labels[i]

    def __getitems__(self, indices) -> Batch:
        """Many items at once (torch's DataLoader calls this with a batch's indices)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return Batch((self.data[idx], self.labels[idx]))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data, self.labels
