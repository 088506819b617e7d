"""Teacher training: EDM's denoising objective (Karras et al. 2022, Eq. 2; ``training/loss.py``).

``TeacherJob`` is the engine's job (``engine.Trainer`` runs it, single process or DDP, with gradient
accumulation, mixed precision, non-finite guards and snapshots); ``TeacherTrainer`` is the same step
for a caller's own loop, one batch at a time.
"""

from __future__ import annotations

import torch
from torch import nn

from .distributed import Dist
from .ema import EMA
from .trainable import EvaluatedModel, Trainable, job_state, load_job_state
from ..losses import EDMLoss
from .precision import Precision
from ..defaults import TEACHER_BETAS, TEACHER_LR  # noqa: F401  (shared with the recipe schema)

# Defaults of TeacherJob and TeacherTrainer that the recipe schema (config/recipe.py, TeacherTrainConfig) takes
# from here


def device_of(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (the CPU for a module without parameters)."""
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class TeacherJob(EvaluatedModel):
    """Adam on the EDM loss (per sample summed over pixels, averaged over the batch, as in EDM), with an
    optional EMA of the weights (EDM App. F half-life rule, ``ema.EMA``), lr warm-up and gradient clipping.

    One iteration is one optimizer step over ``accum`` micro-batches. ``denoiser`` is a preconditioned
    denoiser ``D(x, sigma, class_labels=None)``; ``loss(D, x0, class_labels=, generator=)`` returns
    per-sample losses (``EDMLoss``). The remaining arguments are ``trainable.Trainable``'s.
    """

    phase = "teacher"

    def __init__(self, denoiser: nn.Module, loss: EDMLoss, *, lr: float = TEACHER_LR, betas=TEACHER_BETAS,
                 eps: float = 1e-8, lr_warmup_nimg: float = 0.0, grad_clip: float | None = None,
                 ema_halflife_nimg: float | None = None, ema_rampup: float | None = 0.05, accum: int = 1,
                 precision: Precision | None = None, dist: Dist | None = None, find_unused_parameters: bool = False):
        if accum < 1:
            raise ValueError(f"accum must be >= 1, got {accum}")
        self.loss = loss
        self.accum = int(accum)  # micro-batches per optimizer step
        self.trainable = Trainable("model", denoiser, lr=lr, betas=betas, eps=eps, warmup_nimg=lr_warmup_nimg,
                                   grad_clip=grad_clip, precision=precision, dist=dist,
                                   find_unused_parameters=find_unused_parameters)
        self.parts = {"model": self.trainable}
        self.main = self.trainable
        self.ema = EMA(self.trainable.module, ema_halflife_nimg, ema_rampup) if ema_halflife_nimg else None

    @property
    def denoiser(self) -> nn.Module:
        """The trained weights (the raw module, never the DDP wrapper)."""
        return self.trainable.module

    def iteration(self, next_batch, generator: torch.Generator | None = None) -> dict:
        """One EDM-loss optimizer step; the EMA follows every applied step."""
        nimg = self.trainable.nimg

        def micro_loss(model, x0, labels):
            return self.loss(model, x0, class_labels=labels, generator=generator)

        stats = self.trainable.step(micro_loss, next_batch, self.accum)
        if stats["applied"] and self.ema is not None:
            self.ema.update(self.trainable.module, nimg, stats["images"])
        return {k: v for k, v in stats.items() if k != "applied"}

    def weights(self) -> dict[str, nn.Module]:
        return {"model": self.trainable.module, **({"ema": self.ema.model} if self.ema is not None else {})}

    def state_dict(self) -> dict:
        return job_state(self)

    def load_state_dict(self, state: dict) -> None:
        load_job_state(self, state)


class TeacherTrainer:
    """``TeacherJob``'s step for a caller's own single-process loop: ``step(x0, class_labels, generator)``
    trains on one batch (on the denoiser's device) and returns ``{"loss": ...}``; ``model`` is the model to
    evaluate. A step with a NaN/Inf loss or gradient is skipped (``skipped`` counts them)."""

    def __init__(self, denoiser: nn.Module, loss: EDMLoss, lr: float = TEACHER_LR,
                 betas: tuple[float, float] = TEACHER_BETAS, ema_halflife_nimg: float | None = None,
                 ema_rampup: float | None = 0.05, grad_clip: float | None = None, lr_warmup_nimg: float = 0.0):
        self.job = TeacherJob(denoiser, loss, lr=lr, betas=betas, lr_warmup_nimg=lr_warmup_nimg, grad_clip=grad_clip,
                              ema_halflife_nimg=ema_halflife_nimg, ema_rampup=ema_rampup,
                              dist=Dist(device=device_of(denoiser)))
        self.denoiser, self.loss, self.ema = self.job.denoiser, loss, self.job.ema
        self.opt = self.job.trainable.optimizer

    @property
    def model(self) -> nn.Module:
        return self.job.model

    @property
    def nimg(self) -> int:
        return self.job.nimg

    @property
    def skipped(self) -> int:
        return self.job.trainable.skipped

    def step(self, x0: torch.Tensor, class_labels=None, generator=None) -> dict:
        return {"loss": self.job.iteration(lambda: (x0, class_labels), generator)["loss"]}
