"""The training phases of a run: the teacher with the EDM loss, and DPDM distillation (Algorithm 1) for the student
and each baseline, through the engine with snapshots, logs and sample grids."""

from __future__ import annotations

import logging

import attrs
import torch

from ..config.identity import config_hash
from ..config.recipe import Recipe
from ..errors import DpdmError
from ..eval.generation import build_sampler
from ..eval.hooks import SampleGrid
from ..eval.protocols import reachable_steps
from ..io.checkpoint import build_denoiser
from ..losses import EDMLoss
from ..progress import Progress
from ..train.distill import DistillJob
from ..train.distributed import Dist, derive_seed
from ..train.engine import Trainer
from ..train.guards import LossGuard
from ..train.lora import LoraError
from ..train.precision import Precision
from ..train.snapshots import Snapshots
from ..train.teacher import TeacherJob
from ..train.tracking import Tracker
from .build import batches, build_divergence
from .rundir import RunDir

log = logging.getLogger(__name__)

TEACHER_STREAM, STUDENT_STREAM = 1, 2  # seeds of the two phases derive from (recipe.seed, stream)
BASELINE_STREAM = 100  # baseline i (recipe.baselines, in order) trains with stream BASELINE_STREAM + i


class RunContext:
    """What every training phase of a run shares: the process group, precision, snapshot root, tracker, progress
    and whether the run resumes."""

    def __init__(self, recipe: Recipe, run_dir: RunDir, dist: Dist, progress: Progress, tracker: Tracker,
                 resume: bool):
        self.recipe, self.run_dir, self.dist, self.progress, self.tracker = recipe, run_dir, dist, progress, tracker
        self.resume = resume
        self.precision = Precision(recipe.engine.precision, dist.device)
        # the snapshots' root: a URL run's own URL (not its staging folder), or engine.checkpoint.dir
        self.root = (recipe.engine.checkpoint.dir or run_dir.snapshots).rstrip("/")
        self.hash = config_hash(recipe)

    def trainer(self, job, data, seed: int, specs: dict, sample_grid=None) -> Trainer:
        engine = self.recipe.engine
        ckpt = engine.checkpoint
        snapshots = Snapshots(f"{self.root}/{job.phase}", keep_last=ckpt.keep_last, keep_every=ckpt.keep_every)
        hooks = [sample_grid] if sample_grid is not None else []
        guard = engine.loss_guard
        guard = LossGuard(guard.factor, guard.window, guard.patience, guard.warmup) if guard else None
        trainer = Trainer(job, data, dist=self.dist, seed=seed, max_nonfinite=engine.max_nonfinite, loss_guard=guard,
                          snapshots=snapshots, save_every=ckpt.every, specs=specs, config_hash=self.hash,
                          tracker=self.tracker, log_every=engine.log_every, progress=self.progress, hooks=hooks)
        if self.resume:
            if trainer.resume():
                log.info("%s: resumed from %s (step %d)", job.phase, trainer.last_saved, trainer.step)
            else:  # killed before its first snapshot, or a phase that had not started: said, not silent
                log.warning("%s: --resume found no training snapshot under %s; this phase starts from step 0",
                            job.phase, snapshots.root)
        else:
            found = self.dist.broadcast_object(snapshots.latest() if self.dist.is_main else None)
            if found is not None:
                raise DpdmError(f"{snapshots.root} already holds training checkpoints ({found}); continue that run "
                                f"with --resume, or give another --out / engine.checkpoint.dir")
        return trainer

    def sample_grid(self, model, sampler, schedule, steps: int, shape, kind: str, label_dim: int):
        """A ``SampleGrid`` hook every ``engine.sample_every`` steps: ``sampler`` and ``schedule`` (recipe components,
        their options honoured) at ``steps`` steps, the schedule clamped to ``model``'s σ range as in evaluation."""
        every = self.recipe.engine.sample_every
        if not every:
            return None
        return SampleGrid(every, self.run_dir.progress_figures, sampler=sampler, schedule=schedule, steps=steps,
                          shape=shape, kind=kind, label_dim=label_dim,
                          num=self.recipe.eval.figure_samples if kind == "image" else 2000, seed=self.recipe.seed,
                          tracker=self.tracker)


