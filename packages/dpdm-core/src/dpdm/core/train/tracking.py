"""Training records: one JSON object per line (JSONL) and, when TensorBoard is installed, its event files.

Only rank 0 writes; ``Tracker`` on other ranks accepts records and drops them, so a training loop calls it
the same way everywhere. A record is ``{"phase", "step", "nimg", <losses>, <grad norms>, <lr>,
"images_per_s", "peak_mem_mb", "skipped", ...}`` (see ``engine.Trainer``); numbers also go to TensorBoard as
``{phase}/{key}`` scalars. Non-finite numbers are written as ``null`` (JSON has no NaN).

The sample grids drawn during training are an evaluation hook (``eval.hooks.SampleGrid``) that writes through
``Tracker.image``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

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
