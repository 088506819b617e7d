"""Running a recipe end to end: train (or load) the teacher, distill the DPDM student
(Algorithm 1), evaluate (NFE sweeps and Section 5.1 recovery), and write the run directory.

Both training phases run in ``engine.Trainer`` (single process, or every rank under torchrun) on
resumable batches (``dpdm.data.loader.Loader``); ``run(..., resume=True)`` continues each phase from
its newest complete snapshot, bit for bit on CPU. Rank 0 alone writes files other than snapshots and
evaluates.

    config.yaml          the resolved recipe
    checkpoints/         teacher, student, fake score (safetensors + network spec)
    checkpoints/train/   training snapshots per phase (teacher/, student/: ckpt-<step>/, see snapshots.py),
                         unless engine.checkpoint.dir puts them elsewhere (any fsspec URL)
    metrics.jsonl        per-step losses, gradient norms, lr, images/s, peak memory (every engine.log_every)
    tensorboard/         the same for TensorBoard, when it is installed
    figures/progress/    sample grids at a fixed seed every engine.sample_every steps
    report.json          {"metric", "train_steps", "sweep" (student, undistilled, teacher), "recovery", "one_step",
                         "checks" (with "summary"), "timings", ...}
    report.md            the same as tables
    figures/*.png        samples per NFE (student, undistilled teacher, each teacher sampler), NFE curve,
                         recovery panels
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from ..eval import evaluate as ev
from ..eval import recovery as rec
from ..io.checkpoint import build_denoiser, load_checkpoint, load_denoiser, network_spec, save_denoiser
from ..config.recipe import Recipe
from ..datasets import to_model
from ..train.distill import DistillJob
from ..train.distributed import Dist, derive_seed, init_dist
from ..train.engine import DeviceBatches, Trainer
from ..errors import ConfigError, DpdmError
from ..losses import EDMLoss
from ..train.precision import Precision
from ..progress import Progress
from ..io.cache import local_copy, needs_download
from ..eval.fid import load_stats
from ..eval.metrics import FD_PREFIX, make_metric, metric_factory
from ..plugins.registry import accepts, entries, entry, get
from ..eval.scoring import cached_dataset_stats, cross_samplings, cross_use, is_feature_metric
from ..eval.report import NFE_FACTOR, best_teacher, write_report
from ..config.structure import dump_yaml, unstructure
from ..train.snapshots import Snapshots
from ..train.teacher import TeacherJob
from ..train.tracking import SampleGrid, Tracker

TEACHER_STREAM, STUDENT_STREAM = 1, 2  # seeds of the two phases derive from (recipe.seed, stream)
BASELINE_STREAM = 100  # baseline i (recipe.baselines, in order) trains with stream BASELINE_STREAM + i


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DpdmError(f"recipe.device is {name!r} but CUDA is not available here; use 'cpu' or 'auto'")
    return device


def make_dataset(recipe: Recipe, split: str):
    opts = dict(recipe.data.options)
    try:
        return get("dataset", recipe.data.name)(split=split, **opts)
    except (ValueError, TypeError) as exc:
        raise DpdmError(f"recipe.data ({recipe.data.name}): {exc}") from None


def dataset_key(recipe: Recipe, split: str) -> str:
    """A name for the recipe's data split in caches: ``<dataset>-<hash of its options>-<split>``."""
    options = json.dumps(recipe.data.options, sort_keys=True, default=str)
    return f"{recipe.data.name}-{hashlib.sha256(options.encode()).hexdigest()[:8]}-{split}"


