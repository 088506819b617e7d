"""In-run evaluation: the NFE sweeps (Table 4), the one-step σ_max search, the estimator's noise, the cross-use
of Figure 6 and recovery (Section 5.1); writes the figures and returns the report's numbers."""

from __future__ import annotations

import importlib.util
import logging
import time

from ..config.recipe import Recipe
from ..eval import protocols as ev
from ..eval import recovery as rec
from ..eval.references import cached_dataset_stats, dataset_key, first, reference_sets
from ..eval.report import NFE_FACTOR, best_teacher
from ..progress import Progress
from .preflight import Plan
from .rundir import RunDir

log = logging.getLogger(__name__)

references = reference_sets  # 0.1's run.references: ``(reference, validation)`` items, read item by item


def recovery_setup(recipe: Recipe, protocol: str, train_set, test_set, metric, num: int, seed: int, *,
                   validation=None, progress: Progress | None = None):
    """What the recovery experiment (Section 5.1) noises and what it compares with, for ``protocol``:
    ``(items, prepared reference, reference description, note or None)`` (``recovery.select`` and
    ``recovery.training_reference``; ``heldout`` compares with ``reference_sets``' validation data, which may be
    passed in already prepared)."""
    items, note = rec.select(protocol, train_set, test_set, num, seed)
    if protocol == "paper":
        reference, name = rec.training_reference(recipe, train_set, metric, num_samples=recipe.eval.num_samples,
                                                 exclude=items.indices, progress=progress)
    else:
        if validation is None:
            _, validation = reference_sets(recipe, train_set, test_set, recipe.eval.num_samples)
        reference = validation
        if hasattr(test_set, "sample"):
            name = f"{recipe.data.name} fresh samples ({recipe.eval.num_samples})"
        else:
            name = f"{recipe.data.name} training split, {min(len(train_set), recipe.eval.num_samples)} random items"
    return items, ev.prepare(metric, reference), name, note


