"""Recipes: YAML structured strictly into these attrs classes (STYLE habits 8 and 9).

Components are named by registry key with their options inline, e.g.
``backbone: {name: mlp, hidden: 256}``; unknown keys, wrong types, unknown names and values outside the
bounds declared next to their fields (``metadata={"bound": ...}``, see ``bounds.py``) are all reported at once
with their dotted paths (see ``structure.py``). In every recipe ``train.lr`` is the student's learning rate.
"""

from __future__ import annotations

from typing import Literal

import attrs

from ..sigmas import SigmaDist
from ..defaults import (FAKE_UPDATES, LOG_EVERY, LOSS_GUARD_FACTOR, LOSS_GUARD_PATIENCE, LOSS_GUARD_WARMUP,
                        LOSS_GUARD_WINDOW, MAX_NONFINITE, STUDENT_BETAS, STUDENT_LR, TEACHER_BETAS, TEACHER_LR)
from .bounds import Bound, at_least, each_at_least, each_in, each_positive, positive, run_name, step_counts, torch_device
from .components import Component, component
from .structure import structure, structure_deferring_bounds
from .yaml import apply_overrides, load_yaml


def _lognormal() -> SigmaDist:
    return SigmaDist("lognormal", P_mean=-1.2, P_std=1.2, min=1e-12, max=1e12)


def _log_uniform() -> SigmaDist:
    return SigmaDist("log-uniform", min=0.002, max=80.0)


@attrs.define
class ModelConfig:
    """The network shape shared by teacher, student and fake score."""

    backbone: Component = component("backbone", reserved=("shape", "label_dim"))
    precond: Component = component("preconditioning", default={"name": "edm"}, reserved=("backbone", "label_dim"))


@attrs.define
class TeacherTrainConfig:
    """Teacher training with the EDM loss (Karras et al. 2022)."""

    steps: int = attrs.field(default=4000, metadata={"bound": at_least(0)})
    batch_size: int = attrs.field(default=512, metadata={"bound": at_least(1)})
    lr: float = attrs.field(default=TEACHER_LR, metadata={"bound": positive})
    betas: tuple[float, float] = attrs.field(default=TEACHER_BETAS, metadata={"bound": each_in(0, 1)})
    sigma: SigmaDist = attrs.field(factory=_lognormal)  # EDM: ln σ ~ N(-1.2, 1.2²)
    # EMA half-life in images; null: no EMA
    ema_halflife_nimg: float | None = attrs.field(default=None, metadata={"bound": positive})
    # linear learning-rate warm-up, in images
    lr_warmup_nimg: float = attrs.field(default=0.0, metadata={"bound": at_least(0)})
    grad_clip: float | None = attrs.field(default=None, metadata={"bound": positive})


@attrs.define
class TeacherConfig:
    """Where the teacher comes from: trained here (``train``) or loaded (``checkpoint``)."""

    # path or URL of a dpdm checkpoint (.safetensors), an official EDM .pkl, or a bare state dict
    # (torch.save(net.state_dict())) of the network `model` names
    checkpoint: str | None = None
    train: TeacherTrainConfig = attrs.field(factory=TeacherTrainConfig)


@attrs.define
class LoraConfig:
    """A trained model (``train.fake_lora``, ``train.student_lora``) as the teacher's frozen weights plus trainable
    low-rank adapters (``train/lora.py``), instead of a full copy: the teacher's weights are held once, and only the
    adapters get gradients, Adam states, snapshots and DDP synchronisation. Not the paper's (its fake score and
    student are full copies): a stated option."""

    rank: int = attrs.field(default=16, metadata={"bound": at_least(1)})  # r: ΔW = (alpha / r)·B·A
    # the scale's numerator; null: rank (scale 1)
    alpha: float | None = attrs.field(default=None, metadata={"bound": positive})
    # glob patterns of the layer names to adapt (fnmatch; '*' spans dots): every layer with a weight matrix by default
    targets: list[str] = attrs.field(factory=lambda: ["*"])


