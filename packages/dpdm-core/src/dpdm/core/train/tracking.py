"""Training records: one JSON object per line (JSONL) and, when TensorBoard is installed, its event files.

Only rank 0 writes; ``Tracker`` on other ranks accepts records and drops them, so a training loop calls it
the same way everywhere. A record is ``{"phase", "step", "nimg", <losses>, <grad norms>, <lr>,
"images_per_s", "peak_mem_mb", "skipped", ...}`` (see ``engine.Trainer``); numbers also go to TensorBoard as
``{phase}/{key}`` scalars. Non-finite numbers are written as ``null`` (JSON has no NaN).

``SampleGrid`` is a ``Trainer`` hook that draws a fixed-seed grid of samples from the model being trained
every ``every`` steps (PNG files, and TensorBoard images for image data).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import torch

from .distributed import Dist


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def tensorboard_writer(logdir):
    """A ``SummaryWriter`` for ``logdir``, or None when TensorBoard is not installed (an optional dependency)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(logdir))


class Tracker:
    """Appends records to ``path`` (JSONL) and to TensorBoard under ``tensorboard`` (a folder; optional).

    Use it as a context manager, or call ``close()``, so the TensorBoard files are flushed.
    """

    def __init__(self, path: str | Path | None = None, *, dist: Dist | None = None,
                 tensorboard: str | Path | None = None):
        self.dist = dist or Dist()
        self.path = Path(path) if path is not None and self.dist.is_main else None
        self.writer = tensorboard_writer(tensorboard) if tensorboard is not None and self.dist.is_main else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict) -> None:
        """Write one record (rank 0 only); its ``step`` is TensorBoard's global step."""
        if not self.dist.is_main:
            return
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(_jsonable(record)) + "\n")
        if self.writer is not None:
            phase, step = record.get("phase", "train"), record.get("step")
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self.writer.add_scalar(f"{phase}/{key}", value, step)

    def image(self, tag: str, image, step: int) -> None:
        """An ``(H, W, C)`` or ``(H, W)`` uint8 array to TensorBoard (rank 0, when installed)."""
        if self.writer is not None and self.dist.is_main:
            self.writer.add_image(tag, image, step, dataformats="HWC" if image.ndim == 3 else "HW")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SampleGrid:
    """A ``Trainer`` hook: every ``every`` steps rank 0 draws ``num`` samples from the job's model at a fixed
    seed (``evaluate.generate`` with ``sampler`` over ``sigmas``) and writes ``{out_dir}/{phase}-{step:09d}.png``
    (matplotlib; skipped without it) and, for images, a TensorBoard image through ``tracker``.

    The model is put in eval mode while sampling (and back), and the draws come from their own generator,
    so sampling changes nothing in the training's random streams.
    """

    def __init__(self, every: int, out_dir: str | Path, *, sampler, sigmas: torch.Tensor, shape, kind: str,
                 label_dim: int = 0, num: int = 64, seed: int = 0, tracker: Tracker | None = None):
        self.every, self.out_dir = int(every), Path(out_dir)
        self.sampler, self.sigmas, self.shape, self.kind = sampler, sigmas, tuple(shape), kind
        self.label_dim, self.num, self.seed, self.tracker = int(label_dim), int(num), int(seed), tracker

    def __call__(self, trainer, stats: dict) -> None:
        if self.every <= 0 or trainer.step % self.every or not trainer.dist.is_main:
            return
        from ..eval.evaluate import generate

        model = trainer.job.model
        was_training = model.training
        model.eval()
        try:
            x = generate(model, self.sampler, self.sigmas, self.num, self.shape, label_dim=self.label_dim,
                         seed=self.seed, device=trainer.dist.device)
        finally:
            model.train(was_training)
        phase = trainer.job.phase
        if importlib.util.find_spec("matplotlib") is None:  # pragma: no cover - the [plots] extra is not installed
            return
        from ..eval.figures import image_grid, samples_figure

        self.out_dir.mkdir(parents=True, exist_ok=True)
        samples_figure({f"step {trainer.step}": x}, self.kind, self.out_dir / f"{phase}-{trainer.step:09d}.png",
                       title=phase)
        if self.tracker is not None and self.kind == "image":
            self.tracker.image(f"{phase}/samples", image_grid(x), trainer.step)
