"""Evaluation: NFE sweeps of student and teacher samplers (the DPDM paper's Table 4), the one-step σ_max search, and
the recovery experiment of Section 5.1 (Table 1; ``recovery.py``, re-exported here)."""

from __future__ import annotations

import math
from typing import Callable

import torch

from . import generation
from .. import schedules
from . import recovery as rec
from ..datasets import to_model
from ..train.distributed import derive_seed
from ..plugins.registry import build
from ..utils import accepts
from .recovery import recovery  # noqa: F401  (Section 5.1, part of this module's API)
from ..samplers import steps_for_nfe


def generate(denoiser, sampler, sigmas: torch.Tensor, num: int, shape, *, label_dim: int = 0, seed: int = 0,
             batch_size: int = 1024, device="cpu", dtype=generation.STATE_DTYPE) -> torch.Tensor:
    """``num`` samples in model space (float32): item i starts from σ_0·ε_i with its own generator
    (``generation``), so the samples do not depend on ``batch_size``. The sampler state is ``dtype``, float64
    by default as in EDM's ``generate.py`` (``generation.generate_items``)."""
    return generation.generate(denoiser, sampler, sigmas, num, shape, label_dim=label_dim, seed=seed,
                               batch_size=batch_size, device=device, dtype=dtype)


def prepare_reference(metric, reference):
    """What ``metric`` compares with: feature metrics (``fid``, ``fd-<dataset>``) featurise the reference once
    (``metric.prepare``), the others take the data as it is."""
    prepare = getattr(metric, "prepare", None)
    return prepare(reference) if prepare is not None else reference


def _parts(spec) -> tuple[str, dict]:
    """``(name, options)`` of a component: a recipe ``Component`` or a ``{"name": ..., **options}`` dict."""
    if isinstance(spec, dict):
        options = dict(spec)
        return options.pop("name"), options
    return spec.name, dict(spec.options)


def _schedule(spec, denoiser=None) -> Callable:
    """``(n, **overrides) -> sigmas`` from a schedule component (``_parts``); with ``denoiser``, clamped to its
    σ range (``schedule_for``)."""
    fn = build("schedule", *_parts(spec))
    if denoiser is None:
        return fn
    return schedules.clamp_to_network(fn, denoiser,
                                      takes_range=accepts(fn.func, "sigma_min", "sigma_max", var_keyword=True))


def schedule_for(denoiser, spec) -> Callable:
    """The schedule every route samples ``denoiser`` with: ``spec`` (a schedule component or ``{"name": ..., **options}``)
    with its ends clamped to the network's σ range as EDM's ``generate.py`` does (``schedules.clamp_to_network``;
    no clamp for a denoiser that declares no ``sigma_min``/``sigma_max``). Returns ``(n, **overrides) -> sigmas``."""
    return _schedule(spec, denoiser)


def sigmas_for(denoiser, spec: dict, n: int, **overrides) -> torch.Tensor:
    """The ``n``-step σ list (float64, ending in 0) of ``schedule_for(denoiser, spec)``: e.g. for ``dpdm sample``."""
    return schedule_for(denoiser, spec)(n, **overrides)


def _sampler(spec) -> tuple[str, Callable, Callable]:
    """``(name, sampler with the component's options bound, nfe)`` (``registry.build``)."""
    sampler = build("sampler", *_parts(spec))
    return sampler.name, sampler, sampler.nfe


def sweep_student(student, metric, reference, *, sampler: dict, schedule: dict, steps: list[int], num: int, shape,
                  label_dim, seed, device, on_step=None, keep: int | None = None,
                  batch_size: int = 1024) -> tuple[dict, dict]:
    """Metric per NFE for the student; returns ``({nfe: value}, {nfe: samples})``, the samples cut to the first
    ``keep`` (all when None: what figures need, not 10k images per point)."""
    _, sample_fn, nfe_of = _sampler(sampler)
    sched = schedule_for(student, schedule)
    reference = prepare_reference(metric, reference)
    values, samples = {}, {}
    for n in steps:
        x = generate(student, sample_fn, sched(n), num, shape, label_dim=label_dim, seed=seed, device=device,
                     batch_size=batch_size)
        values[nfe_of(n)], samples[nfe_of(n)] = metric(x, reference), x[:keep]
        if on_step:
            on_step()
    return values, samples