def evaluate(plan: Plan, teacher, student, device, progress: Progress, run_dir: RunDir,
             baselines: dict | None = None) -> dict:
    """NFE sweeps, one-step σ_max search and recovery; writes figures, returns the report dict.

    The sweeps: the student with its sampler and schedule, the teacher with each teacher sampler, and the
    undistilled teacher with exactly the student's sampler and schedule at the student's step counts (the
    baseline of Section 5.2: it separates what distillation does from what the sampler does)."""
    recipe, train_set, test_set = plan.recipe, plan.train_set, plan.test_set
    cfg = recipe.eval
    metric_fn = plan.metric(progress)  # built once per process (preflight may have built it already)
    reference_items, validation = reference_sets(recipe, train_set, test_set, cfg.num_samples)
    if ev.is_feature_metric(metric_fn) and cfg.ref:  # featurise each reference once
        reference = plan.ref_stats()
    elif ev.is_feature_metric(metric_fn):  # the whole test split's statistics, streamed and cached on disk
        reference = cached_dataset_stats(dataset_key(recipe.data, "test"), test_set, metric_fn.detector,
                                         progress=progress)
    else:  # a data metric compares tensors: at most eval.num_samples items of the test split
        reference = ev.prepare(metric_fn, reference_items, batch_size=cfg.batch_size)
        if not hasattr(test_set, "sample") and len(reference_items) < len(test_set):  # toy data: fresh samples
            log.info("evaluate: %s compares with %d random items of the %d-item test split (eval.num_samples)",
                     cfg.metric.name, len(reference_items), len(test_set))
    validation = ev.prepare(metric_fn, validation, batch_size=cfg.batch_size)
    shape, label_dim, kind = tuple(test_set.shape), test_set.label_dim, test_set.kind
    common = dict(num=cfg.num_samples, shape=shape, label_dim=label_dim, seed=recipe.seed, device=device,
                  batch_size=cfg.batch_size)
    keep = cfg.figure_samples if kind == "image" else None  # the figures' share: not num_samples images per point
    student_sampler, student_schedule = cfg.student_sampler, cfg.student_schedule
    teacher_samplers, teacher_schedule = cfg.teacher_samplers, cfg.teacher_schedule
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
            schedule = {**student_schedule.as_dict(), **({"sigma_max": smax} if smax is not None else {})}
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
        cells, cross_grids = ev.cross_use(student, teacher, metric=metric_fn, reference=reference,
                                          samplers=ev.cross_samplings(recipe), nfe=cfg.cross_nfe,
                                          num=cfg.num_samples, shape=shape, label_dim=label_dim, seed=recipe.seed,
                                          batch_size=cfg.batch_size, device=device,
                                          keep=keep if keep is not None else cfg.num_samples)
        cross = {"nfe": cfg.cross_nfe, "cells": cells}
        timings["cross_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    protocol = cfg.recovery_protocol
    items, rec_reference, rec_ref_name, note = recovery_setup(
        recipe, protocol, train_set, test_set, metric_fn, cfg.recovery_num, recipe.seed,
        validation=validation if protocol == "heldout" else None, progress=progress)
    if note:
        log.info("recovery: %s", note.replace("--num", "eval.recovery_num"))
    shown = min(8, cfg.figure_samples) if kind == "image" else None
    recovered, rec_examples = ev.recovery(student, teacher, metric_fn, items, None, cfg.recovery_sigmas,
                                          rec_reference, seed=recipe.seed, device=device, keep=shown,
                                          batch_size=cfg.batch_size)
    floor = ev.distance(metric_fn, items, rec_reference)
    clean = first(items, shown if shown is not None else len(items))
    timings["recovery_s"] = time.perf_counter() - t0

    figs = run_dir.figures
    figs.mkdir(parents=True, exist_ok=True)
    sweep = {"student": {cfg.student_sampler.name: {str(k): v for k, v in s_vals.items()}},
             "undistilled": {cfg.student_sampler.name: {str(k): v for k, v in u_vals.items()}},
             "teacher": {name: {str(k): v for k, v in vals.items()} for name, vals in t_vals.items()}}
    for name, vals in b_vals.items():  # baselines: their own role, sampled like the student (report.sweep_roles)
        sweep[name] = {cfg.student_sampler.name: {str(k): v for k, v in vals.items()}}
    data_row = first(reference_items, cfg.figure_samples if kind == "image" else cfg.num_samples)
    _figures(figs, kind, cfg, s_samples, t_samples, u_samples, one, data_row, clean, rec_examples, sweep,
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
            if spec.name in wanted:
                vals, _ = ev.sweep_teacher(teacher, metric_fn, reference, samplers=[spec], schedule=teacher_schedule,
                                           nfes=sorted(wanted[spec.name]), keep=0, **at)
                for n, v in vals[spec.name].items():
                    out["teacher"][spec.name][str(n)].append(v)
    spread = max((max(v) - min(v) for by in out.values() for vals in by.values() for v in vals.values()),
                 default=0.0)
    return {"seeds": seeds, "sweep": out, "seed_spread": spread}


def _figures(figs, kind, cfg, s_samples, t_samples, u_samples, one, reference, clean, rec_examples, sweep, metric,
             progress, *, noise: dict | None = None, cross=None, title: str = ""):
    if importlib.util.find_spec("matplotlib") is None:  # the figures module imports it only when drawing
        log.warning("matplotlib is not installed; skipping figures (pip install matplotlib)")
        return
    from ..eval import figures

    n = cfg.figure_samples if kind == "image" else cfg.num_samples
    prefix = f"{title}: " if title else ""
    student = cfg.student_sampler.name

    def panel_row(samples: dict, role: str, sampler: str, best=None) -> tuple[dict, dict]:
        """The real data, then one panel per NFE; each panel coloured like its model/sampler everywhere."""
        panels = {"data": reference[:n]}
        panels.update({f"NFE {k}" + (" (best)" if k == best else ""): v[:n] for k, v in samples.items()})
        return panels, {label: figures.colour("data" if label == "data" else role, sampler) for label in panels}

    panels, colours = panel_row(s_samples, "student", student)
    panels[f"NFE 1, σmax={one['best_sigma_max']:g}"] = one["samples"][:n]
    colours[f"NFE 1, σmax={one['best_sigma_max']:g}"] = figures.colour("student", student)
    figures.samples_figure(panels, kind, figs / "samples_student.png", colours=colours,
                           title=f"{prefix}DPDM student ({student} sampler)")
    for name, by_nfe in t_samples.items():  # the student's step counts, the NFE where this sampler scored best, its top
        scores, top = sweep["teacher"].get(name, {}), max(by_nfe, default=None)
        best = int(min(scores, key=scores.get)) if scores else top
        shown = {k: v for k, v in sorted(by_nfe.items()) if k in s_samples or k in (best, top)}
        panels, colours = panel_row(shown, "teacher", name, best)
        figures.samples_figure(panels, kind, figs / f"samples_teacher_{name}.png", colours=colours,
                               title=f"{prefix}teacher, {name} sampler (best: NFE {best})")
    panels, colours = panel_row(u_samples, "undistilled", student)
    figures.samples_figure(panels, kind, figs / "samples_undistilled.png", colours=colours,
                           title=f"{prefix}undistilled teacher, {student} with the student's schedule")
    floor = noise["real"] if noise else None
    figures.curve_figure(sweep, metric, figs / "nfe_curve.png", floor=floor, title=f"{prefix}{metric} vs NFE")
    m = min(8, cfg.figure_samples) if kind == "image" else len(clean)  # Figure 4: a strip of 8 items per cell
    shown = {s: {k: v[:m] for k, v in ex.items()} for s, ex in rec_examples.items()}
    figures.recovery_figure(clean[:m], shown, kind, figs / "recovery.png",
                            title=f"{prefix}recovery of noised training data (Section 5.1, Figure 4)")
    if cross is not None:
        result, grids = cross
        panels = {model: {c: (f"{model} + {c} sampler, NFE {cell['nfe']}\n{metric} {cell['value']:.4g}",
                              grids[model][c][:n], figures.colour(model, c)) for c, cell in row.items()}
                  for model, row in result["cells"].items()}
        figures.panel_grid(panels, kind, figs / "cross.png",
                           title=f"{prefix}models × samplers at NFE {result['nfe']} (Figure 6)\n"
                                 f"{figures.metric_label(metric)}")
