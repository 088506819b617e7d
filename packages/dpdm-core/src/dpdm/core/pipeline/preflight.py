"""Checking a recipe before any training: ``preflight(recipe)`` builds what the run needs and returns it as a
``Plan``, so that bad values fail in seconds with their dotted keys (all problems at once), and the run then uses
the very objects that were checked (datasets, network specs, metric and detector, reference statistics)."""

from __future__ import annotations

import os
from typing import Any

import attrs
import torch

from ..config.bounds import bound_problems
from ..config.recipe import Recipe
from ..errors import ConfigError, DpdmError
from ..eval.fid import load_stats
from ..eval.metrics import data_problem, make_metric, quadratic_cost_problem
from ..io.cache import local_copy, needs_download
from ..io.checkpoint import build_denoiser
from ..io.storage import check_destination
from ..plugins.registry import entry
from ..progress import Progress
from ..train.distributed import resolve_device
from ..train.lora import targeted
from .build import build_divergence, make_dataset, schedule_fn, spec_of, student_spec


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
    problems = bound_problems(recipe)  # the schema's bounds (config/bounds.py), with everything else below

    def check(key, fn):
        try:
            return fn()
        except DpdmError as exc:
            problems.append(f"{key}: {exc}")
        except (ValueError, TypeError) as exc:
            problems.append(f"{key}: {exc}")

    engine = recipe.engine
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    phases = [("train.batch_size", recipe.train.batch_size),
              *[(f"baselines.{name}.train.batch_size", base.train.batch_size) for name, base in recipe.baselines.items()]]
    if not recipe.teacher.checkpoint:
        phases.insert(0, ("teacher.train.batch_size", recipe.teacher.train.batch_size))
    for key, batch in phases:
        if engine.accum >= 1 and batch >= 1 and batch % (world * engine.accum):
            problems.append(f"recipe.{key}: the global batch {batch} must split evenly over {world} rank(s) x "
                            f"engine.accum {engine.accum} micro-batches; pick a multiple of {world * engine.accum}")
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    device = None
    if not any(p.startswith("recipe.device:") for p in problems):  # a bad name is a bound problem already
        device = check("recipe.device", lambda: resolve_device(recipe.device, local, world))  # this rank's device
    train_set = check("recipe.data", lambda: make_dataset(recipe.data, "train"))
    test_set = check("recipe.data", lambda: make_dataset(recipe.data, "test")) if train_set is not None else None
    spec, s_spec, b_specs = None, None, {}
    if train_set is not None:
        spec = spec_of(recipe, train_set)
        s_spec = student_spec(recipe, spec)
        if not recipe.teacher.checkpoint:  # (a loaded teacher's layers are checked when it is loaded)
            net = check("recipe.model", lambda: build_denoiser(spec))
            for key, cfg in _train_configs(recipe):
                for which, lora in (("student", cfg.student_lora), ("fake", cfg.fake_lora)):
                    if net is not None and lora is not None:
                        check(f"recipe.{key}.{which}_lora", lambda: targeted(net, lora.targets))
        if recipe.train.student is not None:
            check("recipe.train.student", lambda: build_denoiser(s_spec))
    for key, cfg in _train_configs(recipe):
        if cfg.student is not None and cfg.student_lora is not None:
            problems.append(f"recipe.{key}: student_lora puts adapters on the teacher's network, student names a "
                            "network of its own trained from scratch; keep one of them")
    check("recipe.train.divergence", lambda: build_divergence(recipe, sigma_data=0.5))
    if engine.checkpoint.dir is not None:  # training snapshots go there: refused now, not at the first snapshot
        check("recipe.engine.checkpoint.dir", lambda: check_destination(engine.checkpoint.dir, folder=True))
    for name, base in recipe.baselines.items():
        key = f"baselines.{name}"
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            problems.append(f"recipe.{key}: a baseline's name names its checkpoint and snapshot folder; use letters, "
                            f"digits, '-' and '_'")
        check(f"recipe.{key}.train.divergence", lambda: build_divergence(recipe, sigma_data=0.5, cfg=base.train))
        if spec is not None:
            b_specs[name] = student_spec(recipe, spec, base.train)
            if base.train.student is not None:
                check(f"recipe.{key}.train.student", lambda: build_denoiser(b_specs[name]))
    unfit = None  # the metric does not apply to this data
    if train_set is not None:
        metric = recipe.eval.metric
        unfit = data_problem(metric.name, train_set.kind)
        refusal = unfit or quadratic_cost_problem(metric.name, metric.options, train_set.kind, recipe.eval.num_samples)
        if refusal:
            problems.append(f"recipe.eval.metric: {refusal}")
    plan = Plan(recipe, source, train_set, test_set, spec, s_spec, b_specs, device)
    if check_metric is None:
        check_metric = os.environ.get("RANK", "0") == "0"
    if check_metric and unfit is None:  # a metric that does not apply is not built as well
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


def _train_configs(recipe: Recipe) -> list:
    """``(dotted key, TrainConfig)`` of the student's distillation and each baseline's."""
    return [("train", recipe.train), *[(f"baselines.{n}.train", b.train) for n, b in recipe.baselines.items()]]


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
