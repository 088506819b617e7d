"""The DPDM training algorithm (Algorithm 1 of the DPDM paper), usable from any loop.

Per student update:
1. ``fake_updates`` times: draw real x0, let the student denoise x_t = x0 + σε (no grad) and
   take one EDM-loss step of the fake-score model on the student's outputs x̂0.
2. Draw real x0, x_t = x0 + σε, x̂0 = d_θ(x_t, σ); re-noise x̂_t = x̂0 + σ'ε' (σ' = σ for the
   smoothed KL); evaluate the frozen teacher and the fake score at x̂_t and descend the
   divergence's surrogate, whose gradient is E[w(σ)(s_fake − s_teacher)·∂x̂_t/∂θ].

Student and fake score start as copies of the teacher; the teacher is frozen once and never
updated; teacher and fake score are both evaluated in eval mode, so at initialisation their
outputs are identical and the student's gradient is exactly zero.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from .divergences import Divergence
from .ema import EMA
from .losses import EDMLoss


def _bcast(sigma, like):
    return sigma.reshape(-1, *([1] * (like.ndim - 1)))


class DPDM:
    """Alternating student / fake-score updates (Algorithm 1).

    Args:
        teacher: the pretrained denoiser ``D(x, sigma, class_labels=None)``; frozen here.
        divergence: a ``Divergence`` (``smoothed-kl`` for DPDM, ``ikl`` for Diff-Instruct).
        fake_loss: the EDM loss used to fit the fake score to the student's outputs.
        lr, betas: Adam for the student (the paper: 1e-5 on images; 1e-4 on toy problems).
        fake_lr, fake_betas: Adam for the fake score (defaults: the student's).
        fake_updates: fake-score updates per student update.
        student, fake: optional initial models (default: copies of the teacher).
        ema_halflife_nimg: keep an EMA of the student with this half-life (images), or None.
        grad_clip: clip the student's and fake's gradient norms, or None.
    """

    def __init__(self, teacher: nn.Module, divergence: Divergence, fake_loss: EDMLoss, *, lr: float = 1e-4,
                 betas=(0.0, 0.99), fake_lr: float | None = None, fake_betas=None, fake_updates: int = 1,
                 student: nn.Module | None = None, fake: nn.Module | None = None,
                 ema_halflife_nimg: float | None = None, ema_rampup: float | None = 0.05,
                 grad_clip: float | None = None):
        if fake_updates < 1:
            raise ValueError(f"fake_updates must be >= 1, got {fake_updates}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = (student if student is not None else copy.deepcopy(teacher)).train().requires_grad_(True)
        self.fake = (fake if fake is not None else copy.deepcopy(teacher)).requires_grad_(True)
        self.divergence = divergence
        self.fake_loss = fake_loss
        self.fake_updates = int(fake_updates)
        self.grad_clip = grad_clip
        self.opt_student = torch.optim.Adam(self.student.parameters(), lr=lr, betas=tuple(betas))
        self.opt_fake = torch.optim.Adam(self.fake.parameters(), lr=fake_lr if fake_lr is not None else lr,
                                         betas=tuple(fake_betas if fake_betas is not None else betas))
        self.ema = EMA(self.student, ema_halflife_nimg, ema_rampup) if ema_halflife_nimg else None
        self.nimg = 0  # real images shown to the student

    @property
    def model(self) -> nn.Module:
        """The student to evaluate: its EMA if kept, else the trained weights."""
        return self.ema.model if self.ema is not None else self.student

    def _clip(self, module: nn.Module) -> float:
        params = [p for p in module.parameters() if p.grad is not None]
        for p in params:
            torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)
        norm = nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip else float("inf"))
        return float(norm)

    def student_outputs(self, x0: torch.Tensor, class_labels=None, generator=None):
        """Feed the student as the divergence prescribes; returns ``(x̂0, σ_in)``."""
        x_in, sigma_in = self.divergence.student_input(x0, generator)
        return self.student(x_in, sigma_in, class_labels=class_labels), sigma_in

    def fake_step(self, x0: torch.Tensor, class_labels=None, generator=None) -> dict:
        """One EDM-loss step of the fake score on the student's (detached) outputs.

        The fake score is fitted at the noise levels the divergence will query it at: for the
        smoothed KL the σ that produced each output, so that D_fake(·, σ) models the student's
        output distribution *at input level σ*, smoothed by σ (Eq. 3.3); for IKL a fresh σ.
        """
        with torch.no_grad():
            x0_hat, sigma_in = self.student_outputs(x0, class_labels, generator)
            sigma = self.divergence.renoise_sigma(sigma_in, generator)
        self.fake.train()
        loss = self.fake_loss(self.fake, x0_hat.detach(), class_labels=class_labels, generator=generator,
                              sigma=sigma).mean()
        self.opt_fake.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = self._clip(self.fake)
        self.opt_fake.step()
        return {"fake_loss": float(loss.detach()), "fake_grad_norm": grad_norm}

    def student_loss(self, x0: torch.Tensor, class_labels=None, generator=None) -> torch.Tensor:
        """The divergence's per-sample surrogate for one batch of real data (Eq. 3.4)."""
        x0_hat, sigma_in = self.student_outputs(x0, class_labels, generator)
        sigma = self.divergence.renoise_sigma(sigma_in, generator)
        noise = torch.randn(x0_hat.shape, generator=generator, device=x0_hat.device, dtype=x0_hat.dtype)
        x_t_hat = x0_hat.detach() + _bcast(sigma, x0_hat) * noise  # only x̂0 carries the gradient
        self.fake.eval()
        with torch.no_grad():
            d_teacher = self.teacher(x_t_hat, sigma, class_labels=class_labels)
            d_fake = self.fake(x_t_hat, sigma, class_labels=class_labels)
        return self.divergence(x0_hat, sigma, d_teacher.to(x0_hat.dtype), d_fake.to(x0_hat.dtype))

    def student_step(self, x0: torch.Tensor, class_labels=None, generator=None) -> dict:
        loss = self.student_loss(x0, class_labels, generator).mean()
        self.opt_student.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = self._clip(self.student)
        self.opt_student.step()
        if self.ema is not None:
            self.ema.update(self.student, self.nimg, x0.shape[0])
        self.nimg += x0.shape[0]
        return {"student_loss": float(loss.detach()), "student_grad_norm": grad_norm}

    def step(self, next_batch: Callable[[], tuple], generator=None) -> dict:
        """One iteration: ``fake_updates`` fake-score steps, then one student step.

        ``next_batch()`` returns ``(x0, class_labels)`` in model space (labels may be None).
        """
        stats: dict = {}
        for _ in range(self.fake_updates):
            stats.update(self.fake_step(*next_batch(), generator=generator))
        stats.update(self.student_step(*next_batch(), generator=generator))
        return stats