@attrs.define
class TrainConfig:
    """DPDM distillation (Algorithm 1). Defaults are the paper's (Table 8, Appendix B) where it states them; the
    library's ``DistillJob`` has the same defaults (both take them from ``dpdm.core.defaults``)."""

    divergence: Component = component("divergence", default={"name": "smoothed-kl"}, reserved=("sigma", "sigma_data"))
    sigma: SigmaDist = attrs.field(factory=_log_uniform)  # the student's σ distribution
    # student updates (the paper: 100k on CIFAR-10, 50k on ImageNet-64)
    steps: int = attrs.field(default=1000, metadata={"bound": at_least(0)})
    batch_size: int = attrs.field(default=128, metadata={"bound": at_least(1)})  # Table 8 (CIFAR-10; ImageNet-64: 96)
    lr: float = attrs.field(default=STUDENT_LR, metadata={"bound": positive})  # the student's learning rate (Table 8)
    betas: tuple[float, float] = attrs.field(default=STUDENT_BETAS, metadata={"bound": each_in(0, 1)})  # Table 8
    fake_lr: float | None = attrs.field(default=None, metadata={"bound": positive})  # default: lr (as Table 8)
    # fake-score updates per student update (Algorithm 1 alternates one and one)
    fake_updates: int = attrs.field(default=FAKE_UPDATES, metadata={"bound": at_least(1)})
    order: Literal["fake-first", "student-first"] = "fake-first"  # Algorithm 1: the fake score first
    student_dropout: bool = False  # dropout in the student's forward during distillation (off: eval mode)
    # EMA of the student, half-life in images
    ema_halflife_nimg: float | None = attrs.field(default=None, metadata={"bound": positive})
    grad_clip: float | None = attrs.field(default=None, metadata={"bound": positive})
    # linear learning-rate warm-up of student and fake score, in images
    lr_warmup_nimg: float = attrs.field(default=0.0, metadata={"bound": at_least(0)})
    # the fake score as low-rank adapters on the frozen teacher ({rank, alpha, targets}); null: a full copy (the
    # paper's). Saves the fake's weights, gradients and Adam states; README "Memory" measures what it costs
    fake_lora: LoraConfig | None = None
    # the student as low-rank adapters on the frozen teacher (for a teacher too large to copy); null: a full copy (the
    # paper's). Not with `student` (a network of its own)
    student_lora: LoraConfig | None = None
    # The student's own network, trained from scratch (e.g. a stylegan2 generator or a dit);
    # null: the student starts as a copy of the teacher. Teacher and fake score keep `model`.
    student: ModelConfig | None = None


@attrs.define
class BaselineConfig:
    """A comparison model distilled from the same teacher in the same run (e.g. Diff-Instruct's one-step IKL
    generator, the paper's Tables 2-3 baseline), trained after the student with its own ``train`` settings and
    evaluated with the student's sampler and schedule at ``steps``."""

    train: TrainConfig = attrs.field(factory=TrainConfig)
    # sampling steps it is evaluated at
    steps: list[int] = attrs.field(factory=lambda: [1], metadata={"bound": step_counts})
    # where sampling starts: default the divergence's generator_sigma (ikl: the σ its generator is fed), else the
    # student schedule's own σ_max
    sigma_max: float | None = attrs.field(default=None, metadata={"bound": positive})


@attrs.define
class EvalConfig:
    """What ``report.json`` measures."""

    metric: Component = component("metric", default={"name": "energy"})  # fid, fd-<dataset>, energy, ...
    ref: str | None = None  # fid / fd-<dataset>: reference statistics .npz (EDM's); default: the test split, cached
    # generated samples per (model, sampler, NFE)
    num_samples: int = attrs.field(default=4000, metadata={"bound": at_least(2)})
    student_sampler: Component = component("sampler", default={"name": "dpdm"})
    student_schedule: Component = component("schedule", default={"name": "dpdm"}, reserved=("n",))
    student_steps: list[int] = attrs.field(factory=lambda: [1, 2, 4, 8], metadata={"bound": each_at_least(1)})
    teacher_samplers: list[Component] = attrs.field(
        factory=lambda: [Component("euler"), Component("heun"), Component("dpmpp-2m")],
        metadata={"kind": "sampler"},
    )
    teacher_schedule: Component = component("schedule", default={"name": "karras"}, reserved=("n",))
    teacher_nfe: list[int] = attrs.field(factory=lambda: [1, 2, 3, 4, 5, 8, 16, 35],
                                         metadata={"bound": each_at_least(1)})
    one_step_sigma_max: list[float] = attrs.field(factory=lambda: [80.0, 10.0, 5.0, 2.5, 1.5, 1.0],
                                                  metadata={"bound": each_positive})
    recovery_sigmas: list[float] = attrs.field(factory=lambda: [0.5, 1.0, 2.0, 5.0],
                                               metadata={"bound": each_positive})
    # items noised and denoised per σ (up to the split's size)
    recovery_num: int = attrs.field(default=2000, metadata={"bound": at_least(2)})
    # paper: Section 5.1, a random subset of the training split against the full training set (eval.ref for fid);
    # heldout: the first test items against data independent of them
    recovery_protocol: Literal["paper", "heldout"] = "paper"
    # images per grid (points per scatter: num_samples)
    figure_samples: int = attrs.field(default=64, metadata={"bound": at_least(1)})
    # items per generation batch (samples do not depend on it: per-item seeds); on CPUs a small batch is faster
    # (a 0.7M-parameter UNet at 16×16: 1.5 ms per image and NFE at 128, 3.2 ms at 1024)
    batch_size: int = attrs.field(default=1024, metadata={"bound": at_least(1)})
    # Section 5.2 / Figure 6: student and teacher, each with the DPDM sampler and with Heun (the ODE sampler), at
    # this NFE (the paper: 7); null: not measured
    cross_nfe: int | None = attrs.field(default=None, metadata={"bound": at_least(1)})
    # evaluation seeds: 2 or more re-score the student, the undistilled teacher and the teacher points the claims
    # compare with at seeds seed+1, ...: their spread is the estimator's noise beside every claim
    noise_seeds: int = attrs.field(default=1, metadata={"bound": at_least(1)})


