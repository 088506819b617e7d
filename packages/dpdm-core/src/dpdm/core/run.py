"""Running a recipe end to end: train (or load) the teacher, distill the DPDM student
(Algorithm 1), evaluate (NFE sweeps and Section 5.1 recovery), and write the run directory:

    config.yaml          the resolved recipe
    checkpoints/         teacher, student, fake score (safetensors + network spec)
    metrics.jsonl        training losses every LOG_EVERY steps
    report.json          {"metric", "sweep", "recovery", "one_step", "checks", "timings", ...}
    report.md            the same as tables
    figures/*.png        samples per NFE (student, each teacher sampler), NFE curve, recovery panels
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from . import evaluate as ev
from .checkpoint import build_denoiser, load_checkpoint, load_denoiser, network_spec, save_denoiser
from .config import Recipe
from .datasets import to_model
from .distill import DPDM
from .errors import ConfigError, DpdmError
from .losses import EDMLoss
from .progress import Progress
from .registry import get
from .report import write_report
from .structure import dump_yaml, unstructure
from .teacher import TeacherTrainer

LOG_EVERY = 50


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DpdmError(f"recipe.device is {name!r} but CUDA is not available here; use 'cpu' or 'auto'")
    return device


class Batches:
    """Endless random batches ``(x0, labels)`` in model space from an in-memory dataset."""

    def __init__(self, dataset, batch_size: int, generator: torch.Generator, device):
        if not hasattr(dataset, "tensors"):
            raise DpdmError(f"dataset {getattr(dataset, 'name', dataset)!r} is not in memory; the embedded "
                            "training loop needs a dataset with tensors()")
        data, labels = dataset.tensors()
        self.data = to_model(data).to(device)
        self.labels = labels.to(device) if dataset.label_dim else None
        self.batch_size, self.generator, self.device = batch_size, generator, device

    def __call__(self):
        idx = torch.randint(len(self.data), (self.batch_size,), generator=self.generator).to(self.device)
        return self.data[idx], (self.labels[idx] if self.labels is not None else None)


def make_dataset(recipe: Recipe, split: str):
    opts = dict(recipe.data.options)
    try:
        return get("dataset", recipe.data.name)(split=split, **opts)
    except (ValueError, TypeError) as exc:
        raise DpdmError(f"recipe.data ({recipe.data.name}): {exc}") from None


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
                            ("eval.recovery_num", recipe.eval.recovery_num, 2)]:
        if value < low:
            problems.append(f"recipe.{key}: must be at least {low}, got {value}")
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
    check("recipe.train.divergence",
          lambda: get("divergence", recipe.train.divergence.name)(sigma=recipe.train.sigma,
                                                                  **recipe.train.divergence.options))
    check("recipe.eval.metric", lambda: get("metric", recipe.eval.metric.name)(**recipe.eval.metric.options))
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


def student_spec(recipe: Recipe, teacher_spec: dict) -> dict:
    """The student's network: ``train.student`` if the recipe names one, else the teacher's."""
    m = recipe.train.student
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


def _log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train_teacher(recipe: Recipe, spec: dict, batches: Batches, device, progress: Progress, log_path: Path):
    cfg = recipe.teacher.train
    denoiser = build_denoiser(spec).to(device)
    sigma_data = getattr(denoiser, "sigma_data", 0.5)
    trainer = TeacherTrainer(denoiser, EDMLoss(sigma_data=sigma_data, sigma=cfg.sigma), lr=cfg.lr, betas=cfg.betas,
                             ema_halflife_nimg=cfg.ema_halflife_nimg, grad_clip=cfg.grad_clip,
                             lr_warmup_nimg=cfg.lr_warmup_nimg)
    generator = batches.generator
    with progress.task("teacher (EDM loss)", cfg.steps) as bar:
        for step in range(cfg.steps):
            stats = trainer.step(*batches(), generator=generator if device.type == "cpu" else None)
            if step % LOG_EVERY == 0 or step == cfg.steps - 1:
                _log(log_path, {"phase": "teacher", "step": step, **stats})
            bar.advance(1, **stats)
    return trainer.model.eval().requires_grad_(False)


def distill(recipe: Recipe, teacher, batches: Batches, device, progress: Progress, log_path: Path,
            student=None) -> DPDM:
    """Algorithm 1 for ``train.steps`` student updates; ``student`` (default: a copy of the teacher)."""
    cfg = recipe.train
    div_opts = dict(cfg.divergence.options)
    divergence = get("divergence", cfg.divergence.name)(sigma=cfg.sigma, **div_opts)
    sigma_data = getattr(teacher, "sigma_data", 0.5)
    fake_loss = EDMLoss(sigma_data=sigma_data, sigma=cfg.sigma)
    algo = DPDM(teacher, divergence, fake_loss, lr=cfg.lr, betas=cfg.betas, fake_lr=cfg.fake_lr,
                fake_updates=cfg.fake_updates, ema_halflife_nimg=cfg.ema_halflife_nimg, grad_clip=cfg.grad_clip,
                student=student)
    generator = batches.generator if device.type == "cpu" else None
    with progress.task(f"student (DPDM, {cfg.divergence.name})", cfg.steps) as bar:
        for step in range(cfg.steps):
            stats = algo.step(batches, generator=generator)
            if step % LOG_EVERY == 0 or step == cfg.steps - 1:
                _log(log_path, {"phase": "student", "step": step, **stats})
            bar.advance(1, **{k: v for k, v in stats.items() if k in ("student_grad_norm", "fake_loss")})
    return algo


def references(recipe: Recipe, train_set, test_set, num: int):
    """``(reference, validation)`` real data in model space.

    ``reference`` scores samples: fresh samples of the true distribution when the dataset can draw
    them (toy data), else the held-out test split. ``validation`` is independent of the test split:
    fresh samples again, or the train split (up to ``max(num, len(reference))`` items); it selects
    the one-step σ_max and is the reference of the recovery protocol (which noises the test split).
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