def preflight(recipe: Recipe, source: str | None = None):
    """Build everything a run needs before any training, so that bad values fail in seconds with
    their dotted keys (all problems at once) rather than minutes into a run.

    Returns ``(train_set, test_set, network_spec)``.
    """
    problems = []

    def check(key, fn):
        try:
            return fn()
        except DpdmError as exc:
            problems.append(f"{key}: {exc}")
        except (ValueError, TypeError) as exc:
            problems.append(f"{key}: {exc}")

    for key, value, low in [("teacher.train.steps", recipe.teacher.train.steps, 0),
                            ("teacher.train.batch_size", recipe.teacher.train.batch_size, 1),
                            ("train.steps", recipe.train.steps, 0), ("train.batch_size", recipe.train.batch_size, 1),
                            ("train.fake_updates", recipe.train.fake_updates, 1),
                            ("eval.num_samples", recipe.eval.num_samples, 2),
                            ("eval.recovery_num", recipe.eval.recovery_num, 2),
                            ("eval.batch_size", recipe.eval.batch_size, 1), ("eval.noise_seeds", recipe.eval.noise_seeds, 1),
                            *[(f"baselines.{name}.train.{field}", getattr(base.train, field), low)
                              for name, base in recipe.baselines.items()
                              for field, low in (("steps", 0), ("batch_size", 1), ("fake_updates", 1))]]:
        if value < low:
            problems.append(f"recipe.{key}: must be at least {low}, got {value}")
    engine = recipe.engine
    for key, value, low in [("engine.accum", engine.accum, 1), ("engine.num_workers", engine.num_workers, 0),
                            ("engine.log_every", engine.log_every, 1), ("engine.sample_every", engine.sample_every, 0),
                            ("engine.max_nonfinite", engine.max_nonfinite, 1),
                            ("engine.checkpoint.every", engine.checkpoint.every, 0),
                            ("engine.checkpoint.keep_last", engine.checkpoint.keep_last, 1),
                            ("engine.checkpoint.keep_every", engine.checkpoint.keep_every, 0)]:
        if value < low:
            problems.append(f"recipe.{key}: must be at least {low}, got {value}")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    phases = [("train.batch_size", recipe.train.batch_size),
              *[(f"baselines.{name}.train.batch_size", base.train.batch_size) for name, base in recipe.baselines.items()]]
    if not recipe.teacher.checkpoint:
        phases.insert(0, ("teacher.train.batch_size", recipe.teacher.train.batch_size))
    for key, batch in phases:
        if engine.accum >= 1 and batch >= 1 and batch % (world * engine.accum):
            problems.append(f"recipe.{key}: the global batch {batch} must split evenly over {world} rank(s) x "
                            f"engine.accum {engine.accum} micro-batches; pick a multiple of {world * engine.accum}")
    for key, values in [("eval.student_steps", recipe.eval.student_steps), ("eval.teacher_nfe", recipe.eval.teacher_nfe)]:
        if any(v < 1 for v in values):
            problems.append(f"recipe.{key}: every entry must be at least 1, got {values}")
    for key, values in [("eval.recovery_sigmas", recipe.eval.recovery_sigmas),
                        ("eval.one_step_sigma_max", recipe.eval.one_step_sigma_max)]:
        if any(v <= 0 for v in values):
            problems.append(f"recipe.{key}: every entry must be positive, got {values}")
    check("recipe.device", lambda: resolve_device(recipe.device))
    train_set = check("recipe.data", lambda: get("dataset", recipe.data.name)(split="train", **recipe.data.options))
    test_set = check("recipe.data", lambda: get("dataset", recipe.data.name)(split="test", **recipe.data.options))
    spec = None
    if train_set is not None:
        spec = spec_of(recipe, train_set)
        if not recipe.teacher.checkpoint:
            check("recipe.model", lambda: build_denoiser(spec))
        if recipe.train.student is not None:
            check("recipe.train.student", lambda: build_denoiser(student_spec(recipe, spec)))
    check("recipe.train.divergence", lambda: build_divergence(recipe, sigma_data=0.5))
    for name, base in recipe.baselines.items():
        key = f"baselines.{name}"
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            problems.append(f"recipe.{key}: a baseline's name names its checkpoint and snapshot folder; use letters, "
                            f"digits, '-' and '_'")
        if not base.steps or any(v < 1 for v in base.steps):
            problems.append(f"recipe.{key}.steps: a non-empty list of step counts of at least 1, got {base.steps}")
        if base.sigma_max is not None and base.sigma_max <= 0:
            problems.append(f"recipe.{key}.sigma_max: must be positive, got {base.sigma_max}")
        check(f"recipe.{key}.train.divergence", lambda: build_divergence(recipe, sigma_data=0.5, cfg=base.train))
        if train_set is not None and base.train.student is not None:
            check(f"recipe.{key}.train.student",
                  lambda: build_denoiser(student_spec(recipe, spec_of(recipe, train_set), base.train)))
    check("recipe.eval.metric", lambda: _check_metric(recipe))
    if recipe.eval.ref is not None and not needs_download(recipe.eval.ref):
        check("recipe.eval.ref", lambda: load_stats(recipe.eval.ref))
    student_schedule = ev._schedule({"name": recipe.eval.student_schedule.name, **recipe.eval.student_schedule.options})
    teacher_schedule = ev._schedule({"name": recipe.eval.teacher_schedule.name, **recipe.eval.teacher_schedule.options})
    for n in recipe.eval.student_steps:
        check("recipe.eval.student_schedule", lambda: student_schedule(n))
    for smax in recipe.eval.one_step_sigma_max:
        check("recipe.eval.student_schedule", lambda: student_schedule(1, sigma_max=smax))
    for n in recipe.eval.teacher_nfe:
        check("recipe.eval.teacher_schedule", lambda: teacher_schedule(n))
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)), source)
    return train_set, test_set, spec


def _check_metric(recipe: Recipe) -> None:
    """Build the metric (a missing FID detector fails here), except ``fd-<dataset>``, whose classifier may need
    training (that happens at evaluation, once, and is cached), and a detector URL not downloaded yet (a real run
    fetches it before training, ``prefetch``; ``--dry-run`` does not download)."""
    name, options = recipe.eval.metric.name, recipe.eval.metric.options
    if name.startswith(FD_PREFIX) and name not in entries("metric"):
        metric_factory(name)
        return
    if isinstance(options.get("detector"), str) and needs_download(options["detector"]):
        return
    make_metric(name, options, data=(recipe.data.name, recipe.data.options))


