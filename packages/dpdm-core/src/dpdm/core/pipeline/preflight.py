"""Checking a recipe before any training: ``preflight(recipe)`` builds what the run needs and returns it as a
``Plan``, so that bad values fail in seconds with their dotted keys (all problems at once), and the run then uses
the very objects that were checked (datasets, network specs, metric and detector, reference statistics)."""

from __future__ import annotations

import os
from typing import Any

import attrs
import torch

from ..config.recipe import Recipe
from ..errors import ConfigError, DpdmError
from ..eval.fid import load_stats
from ..eval.metrics import make_metric
from ..io.cache import local_copy, needs_download
from ..io.checkpoint import build_denoiser
from ..plugins.registry import entry
from ..progress import Progress
from .build import build_divergence, make_dataset, resolve_device, schedule_fn, spec_of, student_spec


@attrs.define(eq=False)
class Plan:
    """What ``preflight`` built for a recipe, consumed by ``run``: each dataset, network spec, metric (with its
    detector) and reference file exactly once per process."""

    recipe: Recipe
    source: str | None
    train_set: Any
    test_set: Any
    spec: dict | None  # the teacher's network (replaced by the checkpoint's when teacher.checkpoint is set)
    student_spec: dict | None  # train.student's network, else the teacher's
    baseline_specs: dict[str, dict]
    device: torch.device | None
    _metric: Any = None
    _ref_stats: Any = None

    def metric(self, progress: Progress | None = None):
        """The recipe's metric, built on first use (an ``fd-<dataset>`` classifier is trained or loaded then)."""
        if self._metric is None:
            cfg = self.recipe.eval.metric
            self._metric = make_metric(cfg.name, cfg.options, data=(self.recipe.data.name, self.recipe.data.options),
                                       progress=progress, device=self.device)
        return self._metric

    def ref_stats(self):
        """``eval.ref``'s feature statistics, read once."""
        if self._ref_stats is None:
            self._ref_stats = load_stats(self.recipe.eval.ref)
        return self._ref_stats


def preflight(recipe: Recipe, source: str | None = None, *, check_metric: bool | None = None) -> Plan:
    """Build everything a run needs before any training, so that bad values fail in seconds with their dotted keys
    (all problems at once) rather than minutes into a run, and return it as a ``Plan`` that ``run`` consumes (nothing
    is built twice). ``check_metric``: build the metric now (default: on rank 0 only, the rank that evaluates; its
    detector is kept in the plan for the evaluation)."""
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
    device = check("recipe.device", lambda: resolve_device(recipe.device))
    train_set = check("recipe.data", lambda: make_dataset(recipe.data, "train"))
    test_set = check("recipe.data", lambda: make_dataset(recipe.data, "test")) if train_set is not None else None
    spec, s_spec, b_specs = None, None, {}
    if train_set is not None:
        spec = spec_of(recipe, train_set)
        s_spec = student_spec(recipe, spec)
        if not recipe.teacher.checkpoint:
            check("recipe.model", lambda: build_denoiser(spec))
        if recipe.train.student is not None:
            check("recipe.train.student", lambda: build_denoiser(s_spec))
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
        if spec is not None:
            b_specs[name] = student_spec(recipe, spec, base.train)
            if base.train.student is not None:
                check(f"recipe.{key}.train.student", lambda: build_denoiser(b_specs[name]))
    plan = Plan(recipe, source, train_set, test_set, spec, s_spec, b_specs, device)
    if check_metric is None:
        check_metric = os.environ.get("RANK", "0") == "0"
    if check_metric:
        check("recipe.eval.metric", lambda: _check_metric(plan))
    if recipe.eval.ref is not None and not needs_download(recipe.eval.ref):
        check("recipe.eval.ref", plan.ref_stats)
    student_schedule = schedule_fn(recipe.eval.student_schedule)
    teacher_schedule = schedule_fn(recipe.eval.teacher_schedule)
    for n in recipe.eval.student_steps:
        check("recipe.eval.student_schedule", lambda: student_schedule(n))
    for smax in recipe.eval.one_step_sigma_max:
        check("recipe.eval.student_schedule", lambda: student_schedule(1, sigma_max=smax))
    for n in recipe.eval.teacher_nfe:
        check("recipe.eval.teacher_schedule", lambda: teacher_schedule(n))
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)), source)
    return plan


def _check_metric(plan: Plan) -> None:
    """Build the metric (a missing FID detector fails here), except one registered as ``deferred`` (``fd-<dataset>``,
    whose classifier may need training: that happens at evaluation, once, and is cached), and a detector URL not downloaded yet (a real run
    fetches it before training, ``prefetch``; ``--dry-run`` does not download)."""
    name, options = plan.recipe.eval.metric.name, plan.recipe.eval.metric.options
    if entry("metric", name).meta.get("deferred"):
        return  # e.g. an fd classifier: trained (or loaded from the cache) at evaluation, with progress shown
    if isinstance(options.get("detector"), str) and needs_download(options["detector"]):
        return
    plan.metric()


def prefetch(plan: Plan) -> None:
    """Download what evaluation will read from the web (the FID detector, ``eval.ref``) before training starts,
    so that a wrong URL or a missing network fails now rather than after the training."""
    recipe = plan.recipe
    detector = recipe.eval.metric.options.get("detector")
    for key, url in (("recipe.eval.metric.detector", detector), ("recipe.eval.ref", recipe.eval.ref)):
        if isinstance(url, str) and needs_download(url):
            try:
                local_copy(url)
            except DpdmError as exc:
                raise DpdmError(f"{key}: {exc}") from None
    if recipe.eval.ref is not None:
        plan.ref_stats()
    if detector:
        _check_metric(plan)
