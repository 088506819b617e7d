"""The evaluation engine: every number of in-run evaluation, ``dpdm eval``, ``dpdm recover`` and the training sample
grids comes from here.

- ``Collector``: one set of items as they arrive on a rank. Feature metrics (``fid``, ``fd-<dataset>``) stream: each
  rank featurises its items and only Σx, Σxxᵀ, n are summed over ranks; data metrics (energy, sliced Wasserstein)
  gather the items, in index order. The first ``keep`` items are kept for grids.
- ``score``: one (model, sampler, σ list) generation of ``num`` items scored by a metric, sharded over ranks.
- ``sweep`` / ``nfe_sweep`` / ``fid_at_steps``: the paper's Table 4 (a model at several step counts or NFEs).
- ``best_one_step``: the one-step σ_max search, chosen on validation data and reported on the reference.
- ``cross_use``: Section 5.2, Figure 6 (each model with each sampling at one NFE).
- ``recovery`` / ``distance``: Section 5.1, Table 1 (noise real items, denoise once; ``recovery.py`` holds the
  protocols); ``real_data_noise``: the estimator's floor on real data.

Items carry their own seeds (``generation``), so every number is reproducible and independent of the batch size and
the number of processes. Real data is read item by item (``references``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from ..datasets import from_model, to_model
from ..errors import DpdmError
from ..progress import Progress
from ..samplers import steps_for_nfe
from ..train.distributed import Dist, derive_seed
from . import generation
from .fid import StatsAccumulator
from .generation import generate, sampler_and_schedule  # noqa: F401  (0.1's evaluate.generate, scoring's helper)
from .references import (  # noqa: F401  (0.1's scoring names)
    Items,
    TensorItems,
    as_items,
    cached_dataset_stats,
    dataset_key,
    dataset_stats,
)


def is_feature_metric(metric) -> bool:
    """Whether ``metric`` compares detector statistics (``fid``, ``fd-<dataset>``), built by ``fid.feature_metric``."""
    return getattr(metric, "detector", None) is not None and hasattr(metric, "prepare")


class Collector:
    """One set of items as they arrive on this rank: a feature metric's Σx, Σxxᵀ, n (no item is held), or a data
    metric's items (gathered over ranks in position order by ``value``); and the first ``keep`` items (all when
    None) for grids. ``add(positions, x)``: model-space items at their positions in the set (any float dtype: a
    feature metric converts the sampler state itself to uint8, as EDM saves its images)."""

    def __init__(self, metric=None, *, keep: int | None = 0, dist: Dist | None = None, detector=None):
        self.detector = metric.detector if is_feature_metric(metric) else detector
        self.keep, self.dist = keep, dist or Dist()
        self.acc, self.parts, self.kept = StatsAccumulator(), [], []

    def add(self, positions, x: torch.Tensor) -> None:
        positions = torch.as_tensor(positions, dtype=torch.int64)
        if self.detector is not None:
            self.acc.update(self.detector(from_model(x, "image")))
            chosen = positions < (self.keep if self.keep is not None else math.inf)
            if chosen.any():
                self.kept.append((positions[chosen], x[chosen].float()))
        else:
            self.parts.append((positions, x.float()))

    def _gathered(self, parts) -> torch.Tensor:
        parts = [p for rank_parts in self.dist.all_gather_object(parts) for p in rank_parts]
        if not parts:
            return torch.empty(0)
        positions = torch.cat([p for p, _ in parts])
        x = torch.cat([v for _, v in parts])
        order = torch.argsort(positions)
        return x if torch.equal(order, torch.arange(len(order))) else x[order]

    def value(self):
        """What the metric compares: ``FeatureStats`` of all ranks' items, or all items (every rank the same)."""
        if self.detector is not None:
            return generation.all_reduce_stats(self.acc, self.dist, self.detector.feature_dim)
        self.data = self._gathered(self.parts)
        return self.data

    def first(self) -> torch.Tensor:
        """The kept items of every rank, in position order (call after ``value``)."""
        if self.detector is None:
            return self.data if self.keep is None else self.data[:self.keep].clone()
        return self._gathered(self.kept)