def prefetch(recipe: Recipe) -> None:
    """Download what evaluation will read from the web (the FID detector, ``eval.ref``) before training starts,
    so that a wrong URL or a missing network fails now rather than after the training."""
    detector = recipe.eval.metric.options.get("detector")
    for key, url in (("recipe.eval.metric.detector", detector), ("recipe.eval.ref", recipe.eval.ref)):
        if isinstance(url, str) and needs_download(url):
            try:
                local_copy(url)
            except DpdmError as exc:
                raise DpdmError(f"{key}: {exc}") from None
    if recipe.eval.ref is not None:
        load_stats(recipe.eval.ref)
    if detector:
        _check_metric(recipe)


def build_divergence(recipe: Recipe, sigma_data: float, cfg=None):
    """The divergence of ``cfg`` (a ``TrainConfig``; default the recipe's ``train``) over its ``sigma``; a
    divergence that names a ``sigma_data`` parameter (the built-ins, for ``weighting: edm``) gets the teacher's σ_d,
    which the recipe cannot set apart from the teacher; one that only takes ``**options`` is not handed it."""
    train = cfg if cfg is not None else recipe.train
    cfg = train.divergence
    factory = get("divergence", cfg.name)
    runtime = {"sigma": train.sigma}
    if accepts(factory, "sigma_data"):
        runtime["sigma_data"] = float(sigma_data)
    return factory(**runtime, **cfg.options)


def student_spec(recipe: Recipe, teacher_spec: dict, cfg=None) -> dict:
    """The student's network: ``train.student`` (of ``cfg``, default the recipe's ``train``) if it names one, else
    the teacher's."""
    m = (cfg if cfg is not None else recipe.train).student
    if m is None:
        return teacher_spec
    return network_spec({"name": m.backbone.name, **m.backbone.options}, {"name": m.precond.name, **m.precond.options},
                        teacher_spec["shape"], teacher_spec["label_dim"])


def spec_of(recipe: Recipe, dataset) -> dict:
    m = recipe.model
    return network_spec({"name": m.backbone.name, **m.backbone.options}, {"name": m.precond.name, **m.precond.options},
                        dataset.shape, dataset.label_dim)


def check_teacher_fits(spec: dict, dataset, url: str) -> None:
    """A loaded teacher must take the recipe's data: same item shape and number of classes."""
    want = (list(dataset.shape), int(dataset.label_dim))
    if (list(spec["shape"]), int(spec["label_dim"])) != want:
        raise DpdmError(f"recipe.teacher.checkpoint: {url!r} is a network for items of shape {list(spec['shape'])} "
                        f"with label_dim {spec['label_dim']}, but the recipe's data has shape {want[0]} with "
                        f"label_dim {want[1]}; pick the checkpoint that was trained on this dataset")


def training_config(recipe: Recipe) -> dict:
    """The parts of a recipe that decide the trained weights (a resumed run must share them)."""
    data = unstructure(recipe)
    engine = data["engine"]
    config = {"data": data["data"], "model": data["model"], "teacher": data["teacher"], "train": data["train"],
              "seed": data["seed"], "engine": {"precision": engine["precision"], "accum": engine["accum"]}}
    if data.get("baselines"):  # only when there are some: older runs' snapshots keep their hash
        config["baselines"] = data["baselines"]
    return config


def config_hash(recipe: Recipe) -> str:
    return hashlib.sha256(json.dumps(training_config(recipe), sort_keys=True).encode()).hexdigest()[:16]