def recovery_data(recipe: Recipe, test_set, num: int):
    """The first ``num`` held-out items (model space) and their labels (None if unconditional)."""
    data, labels = test_set.tensors()
    return to_model(data[:num]), (labels[:num] if test_set.label_dim else None)


def evaluate(recipe: Recipe, teacher, student, train_set, test_set, device, progress: Progress, out: Path) -> dict:
    """NFE sweeps, one-step σ_max search and recovery; writes figures, returns the report dict."""
    cfg = recipe.eval
    metric_fn = get("metric", cfg.metric.name)(**cfg.metric.options)
    reference, validation = references(recipe, train_set, test_set, cfg.num_samples)
    shape, label_dim, kind = tuple(test_set.shape), test_set.label_dim, test_set.kind
    common = dict(num=cfg.num_samples, shape=shape, label_dim=label_dim, seed=recipe.seed, device=device)
    student_sampler = {"name": cfg.student_sampler.name, **cfg.student_sampler.options}
    student_schedule = {"name": cfg.student_schedule.name, **cfg.student_schedule.options}
    teacher_samplers = [{"name": c.name, **c.options} for c in cfg.teacher_samplers]
    teacher_schedule = {"name": cfg.teacher_schedule.name, **cfg.teacher_schedule.options}
    timings = {}

    t0 = time.perf_counter()
    total = len(cfg.student_steps) + len(teacher_samplers) * len(cfg.teacher_nfe)
    with progress.task("evaluate: NFE sweep", total) as bar:
        s_vals, s_samples = ev.sweep_student(student, metric_fn, reference, sampler=student_sampler,
                                             schedule=student_schedule, steps=cfg.student_steps,
                                             on_step=lambda: bar.advance(1), **common)
        t_vals, t_samples = ev.sweep_teacher(teacher, metric_fn, reference, samplers=teacher_samplers,
                                             schedule=teacher_schedule, nfes=cfg.teacher_nfe,
                                             on_step=lambda: bar.advance(1), **common)
    one = ev.best_one_step(student, metric_fn, validation, reference, sampler=student_sampler,
                           schedule=student_schedule, sigma_maxes=cfg.one_step_sigma_max, **common)
    timings["sweep_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    clean, labels = recovery_data(recipe, test_set, cfg.recovery_num)
    rec, rec_examples = ev.recovery(student, teacher, metric_fn, clean, labels, cfg.recovery_sigmas, validation,
                                    seed=recipe.seed, device=device)
    floor = metric_fn(clean, validation)
    timings["recovery_s"] = time.perf_counter() - t0

    figs = out / "figures"
    figs.mkdir(exist_ok=True)
    _figures(figs, kind, cfg, s_samples, t_samples, one, reference, clean, rec_examples, s_vals, t_vals,
             cfg.metric.name, progress)
    return {
        "metric": cfg.metric.name,
        "sweep": {"student": {cfg.student_sampler.name: {str(k): v for k, v in s_vals.items()}},
                  "teacher": {name: {str(k): v for k, v in vals.items()} for name, vals in t_vals.items()}},
        "one_step": {"validation": {str(k): v for k, v in one["validation"].items()},
                     "best_sigma_max": one["best_sigma_max"], "value": one["value"]},
        "recovery": {f"{s:g}": vals for s, vals in rec.items()},
        "recovery_floor": floor,  # distance of the clean held-out items themselves to the reference
        "timings": timings,
    }


def _figures(figs, kind, cfg, s_samples, t_samples, one, reference, clean, rec_examples, s_vals, t_vals, metric,
             progress):
    try:
        from . import figures
    except ImportError:  # pragma: no cover - matplotlib missing
        progress.log("matplotlib is not installed; skipping figures (pip install dpdm-core[plots])")
        return
    n = cfg.figure_samples if kind == "image" else cfg.num_samples
    panels = {"data": reference[:n]}
    panels.update({f"NFE {k}": v[:n] for k, v in s_samples.items()})
    panels[f"NFE 1, σmax={one['best_sigma_max']:g}"] = one["samples"][:n]
    figures.samples_figure(panels, kind, figs / "samples_student.png", title="DPDM student")
    for name, by_nfe in t_samples.items():
        panels = {"data": reference[:n], **{f"NFE {k}": v[:n] for k, v in by_nfe.items() if k <= 16}}
        figures.samples_figure(panels, kind, figs / f"samples_teacher_{name}.png", title=f"teacher, {name}")
    sweep = {"student": {cfg.student_sampler.name: {str(k): v for k, v in s_vals.items()}},
             "teacher": {name: {str(k): v for k, v in vals.items()} for name, vals in t_vals.items()}}
    figures.curve_figure(sweep, metric, figs / "nfe_curve.png")
    m = cfg.figure_samples if kind == "image" else len(clean)
    shown = {s: {k: v[:m] for k, v in ex.items()} for s, ex in rec_examples.items()}
    figures.recovery_figure(clean[:m], shown, kind, figs / "recovery.png")


def run(recipe: Recipe, out: str | Path, progress: Progress | None = None) -> dict:
    """Run ``recipe`` into the directory ``out``; returns the report (also written to disk)."""
    progress = progress or Progress()
    train_set, test_set, spec = preflight(recipe)
    out = Path(out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_yaml(unstructure(recipe)))
    log_path = out / "metrics.jsonl"
    device = resolve_device(recipe.device)
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    timings = {}
    t0 = time.perf_counter()
    if recipe.teacher.checkpoint:
        teacher, spec = load_checkpoint(recipe.teacher.checkpoint, device=device)
        check_teacher_fits(spec, train_set, recipe.teacher.checkpoint)
    else:
        teacher_batches = Batches(train_set, recipe.teacher.train.batch_size, generator, device)
        teacher = train_teacher(recipe, spec, teacher_batches, device, progress, log_path)
    timings["teacher_s"] = time.perf_counter() - t0
    save_denoiser(str(out / "checkpoints" / "teacher.safetensors"), teacher, spec, {"role": "teacher"})

    t0 = time.perf_counter()
    s_spec = student_spec(recipe, spec)
    fresh = build_denoiser(s_spec).to(device) if recipe.train.student is not None else None
    algo = distill(recipe, teacher, Batches(train_set, recipe.train.batch_size, generator, device), device,
                   progress, log_path, student=fresh)
    timings["student_s"] = time.perf_counter() - t0
    student = algo.model.eval()
    save_denoiser(str(out / "checkpoints" / "student.safetensors"), student, s_spec,
                  {"role": "student", "steps": recipe.train.steps})
    save_denoiser(str(out / "checkpoints" / "fake.safetensors"), algo.fake, spec, {"role": "fake"})

    report = evaluate(recipe, teacher, student, train_set, test_set, device, progress, out)
    report["timings"].update(timings)
    report["recipe"] = recipe.name
    write_report(report, out)
    return report


def load_run(run_dir: str | Path, device="cpu"):
    """``(recipe, teacher, student)`` of a finished run, from its config and checkpoints."""
    from .config import load_recipe

    run_dir = Path(run_dir)
    recipe = load_recipe(str(run_dir / "config.yaml"))
    teacher = load_denoiser(str(run_dir / "checkpoints" / "teacher.safetensors"), device=device)
    student = load_denoiser(str(run_dir / "checkpoints" / "student.safetensors"), device=device)
    return recipe, teacher, student