def prepare(metric, reference, *, batch_size: int = 1024):
    """What ``metric`` compares with: items (``references.Items``/``TensorItems``) are streamed through a
    ``Collector`` (a feature metric's statistics, or a data metric's tensor); a tensor is featurised once by a
    feature metric (``metric.prepare``); anything else (statistics, prepared data) is returned as it is."""
    if reference is None:  # a metric that needs no reference (a sample grid)
        return None
    if hasattr(reference, "batches"):
        collect = Collector(metric)
        seen = 0
        for _, x, _ in reference.batches(batch_size):
            collect.add(range(seen, seen + len(x)), x)
            seen += len(x)
        return collect.value()
    fn = getattr(metric, "prepare", None)
    return fn(reference) if fn is not None else reference


prepare_reference = prepare  # 0.1's evaluate.prepare_reference


@torch.no_grad()
def score(model, sample_fn: Callable, sigmas: torch.Tensor, metric, reference, *, num: int, shape, label_dim: int = 0,
          seed: int = 0, batch_size: int = 256, dist: Dist | None = None, progress: Progress | None = None,
          keep: int | None = 64, description: str = "generate", dtype=generation.STATE_DTYPE,
          device=None) -> tuple[float, torch.Tensor]:
    """``(metric value, the first keep items)`` of ``num`` items generated by ``sample_fn`` over ``sigmas``, each
    rank generating its shard on ``device`` (default ``dist.device``). Every rank returns the same value.

    ``reference``: prepared (``prepare``), raw data, or items (``references.Items``, prepared here). ``dtype``: the
    sampler state, float64 by default as in EDM's ``generate.py`` (``generation.generate_items``). ``keep``: None
    keeps every item.
    """
    reference = prepare(metric, reference)
    collect = generate_into(Collector(metric, keep=keep, dist=dist), model, sample_fn, sigmas, num, shape,
                            label_dim=label_dim, seed=seed, batch_size=batch_size, progress=progress,
                            description=description, dtype=dtype, device=device)
    value = float(metric(collect.value(), reference))
    return value, collect.first()


@torch.no_grad()
def generate_into(collect: Collector, model, sample_fn: Callable, sigmas: torch.Tensor, num: int, shape, *,
                  label_dim: int = 0, seed: int = 0, batch_size: int = 256, progress: Progress | None = None,
                  description: str = "generate", dtype=generation.STATE_DTYPE, device=None,
                  on_batch: Callable | None = None) -> Collector:
    """Generate this rank's shard of items 0 … num − 1 (``generation.generate_items``) into ``collect``; a feature
    metric sees the sampler state itself (float64 by default, as EDM's images are), ``on_batch(indices, x)`` every
    batch in float32. Returns ``collect``."""
    dist, progress = collect.dist, progress or Progress()
    mine = generation.shard(num, dist.rank, dist.world_size)
    out_dtype = None if collect.detector is not None else torch.float32
    with progress.task(description, len(mine)) as bar:
        for idx, x in generation.generate_items(model, sample_fn, sigmas, mine, shape, label_dim=label_dim, seed=seed,
                                                batch_size=batch_size, dtype=dtype, out_dtype=out_dtype,
                                                device=dist.device if device is None else device):
            collect.add(idx, x)
            if on_batch is not None:
                on_batch(idx, x.float())
            bar.advance(len(idx))
    return collect


def sample_feature_stats(model, sample_fn: Callable, sigmas: torch.Tensor, num: int, shape, detector, *,
                         dist: Dist | None = None, **options):
    """``detector``'s statistics of ``num`` generated images (items 0 … num − 1) over all ranks of ``dist``: each
    rank featurises its shard, Σx, Σxxᵀ and n are summed over ranks in float64. ``options``: ``generate_into``'s."""
    return generate_into(Collector(detector=detector, dist=dist), model, sample_fn, sigmas, num, shape,
                         **options).value()