@attrs.define
class CheckpointConfig:
    """Training-state checkpoints (weights, optimizers, counters, RNG and loader states of every rank)."""

    # optimizer steps between checkpoints (0: only at the end of each phase)
    every: int = attrs.field(default=1000, metadata={"bound": at_least(0)})
    keep_last: int = attrs.field(default=3, metadata={"bound": at_least(1)})  # keep the newest K checkpoints ...
    # ... plus every one whose step is a multiple of N (0: none)
    keep_every: int = attrs.field(default=0, metadata={"bound": at_least(0)})
    dir: str | None = None  # any fsspec URL (s3://bucket/run); default: <run dir>/checkpoints/train


@attrs.define
class LossGuardConfig:
    """The divergence guard (``train.guards.LossGuard``): a loss above ``factor`` × its running median for
    ``patience`` consecutive steps stops the run, naming the newest checkpoint."""

    factor: float = attrs.field(default=LOSS_GUARD_FACTOR, metadata={"bound": Bound(lambda v: v > 1,
                                                                                   "must be above 1, got {}")})
    window: int = attrs.field(default=LOSS_GUARD_WINDOW, metadata={"bound": at_least(1)})  # steps of the median
    patience: int = attrs.field(default=LOSS_GUARD_PATIENCE, metadata={"bound": at_least(1)})
    # values in the window before any is judged
    warmup: int = attrs.field(default=LOSS_GUARD_WARMUP, metadata={"bound": at_least(1)})


@attrs.define
class EngineConfig:
    """How training runs: precision, accumulation, data loading, logging, checkpoints.

    ``teacher.train.batch_size`` and ``train.batch_size`` are global batches (as EDM's ``--batch``):
    each optimizer step sees that many images over all ranks, split into ``accum`` micro-batches per rank.
    """

    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16/fp16: autocast (fp16 adds a grad scaler)
    # micro-batches per optimizer step on each rank (gradient accumulation)
    accum: int = attrs.field(default=1, metadata={"bound": at_least(1)})
    # distillation's student step: evaluate the teacher and the fake score (no gradients) on this many samples at a
    # time, so their activations never sit beside the whole student graph (less peak memory, the same step up to
    # round-off; README "Memory"); null: the whole micro-batch at once
    score_chunk: int | None = attrs.field(default=None, metadata={"bound": at_least(1)})
    # data-loading worker processes per rank
    num_workers: int = attrs.field(default=0, metadata={"bound": at_least(0)})
    # steps between lines in metrics.jsonl (and TensorBoard)
    log_every: int = attrs.field(default=LOG_EVERY, metadata={"bound": at_least(1)})
    # steps between sample grids of the student at a fixed seed (0: off)
    sample_every: int = attrs.field(default=0, metadata={"bound": at_least(0)})
    # consecutive non-finite steps that stop the run (the last checkpoint is kept)
    max_nonfinite: int = attrs.field(default=MAX_NONFINITE, metadata={"bound": at_least(1)})
    # the divergence guard: a finite loss that runs away stops the run (null: off)
    loss_guard: LossGuardConfig | None = attrs.field(factory=LossGuardConfig)
    checkpoint: CheckpointConfig = attrs.field(factory=CheckpointConfig)


@attrs.define
class Recipe:
    name: str = attrs.field(metadata={"bound": run_name})
    data: Component = component("dataset", reserved=("split",))
    model: ModelConfig = attrs.field(factory=ModelConfig)
    teacher: TeacherConfig = attrs.field(factory=TeacherConfig)
    train: TrainConfig = attrs.field(factory=TrainConfig)
    eval: EvalConfig = attrs.field(factory=EvalConfig)
    # comparison models distilled from the same teacher, by name (report role, checkpoint and snapshot folder)
    baselines: dict[str, BaselineConfig] = attrs.field(factory=dict)
    engine: EngineConfig = attrs.field(factory=EngineConfig)
    seed: int = attrs.field(default=0, metadata={"bound": at_least(0)})  # seeds are hashed as unsigned words
    # auto (cuda if available), cpu, cuda, cuda:1, ...; whether CUDA is there is checked when the run starts
    device: str = attrs.field(default="auto", metadata={"bound": torch_device})


def load_recipe(path: str, overrides: list[str] | None = None) -> Recipe:
    """Read, override (``key.path=value``) and strictly structure a recipe file; every problem, values outside
    their bounds included, is raised at once as a ``ConfigError``."""
    data = load_yaml(path)
    if overrides:
        data = apply_overrides(data, overrides, source=path)
    return structure(Recipe, data, path="recipe", source=path)


def read_recipe(path: str, overrides: list[str] | None = None) -> tuple[Recipe, list[str]]:
    """Like :func:`load_recipe`, but a recipe whose only problems are values outside their bounds is returned
    with them, ``(recipe, problems)``, for a caller that reports them together with its own checks (``dpdm run``
    adds what building every component finds)."""
    data = load_yaml(path)
    if overrides:
        data = apply_overrides(data, overrides, source=path)
    return structure_deferring_bounds(Recipe, data, path="recipe", source=path)
