"""The DPDM training algorithm (Algorithm 1 of the DPDM paper), usable from any loop.

One iteration, in the paper's order (``order="fake-first"``, the default):
1. ``fake_updates`` fake-score updates (Algorithm 1, line 1): each an EDM-loss step on student outputs x̂0 =
   d_θ(x0 + σε, σ) of fresh real x0 (made without gradients), at the σ that made them.
2. One student update (line 2): draw real x0, x_t = x0 + σε, x̂0 = d_θ(x_t, σ); re-noise x̂_t = x̂0 + σ'ε' (σ' = σ
   for the smoothed KL); evaluate the frozen teacher and the just-updated fake score at x̂_t and descend the
   divergence's surrogate, whose gradient is E[w(σ)(s_fake − s_teacher)·∂x̂_t/∂θ].

``order="student-first"`` (DMD2's order, an option) takes the student step first and lets the first fake update
reuse its detached x̂0, as DMD2 reuses its generator's samples: one student forward less per iteration (the
iteration's cost floor is then 8/3 of a teacher step), but the student's gradient then comes from a fake score
one update older.

Student and fake score start as copies of the teacher (or as the teacher's own weights plus low-rank adapters that
start at zero, ``fake_lora``/``student_lora``, ``lora.py``: against the memory cost the paper's Section 6 names, an
option); the teacher is frozen once and never updated; teacher and fake score are both evaluated in eval mode, so at
initialisation their outputs are identical and the student's gradient is exactly zero. The student makes the fake score's data in eval mode (dropout off: the
outputs Algorithm 2 samples), and by default its own step runs in eval mode too (``student_dropout=False``), so
the distribution the divergence matches is the one Algorithm 2 samples from; ``student_dropout=True`` keeps
dropout on in the student's own step, as Diff-Instruct trains its generator. The fake score trains with dropout
on, as EDM trains a diffusion model.

``fake_score_loss`` and ``student_loss`` are the two losses as functions of the models;
``DistillJob`` runs Algorithm 1 in the engine (``engine.Trainer``: DDP, accumulation, mixed precision,
guards, snapshots); ``DPDM`` is the same algorithm for a caller's own single-process loop.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from .distributed import Dist
from ..divergences import Divergence
from .ema import EMA
from .lora import Adapters, LoraError, adapted_copy, adapter_parameters, is_adapted
from .trainable import EvaluatedModel, Trainable, job_state, load_job_state
from ..losses import EDMLoss
from .precision import Precision, frozen_call
from .teacher import device_of
from ..utils import append_dims
from ..defaults import FAKE_UPDATES, STUDENT_BETAS, STUDENT_LR  # noqa: F401  (shared with the recipe schema)

ORDERS = ("fake-first", "student-first")
# Defaults of DistillJob and DPDM that the recipe schema (config/recipe.py, TrainConfig) takes from here


def student_outputs(student: nn.Module, divergence: Divergence, x0: torch.Tensor, class_labels=None,
                    generator=None):
    """Feed the student as the divergence prescribes; returns ``(x̂0, σ_in)``."""
    x_in, sigma_in = divergence.student_input(x0, generator)
    return student(x_in, sigma_in, class_labels=class_labels), sigma_in


def fake_score_loss(fake: nn.Module, student: nn.Module, divergence: Divergence, loss: EDMLoss, x0: torch.Tensor,
                    class_labels=None, generator=None) -> torch.Tensor:
    """Per-sample EDM loss ``(B,)`` of the fake score on the student's (detached) outputs (Algorithm 1, line 1).

    The fake score is fitted at the noise levels the divergence will query it at: for the
    smoothed KL the σ that produced each output, so that D_fake(·, σ) models the student's
    output distribution *at input level σ*, smoothed by σ (Eq. 3.3); for IKL a fresh σ.
    """
    with torch.no_grad(), frozen_call():
        x0_hat, sigma_in = student_outputs(student, divergence, x0, class_labels, generator)
    return loss(fake, x0_hat.detach(), class_labels=class_labels, generator=generator,
                sigma=divergence.renoise_sigma(sigma_in, generator))


def in_chunks(model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, class_labels=None,
              chunk: int | None = None) -> torch.Tensor:
    """``model(x, sigma, class_labels=class_labels)``, evaluated ``chunk`` samples at a time and concatenated
    (None, or a chunk at least the batch: in one call). Per-sample networks give the same outputs up to round-off
    (the kernels' blocking depends on the batch size); only one chunk's activations are alive at a time."""
    if chunk is None or chunk >= len(x):
        return model(x, sigma, class_labels=class_labels)
    part = lambda t, i: t if t is None or t.ndim == 0 else t[i:i + chunk]  # noqa: E731  (a scalar σ: shared)
    return torch.cat([model(x[i:i + chunk], part(sigma, i), class_labels=part(class_labels, i))
                      for i in range(0, len(x), chunk)])


def student_loss(student: nn.Module, teacher: nn.Module, fake: nn.Module, divergence: Divergence, x0: torch.Tensor,
                 class_labels=None, generator=None, outputs: list | None = None,
                 score_chunk: int | None = None) -> torch.Tensor:
    """The divergence's per-sample surrogate ``(B,)`` for one batch of real data (Eq. 3.4; Algorithm 1, line 2).

    Teacher and fake score are called as given, without gradients (pass raw modules, in eval mode), on
    ``score_chunk`` samples at a time if given (``in_chunks``): they run while the student's graph is alive, so
    their activations add to its; in chunks, only one chunk's do.
    ``outputs``: if given, ``(x̂0 detached, σ_in, class_labels)`` is appended to it for a fake-score update.
    """
    x0_hat, sigma_in = student_outputs(student, divergence, x0, class_labels, generator)
    if outputs is not None:
        outputs.append((x0_hat.detach(), sigma_in.detach(), class_labels))
    sigma = divergence.renoise_sigma(sigma_in, generator)
    noise = torch.randn(x0_hat.shape, generator=generator, device=x0_hat.device, dtype=x0_hat.dtype)
    x_t_hat = x0_hat.detach() + append_dims(sigma, x0_hat.ndim) * noise  # only x̂0 carries the gradient
    with torch.no_grad(), frozen_call():
        d_teacher = in_chunks(teacher, x_t_hat, sigma, class_labels, score_chunk)
        d_fake = in_chunks(fake, x_t_hat, sigma, class_labels, score_chunk)
    return divergence(x0_hat, sigma, d_teacher.to(x0_hat.dtype), d_fake.to(x0_hat.dtype))


class DistillJob(EvaluatedModel):
    """Algorithm 1 as an engine job: each iteration takes ``fake_updates`` fake-score steps and one student step,
    in the order ``order`` (see the module docstring).

    Each step is one optimizer step over ``accum`` micro-batches. Under DDP student and fake score each get
    their own ``DistributedDataParallel`` wrapper, and a step only ever runs its own model's wrapper: the
    student step calls the fake score and the teacher as raw modules without gradients, the fake step calls
    the student's raw module without gradients, so no wrapper waits on a reduction that never comes
    (``find_unused_parameters=False`` works). The teacher is frozen, never wrapped and never synced.
    The EMA of the student follows every applied student step (EDM App. F, ``ema.EMA``).

    Args:
        teacher: the pretrained denoiser ``D(x, sigma, class_labels=None)``; frozen here.
        divergence: a ``Divergence`` (``smoothed-kl`` for DPDM, ``ikl`` for Diff-Instruct).
        fake_loss: the EDM loss used to fit the fake score to the student's outputs.
        student, fake: optional initial models (default: copies of the teacher).
        fake_lora: ``{"rank": r, "alpha": α, "targets": [globs]}`` makes the fake score the teacher's own weights
            (shared, frozen) plus low-rank adapters (``lora.py``): only the adapters train, are saved in snapshots
            and are synchronised under DDP. None (default): a full copy of the teacher, as the paper.
        student_lora: the same for the student (and its EMA, which then averages the adapters alone), for a teacher
            too large to copy; None (default): a full copy, as the paper's student.
        lr, betas: Adam for the student (the paper, Table 8: 1e-5, (0, 0.99)).
        fake_lr, fake_betas: Adam for the fake score (defaults: the student's; Table 8 uses the same).
        fake_updates: fake-score updates per student update (Algorithm 1 alternates one and one).
        order: ``fake-first`` (Algorithm 1) or ``student-first`` (DMD2's, saves a student forward).
        student_dropout: keep dropout on in the student's own forward (default off: eval mode).
        lr_warmup_nimg: linear lr warm-up of both models, in images each has trained on (0: none).
        grad_clip: clip the student's and fake's gradient norms, or None.
        ema_halflife_nimg, ema_rampup: EMA of the student (None: no EMA).
        score_chunk: in the student step, evaluate the teacher and the fake score on this many samples at a time
            (``student_loss``), so that their activations never sit beside the whole student graph: less peak
            memory, the same result up to round-off. None (default): the whole micro-batch in one call.
        accum, precision, dist, find_unused_parameters: see ``trainable.Trainable``.
    """

    phase = "student"

    def __init__(self, teacher: nn.Module, divergence: Divergence, fake_loss: EDMLoss, *,
                 student: nn.Module | None = None, fake: nn.Module | None = None, fake_lora: dict | None = None,
                 student_lora: dict | None = None, lr: float = STUDENT_LR,
                 betas=STUDENT_BETAS, fake_lr: float | None = None, fake_betas=None, fake_updates: int = FAKE_UPDATES,
                 order: str = "fake-first", student_dropout: bool = False,
                 lr_warmup_nimg: float = 0.0, grad_clip: float | None = None,
                 ema_halflife_nimg: float | None = None, ema_rampup: float | None = 0.05, accum: int = 1,
                 score_chunk: int | None = None, precision: Precision | None = None, dist: Dist | None = None,
                 find_unused_parameters: bool = False):
        if fake_updates < 1:
            raise ValueError(f"fake_updates must be >= 1, got {fake_updates}")
        if accum < 1:
            raise ValueError(f"accum must be >= 1, got {accum}")
        if score_chunk is not None and score_chunk < 1:
            raise ValueError(f"score_chunk must be >= 1 or None, got {score_chunk}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
        dist = dist or Dist()
        self.teacher = teacher.to(dist.device).eval().requires_grad_(False)
        self.student_lora, self.fake_lora = (dict(a) if a else None for a in (student_lora, fake_lora))
        student = self._initial("student", student, self.student_lora)
        fake = self._initial("fake", fake, self.fake_lora)
        common = dict(warmup_nimg=lr_warmup_nimg, grad_clip=grad_clip, precision=precision, dist=dist,
                      find_unused_parameters=find_unused_parameters)
        self.student = Trainable("student", student, lr=lr, betas=betas,
                                 params=adapter_parameters(student) if self.student_lora else None, **common)
        self.fake = Trainable("fake", fake, lr=fake_lr if fake_lr is not None else lr,
                              betas=fake_betas if fake_betas is not None else betas,
                              params=adapter_parameters(fake) if self.fake_lora else None, **common)
        self.parts = {"student": self.student, "fake": self.fake}
        self.main = self.student  # what evaluation gets (its EMA if kept) and whose images nimg counts
        self.divergence, self.fake_loss = divergence, fake_loss
        self.fake_updates = int(fake_updates)
        self.order = order
        self.student_dropout = bool(student_dropout)
        self.student.module.train(self.student_dropout)
        self.accum = int(accum)  # micro-batches per optimizer step
        self.score_chunk = score_chunk  # samples per teacher/fake forward in the student step (None: all)
        self.ema = EMA(self.student.module, ema_halflife_nimg, ema_rampup) if ema_halflife_nimg else None

    def _initial(self, name: str, model: nn.Module | None, lora: dict | None) -> nn.Module:
        """A trained model's start: ``model`` if given, else adapters on the teacher (``lora``) or a full copy."""
        if model is not None and lora:
            raise ValueError(f"give either {name} (a model) or {name}_lora (adapters on the teacher), not both")
        if lora:
            try:
                return adapted_copy(self.teacher, **lora)
            except LoraError as exc:  # say which model's adapters: targets that match no layer of this teacher
                raise LoraError(f"{name}_lora: {exc}") from None
        return model if model is not None else copy.deepcopy(self.teacher)

    def fake_step(self, next_batch: Callable[[], tuple], generator=None, outputs: list | None = None) -> dict:
        """One optimizer step of the fake score on the student's outputs (Algorithm 1, line 1): on ``outputs``
        (the detached ``(x̂0, σ_in, labels)`` micro-batches of a student step, consumed in order) if given,
        else on fresh outputs of the student for batches from ``next_batch``."""
        student = self.student.module  # raw: no gradients, so the student's DDP wrapper is not involved
        self.fake.module.train()
        if outputs is None:
            student.eval()  # the outputs Algorithm 2 would give: dropout off (as Diff-Instruct makes its fake's data)

            def micro_loss(fake, x0, labels):
                return fake_score_loss(fake, student, self.divergence, self.fake_loss, x0, labels, generator)

            return self.fake.step(micro_loss, next_batch, self.accum)
        queue = iter(outputs)
        sigmas = []

        def reuse():
            x0_hat, sigma_in, labels = next(queue)
            sigmas.append(self.divergence.renoise_sigma(sigma_in, generator))
            return x0_hat, labels

        def micro_loss_reused(fake, x0_hat, labels):
            return self.fake_loss(fake, x0_hat, class_labels=labels, generator=generator, sigma=sigmas[-1])

        return self.fake.step(micro_loss_reused, reuse, len(outputs))

    def student_step(self, next_batch: Callable[[], tuple], generator=None, outputs: list | None = None) -> dict:
        """One optimizer step of the student on the divergence (Algorithm 1, line 2), then the EMA; the detached
        outputs of each micro-batch are appended to ``outputs`` if given."""
        fake = self.fake.module.eval()  # raw, in eval mode: the fake's DDP wrapper is not involved
        self.student.module.train(self.student_dropout)
        nimg = self.student.nimg

        def micro_loss(student, x0, labels):
            return student_loss(student, self.teacher, fake, self.divergence, x0, labels, generator, outputs,
                                self.score_chunk)

        stats = self.student.step(micro_loss, next_batch, self.accum)
        if stats["applied"] and self.ema is not None:
            self.ema.update(self.student.module, nimg, stats["images"])
        return stats

    def iteration(self, next_batch: Callable[[], tuple], generator=None) -> dict:
        """One iteration of Algorithm 1: ``fake_updates`` fake-score steps, then one student step (``fake-first``);
        or the student step first, the first fake step reusing its outputs (``student-first``). Fake stats are
        averaged over the fake steps; ``images`` counts the real images the student step saw."""
        if self.order == "fake-first":
            fake = [self.fake_step(next_batch, generator) for _ in range(self.fake_updates)]
            student = self.student_step(next_batch, generator)
        else:
            outputs: list = []
            student = self.student_step(next_batch, generator, outputs)
            fake = [self.fake_step(next_batch, generator, outputs if i == 0 else None)
                    for i in range(self.fake_updates)]
        stats = {f"fake_{k}": sum(s[k] for s in fake) / len(fake) for k in ("loss", "grad_norm", "lr")}
        stats.update({f"student_{k}": student[k] for k in ("loss", "grad_norm", "lr")})
        stats["images"] = student["images"]
        return stats

    def weights(self) -> dict[str, nn.Module]:
        """The student, its EMA and the fake score (of an adapted one its adapters alone: the teacher is not trained
        here and not saved)."""
        out = {"student": self.student.module, "fake": self.fake.module,
               **({"ema": self.ema.model} if self.ema is not None else {})}
        return {name: Adapters(m) if is_adapted(m) else m for name, m in out.items()}

    def state_dict(self) -> dict:
        return job_state(self)

    def load_state_dict(self, state: dict) -> None:
        load_job_state(self, state)


class DPDM:
    """Algorithm 1 for a caller's own single-process loop (``DistillJob`` on the teacher's device).

    ``step(next_batch, generator)`` runs one iteration (``fake_updates`` fake-score steps and one student step, in
    ``order``);
    ``fake_step``, ``student_loss`` and ``student_step`` are public for custom loops. ``student``, ``fake`` and
    ``teacher`` are the raw models; ``model`` is the student to evaluate. Arguments as ``DistillJob``'s.
    A step with a NaN/Inf loss or gradient is skipped.
    """

    def __init__(self, teacher: nn.Module, divergence: Divergence, fake_loss: EDMLoss, *, lr: float = STUDENT_LR,
                 betas=STUDENT_BETAS, fake_lr: float | None = None, fake_betas=None, fake_updates: int = FAKE_UPDATES,
                 order: str = "fake-first", student_dropout: bool = False,
                 student: nn.Module | None = None, fake: nn.Module | None = None, fake_lora: dict | None = None,
                 student_lora: dict | None = None, ema_halflife_nimg: float | None = None,
                 ema_rampup: float | None = 0.05,
                 grad_clip: float | None = None, score_chunk: int | None = None):
        self.job = DistillJob(teacher, divergence, fake_loss, student=student, fake=fake, fake_lora=fake_lora,
                              student_lora=student_lora, lr=lr, betas=betas,
                              fake_lr=fake_lr, fake_betas=fake_betas, fake_updates=fake_updates, order=order,
                              student_dropout=student_dropout, grad_clip=grad_clip,
                              ema_halflife_nimg=ema_halflife_nimg, ema_rampup=ema_rampup, score_chunk=score_chunk,
                              dist=Dist(device=device_of(teacher)))
        self.teacher, self.student, self.fake = self.job.teacher, self.job.student.module, self.job.fake.module
        self.divergence, self.fake_loss, self.ema = divergence, fake_loss, self.job.ema
        self.fake_updates, self.grad_clip = self.job.fake_updates, grad_clip
        self.opt_student, self.opt_fake = self.job.student.optimizer, self.job.fake.optimizer

    @property
    def model(self) -> nn.Module:
        """The student to evaluate: its EMA if kept, else the trained weights."""
        return self.job.model

    @property
    def nimg(self) -> int:
        return self.job.nimg

    def student_outputs(self, x0: torch.Tensor, class_labels=None, generator=None):
        """Feed the student as the divergence prescribes; returns ``(x̂0, σ_in)``."""
        return student_outputs(self.student, self.divergence, x0, class_labels, generator)

    def fake_step(self, x0: torch.Tensor, class_labels=None, generator=None) -> dict:
        """One EDM-loss step of the fake score on the student's (detached) outputs."""
        stats = self.job.fake_step(lambda: (x0, class_labels), generator)
        return {"fake_loss": stats["loss"], "fake_grad_norm": stats["grad_norm"]}

    def student_loss(self, x0: torch.Tensor, class_labels=None, generator=None) -> torch.Tensor:
        """The divergence's per-sample surrogate for one batch of real data (Eq. 3.4)."""
        self.student.train(self.job.student_dropout)
        return student_loss(self.student, self.teacher, self.fake.eval(), self.divergence, x0, class_labels, generator,
                            score_chunk=self.job.score_chunk)

    def student_step(self, x0: torch.Tensor, class_labels=None, generator=None) -> dict:
        stats = self.job.student_step(lambda: (x0, class_labels), generator)
        return {"student_loss": stats["loss"], "student_grad_norm": stats["grad_norm"]}

    def step(self, next_batch: Callable[[], tuple], generator=None) -> dict:
        """One iteration (``DistillJob.iteration``): ``fake_updates`` fake-score steps and one student step.

        ``next_batch()`` returns ``(x0, class_labels)`` in model space (labels may be None).
        """
        stats = self.job.iteration(next_batch, generator)
        return {k: stats[k] for k in ("fake_loss", "fake_grad_norm", "student_loss", "student_grad_norm")}