def train_teacher(recipe: Recipe, spec: dict, train_set, phase: RunContext):
    """Teacher training with the EDM loss through the engine; returns the (EMA) teacher, frozen."""
    cfg = recipe.teacher.train
    dist = phase.dist
    torch.manual_seed(recipe.seed)  # the initial weights: the same on every rank and in every (resumed) run
    denoiser = build_denoiser(spec).to(dist.device)
    sigma_data = getattr(denoiser, "sigma_data", 0.5)
    job = TeacherJob(denoiser, EDMLoss(sigma_data=sigma_data, sigma=cfg.sigma), lr=cfg.lr, betas=cfg.betas,
                     lr_warmup_nimg=cfg.lr_warmup_nimg, grad_clip=cfg.grad_clip,
                     ema_halflife_nimg=cfg.ema_halflife_nimg, accum=recipe.engine.accum,
                     precision=phase.precision, dist=dist)
    grid = None
    if recipe.eval.teacher_samplers:  # the first teacher sampler at the largest teacher NFE it reaches
        sampler = recipe.eval.teacher_samplers[0]
        reached = reachable_steps(build_sampler(sampler).nfe, max(recipe.eval.teacher_nfe))
        if reached is not None:
            grid = phase.sample_grid(denoiser, sampler, recipe.eval.teacher_schedule, reached[0], spec["shape"],
                                     train_set.kind, spec["label_dim"])
    seed = derive_seed(recipe.seed, TEACHER_STREAM)
    trainer = phase.trainer(job, batches(recipe.engine, train_set, cfg.batch_size, dist, seed), seed,
                            {"model": spec, **({"ema": spec} if cfg.ema_halflife_nimg else {})}, grid)
    trainer.fit(cfg.steps)
    return job.model.eval().requires_grad_(False)


def distill(recipe: Recipe, teacher, spec: dict, train_set, phase: RunContext, s_spec: dict | None = None, *,
            cfg=None, name: str | None = None, stream: int = STUDENT_STREAM):
    """Algorithm 1 for ``cfg.steps`` iterations through the engine (``cfg``: a ``TrainConfig``, default the
    recipe's ``train``); the student is ``cfg.student``'s own network (``s_spec``, trained from scratch), adapters on
    the teacher (``cfg.student_lora``) or a copy of it. ``name``: the phase's name (snapshots, logs; default
    ``student``), e.g. a baseline's. Returns the ``DistillJob``."""
    cfg = cfg if cfg is not None else recipe.train
    dist = phase.dist
    s_spec = s_spec or spec
    sigma_data = getattr(teacher, "sigma_data", 0.5)
    divergence = build_divergence(recipe, sigma_data, cfg)
    torch.manual_seed(derive_seed(recipe.seed, stream))  # a student of its own: the same initial weights
    fresh = build_denoiser(s_spec).to(dist.device) if cfg.student is not None else None
    try:
        job = DistillJob(teacher, divergence, EDMLoss(sigma_data=sigma_data, sigma=cfg.sigma), student=fresh,
                         fake_lora=lora_options(cfg.fake_lora), student_lora=lora_options(cfg.student_lora),
                         lr=cfg.lr, betas=cfg.betas, fake_lr=cfg.fake_lr, fake_updates=cfg.fake_updates,
                         order=cfg.order, student_dropout=cfg.student_dropout,
                         lr_warmup_nimg=cfg.lr_warmup_nimg, grad_clip=cfg.grad_clip,
                         ema_halflife_nimg=cfg.ema_halflife_nimg, accum=recipe.engine.accum,
                         score_chunk=recipe.engine.score_chunk, precision=phase.precision, dist=dist)
    except LoraError as exc:  # adapters whose targets match no layer of a loaded teacher (preflight checks the rest)
        key = "train" if name is None else f"baselines.{name.removeprefix('baseline-')}.train"
        raise DpdmError(f"recipe.{key}.{exc}") from None
    if name is not None:
        job.phase = name
    ev_cfg = recipe.eval
    grid = None
    if name is None:  # progress grids of the student only, with its sampler and schedule at its most steps
        grid = phase.sample_grid(job.model, ev_cfg.student_sampler, ev_cfg.student_schedule, max(ev_cfg.student_steps),
                                 spec["shape"], train_set.kind, spec["label_dim"])
    seed = derive_seed(recipe.seed, stream)
    specs = {"student": s_spec, "fake": spec, **({"ema": s_spec} if cfg.ema_halflife_nimg else {})}
    trainer = phase.trainer(job, batches(recipe.engine, train_set, cfg.batch_size, dist, seed), seed, specs, grid)
    trainer.fit(cfg.steps)
    return job


def lora_options(cfg) -> dict | None:
    """A ``LoraConfig`` as ``DistillJob``'s ``fake_lora``/``student_lora`` argument."""
    return attrs.asdict(cfg) if cfg is not None else None


def baseline_phase(name: str) -> str:
    """The training phase (snapshot folder, log records) of ``recipe.baselines[name]``."""
    return f"baseline-{name}"