def sweep(model, metric, reference, *, sampler, schedule, steps=None, nfes=None, num: int, shape, label_dim: int = 0,
          seed: int = 0, batch_size: int = 256, dist: Dist | None = None, progress: Progress | None = None,
          keep: int | None = None, device=None, on_step: Callable | None = None,
          description: str = "") -> tuple[dict, dict]:
    """One model and sampler at several step counts (``steps``) or exact NFEs (``nfes``; those the sampler cannot
    reach, e.g. Heun's even NFEs, are skipped): ``({nfe: value}, {nfe: first keep items})``. ``sampler`` and
    ``schedule``: components (their options bound), the schedule clamped to ``model``'s σ range
    (``generation.schedule_for``). ``on_step()`` after each point."""
    sample_fn, nfe_of, sigmas_of = sampler_and_schedule(sampler, schedule, model)
    name = generation.component_parts(sampler)[0]
    reference = prepare(metric, reference)
    points = [(n, nfe_of(n)) for n in steps] if steps is not None else \
        [(steps_for_nfe(nfe_of, nfe), nfe) for nfe in nfes]
    values, grids = {}, {}
    for n, nfe in points:
        if n is not None:
            values[nfe], grids[nfe] = score(model, sample_fn, sigmas_of(n), metric, reference, num=num, shape=shape,
                                            label_dim=label_dim, seed=seed, batch_size=batch_size, dist=dist,
                                            progress=progress, keep=keep, device=device,
                                            description=f"{description or name}, NFE {nfe}")
        if on_step:
            on_step()
    return values, grids


def sweep_student(student, metric, reference, *, sampler, schedule, steps: list[int], **kwargs) -> tuple[dict, dict]:
    """``sweep`` at step counts (0.1's in-run student sweep)."""
    return sweep(student, metric, reference, sampler=sampler, schedule=schedule, steps=steps, **kwargs)


def sweep_teacher(teacher, metric, reference, *, samplers: list, schedule, nfes: list[int],
                  **kwargs) -> tuple[dict, dict]:
    """``sweep`` at exact NFEs for each sampler: ``({sampler: {nfe: value}}, {sampler: {nfe: items}})``."""
    values, grids = {}, {}
    for spec in samplers:
        name = generation.component_parts(spec)[0]
        values[name], grids[name] = sweep(teacher, metric, reference, sampler=spec, schedule=schedule, nfes=nfes,
                                          **kwargs)
    return values, grids


def nfe_sweep(student, teacher, *, metric, reference, student_sampler, student_schedule, student_nfe: list[int],
              teacher_samplers: list, teacher_schedule, teacher_nfe: list[int], undistilled: bool = True,
              **kwargs) -> tuple[dict, dict]:
    """The paper's Table 4: ``({"student"|"undistilled"|"teacher": {sampler: {nfe: value}}}, same shape of first
    items)``. ``undistilled`` (on by default): the teacher sampled with exactly the student's sampler and schedule at
    the student's NFEs, the baseline that separates the effect of distillation from that of the schedule
    (``report.checks``' ``student_vs_undistilled``). The student is skipped when None. ``kwargs``: ``sweep``'s."""
    kwargs.setdefault("keep", 64)
    reference = prepare(metric, reference)  # items are read once for every point
    roles = ([("student", student)] if student is not None else []) + \
        ([("undistilled", teacher)] if undistilled else [])
    values, grids = {"student": {}, "teacher": {}}, {"student": {}, "teacher": {}}
    for role, model in roles:
        name = generation.component_parts(student_sampler)[0]
        values.setdefault(role, {})[name], grids.setdefault(role, {})[name] = sweep(
            model, metric, reference, sampler=student_sampler, schedule=student_schedule, nfes=student_nfe,
            description=f"{role} {name}", **kwargs)
    values["teacher"], grids["teacher"] = sweep_teacher(teacher, metric, reference, samplers=teacher_samplers,
                                                        schedule=teacher_schedule, nfes=teacher_nfe, **kwargs)
    return values, grids


