"""Training hooks that evaluate: ``SampleGrid`` draws a fixed-seed grid of samples from the model being trained every
``every`` steps, through the evaluation engine (``protocols.score``) with the recipe's sampler and schedule
components, their options honoured (the same route as the NFE sweeps of Table 4)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from . import generation
from .protocols import score


def _no_metric(samples, reference) -> float:
    """A grid is drawn, not scored."""
    return 0.0


class SampleGrid:
    """A ``Trainer`` hook: every ``every`` steps rank 0 draws ``num`` samples from the job's model at a fixed seed
    (``protocols.score``, every item seeded by its index, ``keep=num``) and writes ``{out_dir}/{phase}-{step:09d}.png``
    (matplotlib; skipped without it) and, for images, a TensorBoard image through ``tracker``.

    ``sampler``: a sampler component (a recipe ``Component`` or ``{"name": ..., **options}``, built with its options
    through ``generation.build_sampler``) or a sampler function; ``sigmas``: the σ list, or ``schedule`` (a component)
    and ``steps``, the schedule clamped to the model's σ range as in evaluation (``generation.schedule_for``).

    The model is put in eval mode while sampling (and back), and the draws come from their own generators, so
    sampling changes nothing in the training's random streams.
    """

    def __init__(self, every: int, out_dir: str | Path, *, sampler, sigmas: torch.Tensor | None = None,
                 schedule=None, steps: int | None = None, shape, kind: str, label_dim: int = 0, num: int = 64,
                 seed: int = 0, tracker=None):
        if sigmas is None and (schedule is None or steps is None):
            raise ValueError("SampleGrid needs sigmas, or a schedule and steps")
        self.every, self.out_dir = int(every), Path(out_dir)
        self.sampler = sampler if callable(sampler) else generation.build_sampler(sampler)
        self.sigmas, self.schedule, self.steps = sigmas, schedule, steps
        self.shape, self.kind = tuple(shape), kind
        self.label_dim, self.num, self.seed, self.tracker = int(label_dim), int(num), int(seed), tracker

    def sigmas_for(self, model) -> torch.Tensor:
        """The σ list the grid samples ``model`` with."""
        if self.sigmas is not None:
            return self.sigmas
        return generation.schedule_for(model, self.schedule)(self.steps)

    def draw(self, model, device="cpu") -> torch.Tensor:
        """The grid's ``num`` items (model space), ``model`` in eval mode meanwhile."""
        was_training = model.training
        model.eval()
        try:
            _, x = score(model, self.sampler, self.sigmas_for(model), _no_metric, None, num=self.num,
                         shape=self.shape, label_dim=self.label_dim, seed=self.seed, keep=None, device=device)
        finally:
            model.train(was_training)
        return x

    def __call__(self, trainer, stats: dict) -> None:
        if self.every <= 0 or trainer.step % self.every or not trainer.dist.is_main:
            return
        if importlib.util.find_spec("matplotlib") is None:  # pragma: no cover - the [plots] extra is not installed
            return  # nothing could show the grid: do not draw it
        from .figures import image_grid, samples_figure

        x = self.draw(trainer.job.model, trainer.dist.device)
        phase = trainer.job.phase
        self.out_dir.mkdir(parents=True, exist_ok=True)
        samples_figure({f"step {trainer.step}": x}, self.kind, self.out_dir / f"{phase}-{trainer.step:09d}.png",
                       title=phase)
        if self.tracker is not None and self.kind == "image":
            self.tracker.image(f"{phase}/samples", image_grid(x), trainer.step)