def config_changes(old: dict, new: dict, prefix: str = "recipe") -> list[str]:
    """Dotted keys whose values differ between two unstructured recipes."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [k for key in sorted(set(old) | set(new))
                for k in config_changes(old.get(key), new.get(key), f"{prefix}.{key}")]
    return [] if old == new else [prefix]


def batches(recipe: Recipe, dataset, batch_size: int, dist: Dist, seed: int):
    """Resumable batches for one phase: ``batch_size`` is global (all ranks, all ``engine.accum`` micro-batches)."""
    try:
        from dpdm.data.loader import Loader
    except ImportError:  # pragma: no cover - dpdm-core installed alone
        raise DpdmError("training needs dpdm-data's resumable Loader; pip install dpdm-data") from None
    engine = recipe.engine
    per_rank = batch_size // (dist.world_size * engine.accum)
    loader = Loader(dataset, per_rank, seed=seed, rank=dist.rank, world_size=dist.world_size,
                    num_workers=engine.num_workers, persistent_workers=engine.num_workers > 0,
                    pin_memory=dist.device.type == "cuda")
    return DeviceBatches(loader, dist.device, conditional=bool(dataset.label_dim))


class Phase:
    """What both training phases share: the process group, precision, snapshots, tracker and progress."""

    def __init__(self, recipe: Recipe, out: Path, dist: Dist, progress: Progress, tracker: Tracker, resume: bool):
        self.recipe, self.out, self.dist, self.progress, self.tracker = recipe, out, dist, progress, tracker
        self.resume = resume
        self.precision = Precision(recipe.engine.precision, dist.device)
        ckpt = recipe.engine.checkpoint
        self.root = (ckpt.dir or str(out / "checkpoints" / "train")).rstrip("/")
        self.hash = config_hash(recipe)

    def trainer(self, job, data, seed: int, specs: dict, sample_grid=None) -> Trainer:
        engine = self.recipe.engine
        ckpt = engine.checkpoint
        snapshots = Snapshots(f"{self.root}/{job.phase}", keep_last=ckpt.keep_last, keep_every=ckpt.keep_every)
        hooks = [sample_grid] if sample_grid is not None else []
        trainer = Trainer(job, data, dist=self.dist, seed=seed, max_nonfinite=engine.max_nonfinite,
                          snapshots=snapshots, save_every=ckpt.every, specs=specs, config_hash=self.hash,
                          tracker=self.tracker, log_every=engine.log_every, progress=self.progress, hooks=hooks)
        if self.resume:
            if trainer.resume():
                self.progress.log(f"{job.phase}: resumed from {trainer.last_saved} (step {trainer.step})")
        else:
            found = self.dist.broadcast_object(snapshots.latest() if self.dist.is_main else None)
            if found is not None:
                raise DpdmError(f"{snapshots.root} already holds training checkpoints ({found}); continue that run "
                                f"with --resume, or give another --out / engine.checkpoint.dir")
        return trainer

    def sample_grid(self, sampler: str, sigmas, shape, kind: str, label_dim: int):
        every = self.recipe.engine.sample_every
        if not every:
            return None
        return SampleGrid(every, self.out / "figures" / "progress", sampler=entry("sampler", sampler).obj,
                          sigmas=sigmas, shape=shape, kind=kind, label_dim=label_dim,
                          num=self.recipe.eval.figure_samples if kind == "image" else 2000, seed=self.recipe.seed,
                          tracker=self.tracker)


def train_teacher(recipe: Recipe, spec: dict, train_set, phase: Phase):
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
    sched = recipe.eval.teacher_schedule
    grid = phase.sample_grid("heun", get("schedule", sched.name)(18, **sched.options), spec["shape"],
                             train_set.kind, spec["label_dim"])
    seed = derive_seed(recipe.seed, TEACHER_STREAM)
    trainer = phase.trainer(job, batches(recipe, train_set, cfg.batch_size, dist, seed), seed,
                            {"model": spec, **({"ema": spec} if cfg.ema_halflife_nimg else {})}, grid)
    trainer.fit(cfg.steps)
    return job.model.eval().requires_grad_(False)


def distill(recipe: Recipe, teacher, spec: dict, train_set, phase: Phase, s_spec: dict | None = None, *,
            cfg=None, name: str | None = None, stream: int = STUDENT_STREAM):
    """Algorithm 1 for ``cfg.steps`` iterations through the engine (``cfg``: a ``TrainConfig``, default the
    recipe's ``train``); the student is ``cfg.student``'s own network (``s_spec``, trained from scratch) or a copy
    of the teacher. ``name``: the phase's name (snapshots, logs; default ``student``), e.g. a baseline's. Returns
    the ``DistillJob``."""
    cfg = cfg if cfg is not None else recipe.train
    dist = phase.dist
    s_spec = s_spec or spec
    sigma_data = getattr(teacher, "sigma_data", 0.5)
    divergence = build_divergence(recipe, sigma_data, cfg)
    torch.manual_seed(derive_seed(recipe.seed, stream))  # a student of its own: the same initial weights
    fresh = build_denoiser(s_spec).to(dist.device) if cfg.student is not None else None
    job = DistillJob(teacher, divergence, EDMLoss(sigma_data=sigma_data, sigma=cfg.sigma), student=fresh,
                     lr=cfg.lr, betas=cfg.betas, fake_lr=cfg.fake_lr, fake_updates=cfg.fake_updates,
                     order=cfg.order, student_dropout=cfg.student_dropout,
                     lr_warmup_nimg=cfg.lr_warmup_nimg, grad_clip=cfg.grad_clip,
                     ema_halflife_nimg=cfg.ema_halflife_nimg, accum=recipe.engine.accum,
                     precision=phase.precision, dist=dist)
    if name is not None:
        job.phase = name
    ev_cfg = recipe.eval
    sched = ev_cfg.student_schedule
    grid = None
    if name is None:  # progress grids of the student only
        grid = phase.sample_grid(ev_cfg.student_sampler.name,
                                 get("schedule", sched.name)(max(ev_cfg.student_steps), **sched.options),
                                 spec["shape"], train_set.kind, spec["label_dim"])
    seed = derive_seed(recipe.seed, stream)
    specs = {"student": s_spec, "fake": spec, **({"ema": s_spec} if cfg.ema_halflife_nimg else {})}
    trainer = phase.trainer(job, batches(recipe, train_set, cfg.batch_size, dist, seed), seed, specs, grid)
    trainer.fit(cfg.steps)
    return job


def baseline_phase(name: str) -> str:
    """The training phase (snapshot folder, log records) of ``recipe.baselines[name]``."""
    return f"baseline-{name}"


def references(recipe: Recipe, train_set, test_set, num: int):
    """``(reference, validation)`` real data in model space.

    ``reference`` scores samples: fresh samples of the true distribution when the dataset can draw
    them (toy data), else the held-out test split. ``validation`` is independent of the test split:
    fresh samples again, or the train split (up to ``max(num, len(reference))`` items); it selects
    the one-step σ_max and is the reference of the ``heldout`` recovery protocol (which noises the test split).
    """
    if hasattr(test_set, "sample"):
        g_ref = torch.Generator().manual_seed(recipe.seed + 1000)
        g_val = torch.Generator().manual_seed(recipe.seed + 2000)
        return to_model(test_set.sample(num, g_ref)), to_model(test_set.sample(num, g_val))
    g = torch.Generator().manual_seed(recipe.seed + 2000)
    ref = to_model(test_set.tensors()[0])
    train = to_model(train_set.tensors()[0])
    val = train[torch.randperm(len(train), generator=g)[: min(len(train), max(len(ref), num))]]
    return ref, val


def recovery_setup(recipe: Recipe, protocol: str, train_set, test_set, metric, num: int, seed: int, *,
                   validation=None, progress: Progress | None = None):
    """What the recovery experiment (Section 5.1) noises and what it compares with, for ``protocol``:
    ``(items, prepared reference, reference description, note or None)`` (``recovery.select`` and
    ``recovery.training_reference``; ``heldout`` compares with ``references``' validation data, which may be passed
    in already prepared)."""
    items, note = rec.select(protocol, train_set, test_set, num, seed)
    if protocol == "paper":
        reference, name = rec.training_reference(recipe, train_set, metric, num_samples=recipe.eval.num_samples,
                                                 exclude=items.indices, progress=progress)
    else:
        if validation is None:
            _, validation = references(recipe, train_set, test_set, recipe.eval.num_samples)
        reference = validation
        if hasattr(test_set, "sample"):
            name = f"{recipe.data.name} fresh samples ({recipe.eval.num_samples})"
        else:
            size = min(len(train_set), max(len(test_set), recipe.eval.num_samples))
            name = f"{recipe.data.name} training split, {size} random items"
    return items, ev.prepare_reference(metric, reference), name, note


def evaluate(recipe: Recipe, teacher, student, train_set, test_set, device, progress: Progress, out: Path,
             baselines: dict | None = None) -> dict:
    """NFE sweeps, one-step σ_max search and recovery; writes figures, returns the report dict.

    The sweeps: the student with its sampler and schedule, the teacher with each teacher sampler, and the
    undistilled teacher with exactly the student's sampler and schedule at the student's step counts (the
    baseline of Section 5.2: it separates what distillation does from what the sampler does)."""
    cfg = recipe.eval
    options = dict(cfg.metric.options)
    if (cfg.metric.name == "fid" or cfg.metric.name.startswith(FD_PREFIX)) and "device" not in options:
        options["device"] = str(device)  # detector features on the run's device (fd classifiers train on the CPU)
    metric_fn = make_metric(cfg.metric.name, options, data=(recipe.data.name, recipe.data.options), progress=progress)
    reference, validation = references(recipe, train_set, test_set, cfg.num_samples)
    reference_data = reference
    if is_feature_metric(metric_fn):  # featurise each reference once (cached on disk for the test split)
        if cfg.ref:
            reference = load_stats(cfg.ref)
        else:
            reference = cached_dataset_stats(dataset_key(recipe, "test"), test_set, metric_fn.detector,
                                             progress=progress)
        validation = metric_fn.prepare(validation)
    shape, label_dim, kind = tuple(test_set.shape), test_set.label_dim, test_set.kind
    common = dict(num=cfg.num_samples, shape=shape, label_dim=label_dim, seed=recipe.seed, device=device,
                  batch_size=cfg.batch_size)
    keep = cfg.figure_samples if kind == "image" else None  # the figures' share: not num_samples images per point
    student_sampler = {"name": cfg.student_sampler.name, **cfg.student_sampler.options}
    student_schedule = {"name": cfg.student_schedule.name, **cfg.student_schedule.options}
    teacher_samplers = [{"name": c.name, **c.options} for c in cfg.teacher_samplers]
    teacher_schedule = {"name": cfg.teacher_schedule.name, **cfg.teacher_schedule.options}
    timings = {}

    t0 = time.perf_counter()
    total = 2 * len(cfg.student_steps) + len(teacher_samplers) * len(cfg.teacher_nfe)
    with progress.task("evaluate: NFE sweep", total) as bar:
        s_vals, s_samples = ev.sweep_student(student, metric_fn, reference, sampler=student_sampler,
                                             schedule=student_schedule, steps=cfg.student_steps,
                                             on_step=lambda: bar.advance(1), keep=keep, **common)
        # the baseline of Section 5.2: the undistilled teacher with exactly the student's sampler and schedule
        u_vals, u_samples = ev.sweep_student(teacher, metric_fn, reference, sampler=student_sampler,
                                             schedule=student_schedule, steps=cfg.student_steps,
                                             on_step=lambda: bar.advance(1), keep=keep, **common)
        t_vals, t_samples = ev.sweep_teacher(teacher, metric_fn, reference, samplers=teacher_samplers,
                                             schedule=teacher_schedule, nfes=cfg.teacher_nfe,
                                             on_step=lambda: bar.advance(1), keep=keep, **common)
        b_vals = {}
        for name, (model, _, divergence) in (baselines or {}).items():
            base = recipe.baselines[name]
            smax = base.sigma_max if base.sigma_max is not None else getattr(divergence, "generator_sigma", None)
            schedule = {**student_schedule, **({"sigma_max": smax} if smax is not None else {})}
            b_vals[name], _ = ev.sweep_student(model, metric_fn, reference, sampler=student_sampler,
                                               schedule=schedule, steps=base.steps, keep=0, **common)
    one = ev.best_one_step(student, metric_fn, validation, reference, sampler=student_sampler,
                           schedule=student_schedule, sigma_maxes=cfg.one_step_sigma_max, keep=keep, **common)
    timings["sweep_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()  # the estimator's noise: real data, and the claims' points at other seeds
    noise = {"real": ev.real_data_noise(metric_fn, train_set, reference, num=cfg.num_samples, seed=recipe.seed)}
    if cfg.noise_seeds > 1:
        noise.update(seed_spread(recipe, student, teacher, metric_fn, reference, s_vals, u_vals, t_vals, common,
                                 student_sampler, student_schedule, teacher_samplers, teacher_schedule))
    timings["noise_s"] = time.perf_counter() - t0
    cross = None
    if cfg.cross_nfe:
        t0 = time.perf_counter()
        cells, cross_grids = cross_use(student, teacher, metric=metric_fn, reference=reference,
                                       samplers=cross_samplings(recipe), nfe=cfg.cross_nfe, num=cfg.num_samples,
                                       shape=shape, label_dim=label_dim, seed=recipe.seed,
                                       batch_size=cfg.batch_size, keep=keep if keep is not None else cfg.num_samples)
        cross = {"nfe": cfg.cross_nfe, "cells": cells}
        timings["cross_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    protocol = cfg.recovery_protocol
    items, rec_reference, rec_ref_name, note = recovery_setup(
        recipe, protocol, train_set, test_set, metric_fn, cfg.recovery_num, recipe.seed,
        validation=validation if protocol == "heldout" else None, progress=progress)
    if note:
        progress.log(f"recovery: {note.replace('--num', 'eval.recovery_num')}")
    shown = min(8, cfg.figure_samples) if kind == "image" else None
    recovered, rec_examples = ev.recovery(student, teacher, metric_fn, items, None, cfg.recovery_sigmas,
                                          rec_reference, seed=recipe.seed, device=device, keep=shown,
                                          batch_size=cfg.batch_size)
    floor = rec.distance(metric_fn, items, rec_reference)
    clean = rec.first(items, shown if shown is not None else len(items))
    timings["recovery_s"] = time.perf_counter() - t0

    figs = out / "figures"
    figs.mkdir(exist_ok=True)
    sweep = {"student": {cfg.student_sampler.name: {str(k): v for k, v in s_vals.items()}},
             "undistilled": {cfg.student_sampler.name: {str(k): v for k, v in u_vals.items()}},
             "teacher": {name: {str(k): v for k, v in vals.items()} for name, vals in t_vals.items()}}
    for name, vals in b_vals.items():  # baselines: their own role, sampled like the student (report.sweep_roles)
        sweep[name] = {cfg.student_sampler.name: {str(k): v for k, v in vals.items()}}
    _figures(figs, kind, cfg, s_samples, t_samples, u_samples, one, reference_data, clean, rec_examples, sweep,
             cfg.metric.name, progress, noise=noise, cross=cross and (cross, cross_grids), title=recipe.name)
    report = {
        "metric": cfg.metric.name,
        "train_steps": recipe.train.steps,  # 0: no distillation ran (report.checks and report.md say so)
        "sweep": sweep,  # {"student"|"undistilled"|"teacher": {sampler: {nfe: value}}} (report.py)
        "one_step": {"validation": {str(k): v for k, v in one["validation"].items()},
                     "best_sigma_max": one["best_sigma_max"], "value": one["value"]},
        "recovery_protocol": protocol,
        "recovery": {f"{s:g}": vals for s, vals in recovered.items()},
        "recovery_floor": floor,  # distance of the clean (noised) items themselves to the reference
        "recovery_num": len(items),
        "recovery_reference": rec_ref_name,
        "noise": noise,  # the estimator's noise: {"real": two real halves, "seeds", "sweep": per seed, "seed_spread"}
        "timings": timings,
    }
    if cross is not None:
        report["cross"] = cross  # Figure 6: {"nfe", "cells": {model: {sampler: {"steps", "nfe", "value", "sigmas"}}}}
    detector = getattr(metric_fn, "detector", None)
    if detector is not None:
        report["detector"] = detector.key
        if getattr(detector, "accuracy", None) is not None:
            report["detector_test_accuracy"] = detector.accuracy
    return report


def seed_spread(recipe, student, teacher, metric_fn, reference, s_vals, u_vals, t_vals, common, student_sampler,
                student_schedule, teacher_samplers, teacher_schedule) -> dict:
    """The claims' points re-scored at seeds ``seed + 1 … seed + eval.noise_seeds − 1``: the student and the
    undistilled teacher at every student step count, and the teacher at the points the claims compare them with
    (its best sampler at ≤ 3K NFE for each student K, and its best overall). Returns ``{"seeds", "sweep": {role:
    {sampler: {nfe: [value per seed]}}}, "seed_spread": the largest max − min over all of them}``."""
    cfg = recipe.eval
    seeds = [recipe.seed + i for i in range(cfg.noise_seeds)]
    wanted: dict = {}
    for nfe in s_vals:
        best = best_teacher(t_vals, NFE_FACTOR * int(nfe))
        if best:
            wanted.setdefault(best["sampler"], set()).add(int(best["nfe"]))
    best = best_teacher(t_vals, max(int(n) for by in t_vals.values() for n in by) if t_vals else 0)
    if best:
        wanted.setdefault(best["sampler"], set()).add(int(best["nfe"]))
    name = cfg.student_sampler.name
    out = {"student": {name: {str(k): [v] for k, v in s_vals.items()}},
           "undistilled": {name: {str(k): [v] for k, v in u_vals.items()}},
           "teacher": {s: {str(n): [t_vals[s][n]] for n in sorted(ns)} for s, ns in wanted.items()}}
    for seed in seeds[1:]:
        at = dict(common, seed=seed)
        for role, model in (("student", student), ("undistilled", teacher)):
            vals, _ = ev.sweep_student(model, metric_fn, reference, sampler=student_sampler, schedule=student_schedule,
                                       steps=cfg.student_steps, keep=0, **at)
            for k, v in vals.items():
                out[role][name][str(k)].append(v)
        for spec in teacher_samplers:
            if spec["name"] in wanted:
                vals, _ = ev.sweep_teacher(teacher, metric_fn, reference, samplers=[spec], schedule=teacher_schedule,
                                           nfes=sorted(wanted[spec["name"]]), keep=0, **at)
                for n, v in vals[spec["name"]].items():
                    out["teacher"][spec["name"]][str(n)].append(v)
    spread = max((max(v) - min(v) for by in out.values() for vals in by.values() for v in vals.values()),
                 default=0.0)
    return {"seeds": seeds, "sweep": out, "seed_spread": spread}


def _figures(figs, kind, cfg, s_samples, t_samples, u_samples, one, reference, clean, rec_examples, sweep, metric,
             progress, *, noise: dict | None = None, cross=None, title: str = ""):
    try:
        from ..eval import figures
    except ImportError:  # pragma: no cover - matplotlib missing
        progress.log("matplotlib is not installed; skipping figures (pip install dpdm-core[plots])")
        return
    n = cfg.figure_samples if kind == "image" else cfg.num_samples
    prefix = f"{title}: " if title else ""
    panels = {"data": reference[:n]}
    panels.update({f"NFE {k}": v[:n] for k, v in s_samples.items()})
    panels[f"NFE 1, σmax={one['best_sigma_max']:g}"] = one["samples"][:n]
    figures.samples_figure(panels, kind, figs / "samples_student.png", title=f"{prefix}DPDM student (dpdm sampler)")
    for name, by_nfe in t_samples.items():  # the student's step counts, and the teacher's largest NFE (its best)
        top = max(by_nfe, default=None)
        shown = {k: v for k, v in by_nfe.items() if k in s_samples or k == top}
        panels = {"data": reference[:n], **{f"NFE {k}": v[:n] for k, v in shown.items()}}
        figures.samples_figure(panels, kind, figs / f"samples_teacher_{name}.png",
                               title=f"{prefix}teacher, {name} sampler")
    panels = {"data": reference[:n], **{f"NFE {k}": v[:n] for k, v in u_samples.items()}}
    figures.samples_figure(panels, kind, figs / "samples_undistilled.png",
                           title=f"{prefix}undistilled teacher, {cfg.student_sampler.name} with the student's schedule")
    floor = noise["real"] if noise else None
    figures.curve_figure(sweep, metric, figs / "nfe_curve.png", floor=floor,
                         title=f"{prefix}sample quality vs NFE")
    m = min(8, cfg.figure_samples) if kind == "image" else len(clean)  # Figure 4: a strip of 8 items per cell
    shown = {s: {k: v[:m] for k, v in ex.items()} for s, ex in rec_examples.items()}
    figures.recovery_figure(clean[:m], shown, kind, figs / "recovery.png",
                            title=f"{prefix}recovery of noised training data (Section 5.1, Figure 4)")
    if cross is not None:
        result, grids = cross
        panels = {model: {c: (f"{model} + {c} sampler, NFE {cell['nfe']}\n{metric} {cell['value']:.4g}",
                              grids[model][c][:n]) for c, cell in row.items()}
                  for model, row in result["cells"].items()}
        figures.panel_grid(panels, kind, figs / "cross.png",
                           title=f"{prefix}models × samplers at NFE {result['nfe']} (Figure 6)\n"
                                 f"{metric}, lower is better")


def run(recipe: Recipe, out: str | Path, progress: Progress | None = None, *, dist: Dist | None = None,
        resume: bool = False) -> dict | None:
    """Run ``recipe`` into the directory ``out``; returns the report (also written to disk) on rank 0, None on
    the other ranks. Under torchrun every rank calls this (``dist`` from ``distributed.init_dist``); rank 0
    alone writes files other than snapshots and evaluates. ``resume``: continue from the newest complete
    training snapshot of each phase (``out``'s, or ``engine.checkpoint.dir``)."""
    dist = dist or init_dist(recipe.device)
    progress = (progress or Progress()) if dist.is_main else Progress()
    train_set, test_set, spec = preflight(recipe)
    out = Path(out)
    if dist.is_main:
        prefetch(recipe)
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_yaml(unstructure(recipe)))
    dist.barrier()
    device = dist.device
    timings = {}
    with Tracker(out / "metrics.jsonl", dist=dist, tensorboard=out / "tensorboard") as tracker:  # TB if installed
        phase = Phase(recipe, out, dist, progress, tracker, resume)
        t0 = time.perf_counter()
        if recipe.teacher.checkpoint:
            teacher, spec = load_checkpoint(recipe.teacher.checkpoint, device=device)
            check_teacher_fits(spec, train_set, recipe.teacher.checkpoint)
        else:
            teacher = train_teacher(recipe, spec, train_set, phase)
        timings["teacher_s"] = time.perf_counter() - t0
        if dist.is_main:
            save_denoiser(str(out / "checkpoints" / "teacher.safetensors"), teacher, spec, {"role": "teacher"})

        t0 = time.perf_counter()
        s_spec = student_spec(recipe, spec)
        job = distill(recipe, teacher, spec, train_set, phase, s_spec)
        timings["student_s"] = time.perf_counter() - t0

        baselines = {}
        for i, (name, base) in enumerate(recipe.baselines.items()):
            t0 = time.perf_counter()
            b_spec = student_spec(recipe, spec, base.train)
            b_job = distill(recipe, teacher, spec, train_set, phase, b_spec, cfg=base.train,
                            name=baseline_phase(name), stream=BASELINE_STREAM + i)
            baselines[name] = (b_job.model.eval(), b_spec, b_job.divergence)
            timings[f"baseline_{name}_s"] = time.perf_counter() - t0
    student = job.model.eval()
    report = None
    if dist.is_main:
        save_denoiser(str(out / "checkpoints" / "student.safetensors"), student, s_spec,
                      {"role": "student", "steps": recipe.train.steps})
        save_denoiser(str(out / "checkpoints" / "fake.safetensors"), job.fake.module, spec, {"role": "fake"})
        for name, (model, b_spec, _) in baselines.items():
            save_denoiser(str(out / "checkpoints" / f"{name}.safetensors"), model, b_spec,
                          {"role": "baseline", "name": name, "steps": recipe.baselines[name].train.steps})
        report = evaluate(recipe, teacher, student, train_set, test_set, device, progress, out, baselines)
        report["timings"].update(timings)
        report["recipe"] = recipe.name
        report["world_size"] = dist.world_size
        if resume:  # the phase times then cover this process only, not the one that trained
            report["resumed"] = True
        write_report(report, out)
    dist.barrier()
    return report


def load_run(run_dir: str | Path, device="cpu"):
    """``(recipe, teacher, student)`` of a finished run, from its config and checkpoints."""
    from ..config.recipe import load_recipe

    run_dir = Path(run_dir)
    recipe = load_recipe(str(run_dir / "config.yaml"))
    teacher = load_denoiser(str(run_dir / "checkpoints" / "teacher.safetensors"), device=device)
    student = load_denoiser(str(run_dir / "checkpoints" / "student.safetensors"), device=device)
    return recipe, teacher, student