def fid_at_steps(model, *, sampler, schedule, steps: list[int], metric, reference, num: int, shape,
                 label_dim: int = 0, seed: int = 0, batch_size: int = 256, dist: Dist | None = None,
                 progress: Progress | None = None, keep: int = 64) -> tuple[dict, dict]:
    """``dpdm eval fid``: ``({steps: {"nfe", "value", "seconds", "sigmas"}}, {steps: first items})`` for one model
    and sampler; ``sigmas`` is the σ list sampled, clamped to the model's σ range (``generation.schedule_for``)."""
    sample_fn, nfe_of, sigmas_of = sampler_and_schedule(sampler, schedule, model)
    name = generation.component_parts(sampler)[0]
    reference = prepare(metric, reference)
    results, grids = {}, {}
    for n in steps:
        sigmas = sigmas_of(n)
        t0 = time.perf_counter()
        value, grids[n] = score(model, sample_fn, sigmas, metric, reference, num=num, shape=shape,
                                label_dim=label_dim, seed=seed, batch_size=batch_size, dist=dist, progress=progress,
                                keep=keep, description=f"{name}, {n} steps")
        results[n] = {"nfe": nfe_of(n), "value": value, "seconds": time.perf_counter() - t0,
                      "sigmas": [float(s) for s in sigmas]}
    return results, grids


def best_one_step(student, metric, validation, reference, *, sampler, schedule, sigma_maxes: list[float], num: int,
                  shape, label_dim: int = 0, seed: int = 0, keep: int | None = None, **kwargs) -> dict:
    """One-step sampling from each candidate σ_max (seed + 1); the best is chosen on ``validation`` data and
    reported on ``reference`` data (seed), so the choice does not flatter the reported number. ``samples``: the
    first ``keep`` of the reported set. ``kwargs``: ``score``'s (batch_size, dist, device, ...)."""
    sample_fn, _, sigmas_of = sampler_and_schedule(sampler, schedule, student)
    validation, reference = prepare(metric, validation), prepare(metric, reference)
    common = dict(num=num, shape=shape, label_dim=label_dim, **kwargs)
    scores = {smax: score(student, sample_fn, sigmas_of(1, sigma_max=smax), metric, validation, seed=seed + 1,
                          keep=0, **common)[0] for smax in sigma_maxes}
    best = min(scores, key=lambda s: scores[s] if math.isfinite(scores[s]) else math.inf)
    value, samples = score(student, sample_fn, sigmas_of(1, sigma_max=best), metric, reference, seed=seed, keep=keep,
                           **common)
    return {"validation": scores, "best_sigma_max": best, "value": value, "samples": samples}


def reachable_steps(nfe_of: Callable, nfe: int) -> tuple[int, int] | None:
    """``(steps, NFE)`` for the largest NFE ≤ ``nfe`` that a sampler reaches exactly (Heun: odd NFEs only, so 7
    gives 4 steps and 8 gives 4 steps at NFE 7), or None when it reaches none."""
    for target in range(int(nfe), 0, -1):
        n = steps_for_nfe(nfe_of, target)
        if n is not None:
            return n, target
    return None


def cross_samplings(recipe) -> dict:
    """Figure 6's two samplings: ``{"dpdm": (the dpdm sampler, the recipe's student schedule), "heun": (Heun, the
    Karras schedule: the recipe's teacher schedule when it is karras)}``."""
    cfg = recipe.eval
    dpdm_sampler = cfg.student_sampler.as_dict() if cfg.student_sampler.name == "dpdm" else {"name": "dpdm"}
    karras = cfg.teacher_schedule.as_dict() if cfg.teacher_schedule.name == "karras" else {"name": "karras"}
    return {"dpdm": (dpdm_sampler, cfg.student_schedule.as_dict()), "heun": ({"name": "heun"}, karras)}


