"""The ``fd-<dataset>`` metric: a clearly named substitute for FID when the Inception detector is not at hand.

``fd-<dataset>`` is the Fréchet distance (``fid.frechet_distance``, computed exactly as FID is) between two image
sets in the penultimate features of a small CNN (``FDClassifier``) trained on ``<dataset>``'s training split to
classify its labels: the common practice for MNIST-like data, where Inception features say little.

- Training (``train_classifier``) is deterministic for a seed on the CPU: the weights are initialised and the
  batches shuffled from that seed only (the global RNG is left untouched), and the classifier's accuracy on the
  test split is recorded beside it.
- The trained classifier is cached once per dataset, data options, training settings and seed, at
  ``$DPDM_CACHE/fd-classifiers/<dataset>-<hash>-seed<seed>.safetensors`` (weights only) with a JSON sidecar
  ``….json`` holding ``info`` (dataset, options, seed, epochs, test accuracy, image counts, torch version).
  Later calls load it without training. Delete the two files to retrain.
- The detector's ``key`` (``fd-<dataset>-<sha256 of the weights, 12 hex>``) keys cached reference statistics,
  so statistics made with another classifier (another seed, another machine's training) are never mixed up.

Values of ``fd-<dataset>`` are comparable only between runs that use the same classifier (same ``key``); they
are NOT FIDs and NOT comparable with published FID numbers, nor with other papers' "FD" classifiers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import torch
from torch import nn

from ..io.cache import cache_dir
from ..io.storage import first_line, write_atomic
from ..datasets import to_model
from .detectors import FeatureDetector
from ..errors import DpdmError
from .fid import _slug, feature_metric
from .references import read
from ..progress import Progress

log = logging.getLogger(__name__)

RECIPE_VERSION = 1  # bump when the network or the training recipe changes: cached classifiers are then retrained
EPOCHS = 3  # at least this many epochs...
MIN_STEPS = 200  # ...and at least this many optimiser steps (small datasets get more epochs)
BATCH_SIZE = 128
LR = 3e-3
WIDTHS = (32, 64, 96, 128)


class FDClassifier(nn.Module):
    """A small CNN for model-space ([-1, 1]) images of ``shape`` ``(C, H, W)``, any size ≥ 8×8.

    One 3×3 conv per entry of ``widths``, with stride 2 while its input is at least 4×4 (28×28 becomes 2×2 after
    the default four, 8×8 stays 2×2 from the third on), each but the last followed by GroupNorm and ReLU; global
    average pooling; a linear layer to ``feature_dim`` whose output is ``features(x)``; ReLU and a linear layer to
    ``num_classes`` logits (``forward(x)``).
    """

    def __init__(self, shape, num_classes: int, feature_dim: int = 128, widths=WIDTHS):
        super().__init__()
        channels, size = shape[0], min(shape[1:])
        layers = []
        for width in widths:
            stride = 2 if size >= 4 else 1
            layers += [nn.Conv2d(channels, width, 3, stride=stride, padding=1), nn.GroupNorm(min(8, width), width),
                       nn.ReLU()]
            channels, size = width, (size + 1) // 2 if stride == 2 else size
        # the last conv feeds the pooling directly: a ReLU there leaves dead (always 0) features, and GroupNorm
        # then pooling makes each group's features sum to a constant; either makes the features' covariance
        # singular, which the Fréchet distance's sqrtm handles badly (so does pooling a 1×1 map)
        self.body = nn.Sequential(*layers[:-2], nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature = nn.Linear(channels, feature_dim)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feature_dim, num_classes))
        self.shape, self.num_classes, self.feature_dim = tuple(shape), num_classes, feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate features (N, feature_dim)."""
        return self.feature(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The class logits (N, num_classes)."""
        return self.head(self.features(x))


def read_labelled(dataset, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (B, C, H, W) and int64 labels (B,) of ``indices``: one batch read, never the whole split."""
    images, labels = read(dataset, indices)
    return torch.as_tensor(images), torch.as_tensor(labels).to(torch.int64).reshape(-1)


def default_epochs(num_train: int, batch_size: int = BATCH_SIZE) -> int:
    """``EPOCHS``, or more for small datasets so that training takes at least ``MIN_STEPS`` steps."""
    steps_per_epoch = max(1, math.ceil(num_train / batch_size))
    return max(EPOCHS, math.ceil(MIN_STEPS / steps_per_epoch))


@torch.no_grad()
def accuracy(net: FDClassifier, dataset, batch_size: int = 1000) -> float:
    """The fraction of ``dataset``'s labelled uint8 images that ``net`` classifies right, read batch by batch."""
    if not len(dataset):
        return float("nan")
    was_training = net.training
    net.eval()
    correct = 0
    for i in range(0, len(dataset), batch_size):
        images, labels = read_labelled(dataset, range(i, min(i + batch_size, len(dataset))))
        correct += (net(to_model(images)).argmax(1) == labels).sum().item()
    net.train(was_training)
    return correct / len(dataset)


def train_classifier(train_set, test_set, *, seed: int = 0, epochs: int | None = None, batch_size: int = BATCH_SIZE,
                     lr: float = LR, feature_dim: int = 128, progress: Progress | None = None):
    """Train an ``FDClassifier`` on ``train_set`` (labelled image dataset) and measure it on ``test_set``.

    Adam with a one-cycle learning-rate schedule peaking at ``lr``, cross-entropy, ``epochs`` passes (None:
    ``default_epochs``) in shuffled batches. Deterministic for ``seed`` on the CPU: initialisation and shuffling
    use ``seed`` only, and the global RNG state is restored afterwards. Returns ``(net in eval mode, test accuracy)``.
    """
    progress = progress or Progress()
    num_train = len(train_set)  # read batch by batch (``read_labelled``): the split is never held whole
    if num_train == 0:
        raise DpdmError("the fd classifier's training split is empty")
    num_classes = int(train_set.label_dim)
    epochs = default_epochs(num_train, batch_size) if epochs is None else int(epochs)
    if epochs < 1 or batch_size < 1:
        raise DpdmError(f"the fd classifier needs epochs >= 1 and batch_size >= 1, got {epochs} and {batch_size}")
    steps_per_epoch = math.ceil(num_train / batch_size)
    with torch.random.fork_rng(devices=[]):  # the network's initialisation must not touch the global RNG
        torch.manual_seed(seed)
        net = FDClassifier(tuple(train_set.shape), num_classes, feature_dim)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    net.train()
    with progress.task("training the fd classifier", total=epochs * steps_per_epoch) as task:
        for epoch in range(epochs):
            order = torch.randperm(num_train, generator=generator)
            for step in range(steps_per_epoch):
                images, labels = read_labelled(train_set, order[step * batch_size:(step + 1) * batch_size].tolist())
                loss = nn.functional.cross_entropy(net(to_model(images)), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                task.advance(1, epoch=epoch + 1, loss=loss.item())
    net.eval()
    return net, accuracy(net, test_set)


class ClassifierDetector(FeatureDetector):
    """uint8 (N, C, H, W) images → float32 (N, feature_dim) penultimate features of a trained ``FDClassifier``.

    ``detectors.FeatureDetector``'s interface (``name`` is ``fd-<dataset>``, ``digest`` that of the weights file),
    plus ``accuracy`` (on the test split), ``info`` and the dataset's item ``shape``.
    """

    def __init__(self, net: FDClassifier, *, name: str, digest: str, info: dict, device="cpu"):
        super().__init__(net, name=name, digest=digest, feature_dim=net.feature_dim, device=device)
        self.info = info
        self.shape = tuple(info["shape"])
        self.accuracy = float(info["test_accuracy"])

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != self.shape:
            c, h, w = self.shape
            raise DpdmError(f"the {self.name} detector takes uint8 (N, {c}, {h}, {w}) images (its dataset's shape), "
                            f"got {images.dtype} {tuple(images.shape)}")
        return self.net.features(to_model(images.to(self.device))).to(torch.float32)

    def __repr__(self) -> str:
        return f"ClassifierDetector({self.name!r}, accuracy={self.accuracy:.4f})"


def cache_path(dataset: str, data: dict | None = None, *, seed: int = 0, epochs: int | None = None) -> Path:
    """``$DPDM_CACHE/fd-classifiers/<dataset>-<hash of data options and training settings>-seed<seed>.safetensors``."""
    settings = {"data": data or {}, "epochs": epochs, "batch_size": BATCH_SIZE, "lr": LR, "widths": WIDTHS,
                "version": RECIPE_VERSION}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return cache_dir() / "fd-classifiers" / f"{_slug(dataset)}-{digest}-seed{int(seed)}.safetensors"


def _build(dataset: str, split: str, data: dict):
    from ..plugins import registry

    factory = registry.get("dataset", dataset)  # UnknownComponentError (a DpdmError) lists the registered ones
    try:
        return factory(split=split, **data)
    except Exception as exc:
        raise DpdmError(f"fd-{dataset}: cannot build dataset {dataset!r} (split {split!r}, options {data}): "
                        f"{type(exc).__name__}: {exc}") from None


def _load_cached(path: Path, name: str, device) -> ClassifierDetector:
    from safetensors.torch import load as st_load

    sidecar = path.with_suffix(".json")
    try:
        blob = path.read_bytes()
        info = json.loads(sidecar.read_text())
        net = FDClassifier(info["shape"], info["num_classes"], info["feature_dim"])
        net.load_state_dict(st_load(blob))
    except Exception as exc:
        reason = first_line(exc)[:200]
        raise DpdmError(f"{name}: the cached classifier {str(path)!r} (with {sidecar.name}) is unreadable "
                        f"({type(exc).__name__}: {reason}); delete {str(path)!r} and {str(sidecar)!r} to retrain "
                        f"it") from None
    return ClassifierDetector(net, name=name, digest=hashlib.sha256(blob).hexdigest()[:12], info=info, device=device)


def fd_detector(dataset: str, *, data: dict | None = None, seed: int = 0, epochs: int | None = None, device="cpu",
                progress: Progress | None = None) -> ClassifierDetector:
    """The ``fd-<dataset>`` detector: a classifier trained on ``dataset`` (built with the options ``data``) with
    ``seed``, loaded from the cache (``cache_path``) or trained on the CPU and cached on first use."""
    name = f"fd-{dataset}"
    data = dict(data or {})
    progress = progress or Progress()
    path = cache_path(dataset, data, seed=seed, epochs=epochs)
    if path.exists():
        return _load_cached(path, name, device)
    train_set, test_set = _build(dataset, "train", data), _build(dataset, "test", data)
    if getattr(train_set, "kind", None) != "image":
        raise DpdmError(f"{name}: dataset {dataset!r} is {getattr(train_set, 'kind', 'not')!r} data; the fd "
                        f"substitute metric compares images (use the energy or sliced-wasserstein metric instead)")
    if not getattr(train_set, "label_dim", 0):
        raise DpdmError(f"{name}: dataset {dataset!r} (options {data}) is unlabelled (label_dim 0), but the fd "
                        f"classifier is trained on class labels; give the dataset its labels (e.g. labels: true)")
    log.info("%s: training its feature classifier (seed %d), cached afterwards at %s", name, seed, path)
    net, test_accuracy = train_classifier(train_set, test_set, seed=seed, epochs=epochs, progress=progress)
    info = {"metric": name, "dataset": dataset, "data": data, "seed": int(seed),
            "epochs": epochs or default_epochs(len(train_set)), "batch_size": BATCH_SIZE, "lr": LR,
            "test_accuracy": test_accuracy, "num_train": len(train_set), "num_test": len(test_set),
            "shape": list(train_set.shape), "num_classes": net.num_classes, "feature_dim": net.feature_dim,
            "torch": torch.__version__, "recipe_version": RECIPE_VERSION,
            "note": "Fréchet distance in this classifier's features; not comparable with published FIDs"}
    from safetensors.torch import save as st_save

    blob = st_save({k: v.contiguous() for k, v in net.state_dict().items()})
    write_atomic(str(path.with_suffix(".json")), json.dumps(info, indent=2, default=str).encode())
    write_atomic(str(path), blob)  # last: its presence marks a complete cache entry
    log.info("%s: test accuracy %.2f%%, saved %s", name, 100 * test_accuracy, path)
    return ClassifierDetector(net, name=name, digest=hashlib.sha256(blob).hexdigest()[:12], info=info, device=device)


def fd_metric(*, dataset: str, data: dict | None = None, seed: int = 0, epochs: int | None = None,
              batch_size: int = 100, device: str = "cpu", progress: Progress | None = None):
    """The metric ``fd-<dataset>`` (the registered family ``fd``): ``fid.feature_metric`` with the ``fd_detector`` of
    ``dataset`` (trained once and cached, with ``progress`` shown; see the module docstring). The returned
    ``fn(samples, reference) -> float`` carries ``.detector``."""
    if batch_size < 1:
        raise DpdmError(f"fd-{dataset}: batch_size must be at least 1, got {batch_size}")
    return feature_metric(fd_detector(dataset, data=data, seed=seed, epochs=epochs, device=device, progress=progress),
                          batch_size=batch_size)