def sweep_teacher(teacher, metric, reference, *, samplers: list[dict], schedule: dict, nfes: list[int], num: int,
                  shape, label_dim, seed, device, on_step=None, keep: int | None = None,
                  batch_size: int = 1024) -> tuple[dict, dict]:
    """Metric per (sampler, NFE) for the teacher; NFEs a sampler cannot hit exactly are skipped
    (Heun's NFE is always odd). Samples are cut to the first ``keep`` as in ``sweep_student``."""
    sched = schedule_for(teacher, schedule)
    reference = prepare_reference(metric, reference)
    values: dict = {}
    samples: dict = {}
    for spec in samplers:
        name, sample_fn, nfe_of = _sampler(spec)
        values[name], samples[name] = {}, {}
        for nfe in nfes:
            n = steps_for_nfe(nfe_of, nfe)
            if n is not None:
                x = generate(teacher, sample_fn, sched(n), num, shape, label_dim=label_dim, seed=seed, device=device,
                     batch_size=batch_size)
                values[name][nfe], samples[name][nfe] = metric(x, reference), x[:keep]
            if on_step:
                on_step()
    return values, samples


def best_one_step(student, metric, validation, reference, *, sampler: dict, schedule: dict,
                  sigma_maxes: list[float], num: int, shape, label_dim, seed, device, keep: int | None = None,
                  batch_size: int = 1024) -> dict:
    """One-step sampling from each candidate σ_max; the best is chosen on ``validation`` data and
    reported on ``reference`` data (so the choice does not flatter the reported number). ``samples``: the first
    ``keep`` of the reported set."""
    _, sample_fn, _ = _sampler(sampler)
    sched = schedule_for(student, schedule)
    validation, reference = prepare_reference(metric, validation), prepare_reference(metric, reference)
    scores = {}
    for smax in sigma_maxes:
        x = generate(student, sample_fn, sched(1, sigma_max=smax), num, shape, label_dim=label_dim, seed=seed + 1,
                     device=device, batch_size=batch_size)
        scores[smax] = metric(x, validation)
    best = min(scores, key=lambda s: scores[s] if math.isfinite(scores[s]) else math.inf)
    x = generate(student, sample_fn, sched(1, sigma_max=best), num, shape, label_dim=label_dim, seed=seed,
                 device=device, batch_size=batch_size)
    return {"validation": scores, "best_sigma_max": best, "value": metric(x, reference), "samples": x[:keep]}


REAL_STREAM = 7  # the two disjoint real sets of ``real_data_noise`` derive from (seed, REAL_STREAM)


def real_data_noise(metric, train_set, reference, *, num: int, seed: int) -> dict:
    """The estimator's noise measured on real data: two disjoint random sets of ``num`` real items (the training
    split, read item by item; fresh samples for data that can draw them) scored against ``reference`` exactly as
    samples are. Their values are what a perfect model scores at this sample size (the floor: FD-type metrics are
    biased upwards for finite sets), ``spread`` = |a − b| what the estimator moves by between two equally good sets.
    Returns ``{"num", "a", "b", "mean", "spread"}``."""
    g = torch.Generator().manual_seed(derive_seed(seed, REAL_STREAM))
    if hasattr(train_set, "sample"):
        n = num
        a, b = (rec.TensorItems(to_model(train_set.sample(n, g))) for _ in range(2))
    else:
        n = min(num, len(train_set) // 2)
        perm = torch.randperm(len(train_set), generator=g)
        a, b = rec.Items(train_set, sorted(perm[:n].tolist())), rec.Items(train_set, sorted(perm[n:2 * n].tolist()))
    va, vb = rec.distance(metric, a, reference), rec.distance(metric, b, reference)
    return {"num": n, "a": va, "b": vb, "mean": (va + vb) / 2, "spread": abs(va - vb)}