def cross_use(student, teacher, *, metric, reference, samplers: dict, nfe: int, num: int, shape, label_dim: int = 0,
              seed: int = 0, keep: int | None = 64, **kwargs) -> tuple[dict, dict]:
    """The DPDM paper's cross-use of models and samplers (Section 5.2, Figure 6): each model (student, teacher) with
    each sampling ``samplers[column] = (sampler spec, schedule spec)`` at the largest NFE ≤ ``nfe`` that sampler
    reaches. Returns ``({model: {column: {"steps", "nfe", "value", "sigmas"}}}, {model: {column: first items}})``;
    every cell draws the same per-item seeds. ``kwargs``: ``score``'s (batch_size, dist, progress, device)."""
    cells: dict = {"student": {}, "teacher": {}}
    grids: dict = {"student": {}, "teacher": {}}
    reference = prepare(metric, reference)
    for model_name, model in (("student", student), ("teacher", teacher)):
        for column, (sampler, schedule) in samplers.items():
            sample_fn, nfe_of, sigmas_of = sampler_and_schedule(sampler, schedule)
            name = generation.component_parts(sampler)[0]
            reached = reachable_steps(nfe_of, nfe)
            if reached is None:
                raise DpdmError(f"--nfe {nfe}: the {name} sampler cannot take {nfe} or fewer evaluations")
            n, actual = reached
            sigmas = sigmas_of(n)
            value, grids[model_name][column] = score(
                model, sample_fn, sigmas, metric, reference, num=num, shape=shape, label_dim=label_dim, seed=seed,
                keep=keep, description=f"{model_name}, {name} sampler, NFE {actual}", **kwargs)
            cells[model_name][column] = {"steps": n, "nfe": actual, "value": value,
                                         "sigmas": [float(s) for s in sigmas]}
    return cells, grids


@torch.no_grad()
def distance(metric, items, reference, *, batch_size: int = 4096) -> float:
    """The metric of real ``items`` themselves against ``reference``: the floor of the recovery table."""
    return float(metric(prepare(metric, as_items(items), batch_size=batch_size), prepare(metric, reference)))


@torch.no_grad()
def recovery(student, teacher, metric, items, labels, sigmas: list[float], reference, *, seed: int = 0, device="cpu",
             batch_size: int = 4096, keep: int | None = None) -> tuple[dict, dict]:
    """Section 5.1: for each σ noise ``items`` (``Items``, or a model-space tensor with ``labels``), denoise once with
    each model (the same noise for both: ``generation.noise_seeds``), and measure each set's distance to
    ``reference`` (prepared or raw data).

    Returns ``({σ: {"noisy", "teacher", "student"}}, {σ: {"noisy", "teacher", "student"}})``: the values, and the
    first ``keep`` items of each set (all when None) for figures.
    """
    items = as_items(items, labels)
    reference = prepare(metric, reference)
    table, examples = {}, {}
    for sigma in sigmas:
        sets = {k: Collector(metric, keep=keep) for k in ("noisy", "teacher", "student")}
        seen = 0
        for idx, x0, y in items.batches(batch_size):
            x0 = x0.to(device)
            y = None if y is None else y.to(device)
            gens = generation.ItemGenerators(generation.noise_seeds(seed, sigma, idx), device=device)
            noisy = x0 + float(sigma) * gens.randn(tuple(x0.shape[1:]), dtype=x0.dtype)
            s = torch.full((len(x0),), float(sigma), device=device)
            outs = {"noisy": noisy, "teacher": teacher(noisy, s, class_labels=y),
                    "student": student(noisy, s, class_labels=y)}
            for k, v in outs.items():
                sets[k].add(range(seen, seen + len(x0)), v.float().cpu())
            seen += len(x0)
        table[sigma] = {k: float(metric(c.value(), reference)) for k, c in sets.items()}
        examples[sigma] = {k: c.first() for k, c in sets.items()}
    return table, examples


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
        a, b = (TensorItems(to_model(train_set.sample(n, g))) for _ in range(2))
    else:
        n = min(num, len(train_set) // 2)
        perm = torch.randperm(len(train_set), generator=g)
        a, b = Items(train_set, sorted(perm[:n].tolist())), Items(train_set, sorted(perm[n:2 * n].tolist()))
    reference = prepare(metric, reference)
    va, vb = distance(metric, a, reference), distance(metric, b, reference)
    return {"num": n, "a": va, "b": vb, "mean": (va + vb) / 2, "spread": abs(va - vb)}
