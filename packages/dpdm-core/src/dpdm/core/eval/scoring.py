"""Scoring samplers against a reference: the work behind ``dpdm eval ref|fid|sweep`` (and usable from Python).

- ``dataset_stats`` / ``cached_dataset_stats``: a detector's feature statistics of a dataset (EDM's
  ``fid.py ref``), split over ranks, cached under ``$DPDM_CACHE/fid-stats/<dataset>--<detector>.npz``.
- ``score``: one (model, sampler, schedule) generation of ``num`` items scored by a metric. Feature metrics
  (``fid``, ``fd-<dataset>``) stream: each rank featurises its shard of the items and only Σx, Σxxᵀ, n are
  summed; other metrics (energy, sliced Wasserstein: vector data) gather the items and compare them whole.
- ``fid_at_steps``: ``dpdm eval fid`` (one model, several step counts, e.g. the paper's 4…8).
- ``nfe_sweep``: ``dpdm eval sweep`` (the paper's Table 4): the student with its sampler at NFE 1…10 and the
  teacher with each sampler at matched NFE (up to 35), the first images of each kept for grids.
- ``cross_use``: ``dpdm eval cross`` (Section 5.2, Figure 6): student and teacher each with the DPDM sampler and
  with the diffusion ODE sampler (Heun) at one NFE.

Items carry their own seeds (``generation``), so every number here is reproducible and independent of the
batch size and the number of processes.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Callable

import torch

from . import evaluate
from . import generation
from ..train.distributed import Dist
from ..errors import DpdmError
from .fid import FeatureStats, StatsAccumulator, load_stats, save_stats, stats_cache_path
from ..progress import Progress
from ..samplers import steps_for_nfe


def is_feature_metric(metric) -> bool:
    """Whether ``metric`` compares detector statistics (``fid``, ``fd-<dataset>``), built by ``fid.feature_metric``."""
    return getattr(metric, "detector", None) is not None and hasattr(metric, "prepare")


def _items(dataset, indices) -> torch.Tensor:
    """The images of ``indices``, read batch by batch (a lazy ZIP is never decoded whole into memory)."""
    if hasattr(dataset, "__getitems__"):
        return dataset.__getitems__(list(indices))[0]
    return torch.stack([dataset[i][0] for i in indices])


def dataset_key(data, split: str) -> str:
    """A name for a recipe's data split in caches, ``<dataset>-<hash of its options>-<split>`` (``data``: the
    recipe's ``data`` component, or anything with ``name`` and ``options``)."""
    options = json.dumps(data.options, sort_keys=True, default=str)
    return f"{data.name}-{hashlib.sha256(options.encode()).hexdigest()[:8]}-{split}"


@torch.no_grad()
def dataset_stats(dataset, detector, *, num: int | None = None, batch_size: int = 250, dist: Dist | None = None,
                  progress: Progress | None = None) -> FeatureStats:
    """Statistics of ``detector`` over the first ``num`` items (default: all) of an image ``dataset``."""
    if getattr(dataset, "kind", "image") != "image":
        raise DpdmError(f"feature statistics need an image dataset; {getattr(dataset, 'name', 'this dataset')} holds "
                        f"vectors (use the energy or sliced-wasserstein metric)")
    dist, progress = dist or Dist(), progress or Progress()
    total = len(dataset) if num is None else min(int(num), len(dataset))
    if num is not None and num > len(dataset):
        progress.log(f"the dataset has {len(dataset)} items; using all of them (asked for {num})")
    mine = list(generation.shard(total, dist.rank, dist.world_size))
    acc = StatsAccumulator()
    with progress.task("reference features", len(mine)) as bar:
        for start in range(0, len(mine), batch_size):
            idx = mine[start:start + batch_size]
            images = _items(dataset, idx)
            if images.dtype != torch.uint8:
                raise DpdmError(f"feature statistics need uint8 images, the dataset gives {images.dtype}")
            acc.update(detector(images))
            bar.advance(len(idx))
    return generation.all_reduce_stats(acc, dist, detector.feature_dim)


def cached_dataset_stats(dataset_key: str, dataset, detector, *, num: int | None = None, batch_size: int = 250,
                         dist: Dist | None = None, progress: Progress | None = None) -> FeatureStats:
    """``dataset_stats``, read from / written to ``stats_cache_path(dataset_key + num, detector.key)``."""
    dist, progress = dist or Dist(), progress or Progress()
    total = len(dataset) if num is None else min(int(num), len(dataset))
    path = stats_cache_path(f"{dataset_key}-n{total}", detector.key)
    if path.exists():
        progress.log(f"reference statistics: {path} (cached)")
        return load_stats(str(path))
    stats = dataset_stats(dataset, detector, num=num, batch_size=batch_size, dist=dist, progress=progress)
    if dist.is_main:
        save_stats(str(path), stats, detector=detector.key)
        progress.log(f"reference statistics cached in {path}")
    dist.barrier()
    return stats


def sampler_and_schedule(sampler: dict, schedule: dict, model=None) -> tuple[Callable, Callable, Callable]:
    """``(sample_fn, nfe_of, sigmas_of)`` from ``{"name": ..., **options}`` specs of a sampler and a schedule;
    with ``model``, ``sigmas_of`` is clamped to its σ range (``evaluate.schedule_for``, as EDM does)."""
    _, sample_fn, nfe_of = evaluate._sampler(sampler)
    return sample_fn, nfe_of, evaluate._schedule(schedule, model)


@torch.no_grad()
def score(model, sample_fn: Callable, sigmas: torch.Tensor, metric, reference, *, num: int, shape, label_dim: int = 0,
          seed: int = 0, batch_size: int = 256, dist: Dist | None = None, progress: Progress | None = None,
          keep: int = 64, description: str = "generate", dtype=generation.STATE_DTYPE) -> tuple[float, torch.Tensor]:
    """``(metric value, the first ``keep`` items)`` of ``num`` items generated by ``sample_fn`` over ``sigmas``.

    Every rank returns the same value; ``reference`` is prepared data (``metric.prepare``) or raw data.
    ``dtype``: the sampler state, float64 by default as in EDM's ``generate.py`` (``generation.generate_items``).
    """
    dist, progress = dist or Dist(), progress or Progress()
    kept: dict[int, torch.Tensor] = {}

    def remember(idx, x):
        for i, item in zip(idx.tolist(), x):
            if i < keep:
                kept[i] = item

    common = dict(label_dim=label_dim, seed=seed, batch_size=batch_size, dtype=dtype)
    if is_feature_metric(metric):
        stats = generation.sample_feature_stats(model, sample_fn, sigmas, num, shape, metric.detector, dist=dist,
                                                progress=progress, description=description, on_batch=remember,
                                                **common)
        value = metric(stats, reference)
    else:
        mine = generation.shard(num, dist.rank, dist.world_size)
        parts = []
        with progress.task(description, len(mine)) as bar:
            for idx, x in generation.generate_items(model, sample_fn, sigmas, mine, shape, device=dist.device,
                                                    **common):
                parts.append((idx, x))
                bar.advance(len(idx))
        gathered = [p for rank_parts in dist.all_gather_object(parts) for p in rank_parts]
        x = torch.empty((num, *shape))
        for idx, part in gathered:
            x[idx] = part
        remember(torch.arange(num), x)
        value = metric(x, reference)
    # the kept items of every rank, in index order
    kept_all = {i: v for d in dist.all_gather_object(kept) for i, v in d.items()}
    first = torch.stack([kept_all[i] for i in sorted(kept_all)]) if kept_all else torch.empty((0, *shape))
    return float(value), first


def fid_at_steps(model, *, sampler: dict, schedule: dict, steps: list[int], metric, reference, num: int, shape,
                 label_dim: int = 0, seed: int = 0, batch_size: int = 256, dist: Dist | None = None,
                 progress: Progress | None = None, keep: int = 64) -> tuple[dict, dict]:
    """``({steps: {"nfe", "value", "seconds", "sigmas"}}, {steps: first items})`` for one model and sampler;
    ``sigmas`` is the σ list sampled, clamped to the model's σ range (``evaluate.schedule_for``)."""
    sample_fn, nfe_of, sigmas_of = sampler_and_schedule(sampler, schedule, model)
    results, grids = {}, {}
    for n in steps:
        sigmas = sigmas_of(n)
        t0 = time.perf_counter()
        value, first = score(model, sample_fn, sigmas, metric, reference, num=num, shape=shape, label_dim=label_dim,
                             seed=seed, batch_size=batch_size, dist=dist, progress=progress, keep=keep,
                             description=f"{sampler['name']}, {n} steps")
        results[n] = {"nfe": nfe_of(n), "value": value, "seconds": time.perf_counter() - t0,
                      "sigmas": [float(s) for s in sigmas]}
        grids[n] = first
    return results, grids


def nfe_sweep(student, teacher, *, metric, reference, student_sampler: dict, student_schedule: dict,
              student_nfe: list[int], teacher_samplers: list[dict], teacher_schedule: dict, teacher_nfe: list[int],
              num: int, shape, label_dim: int = 0, seed: int = 0, batch_size: int = 256, dist: Dist | None = None,
              progress: Progress | None = None, keep: int = 64, undistilled: bool = True) -> tuple[dict, dict]:
    """The paper's Table 4: ``({"student"|"undistilled"|"teacher": {sampler: {nfe: value}}}, same shape of first
    items)``. ``undistilled`` (on by default): the teacher sampled with exactly the student's sampler and schedule at
    the student's NFEs, the baseline that separates the effect of distillation from that of the schedule
    (``report.checks``' ``student_vs_undistilled``).

    NFEs a sampler cannot reach exactly (Heun's are odd) are skipped; the student is skipped when absent.
    """
    values: dict = {"student": {}, "teacher": {}}
    grids: dict = {"student": {}, "teacher": {}}
    plan = []
    if student is not None:
        plan.append(("student", student, student_sampler, student_schedule, student_nfe))
    if undistilled:
        values["undistilled"], grids["undistilled"] = {}, {}
        plan.append(("undistilled", teacher, student_sampler, student_schedule, student_nfe))
    plan += [("teacher", teacher, spec, teacher_schedule, teacher_nfe) for spec in teacher_samplers]
    for role, model, sampler, schedule, nfes in plan:
        sample_fn, nfe_of, sigmas_of = sampler_and_schedule(sampler, schedule, model)
        name = sampler["name"]
        values[role][name], grids[role][name] = {}, {}
        for nfe in nfes:
            n = steps_for_nfe(nfe_of, nfe)
            if n is None:
                continue
            value, first = score(model, sample_fn, sigmas_of(n), metric, reference, num=num, shape=shape,
                                 label_dim=label_dim, seed=seed, batch_size=batch_size, dist=dist,
                                 progress=progress, keep=keep, description=f"{role} {name}, NFE {nfe}")
            values[role][name][nfe], grids[role][name][nfe] = value, first
    return values, grids


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
    dpdm_sampler = ({"name": "dpdm", **cfg.student_sampler.options} if cfg.student_sampler.name == "dpdm"
                    else {"name": "dpdm"})
    karras = ({"name": "karras", **cfg.teacher_schedule.options} if cfg.teacher_schedule.name == "karras"
              else {"name": "karras"})
    return {"dpdm": (dpdm_sampler, {"name": cfg.student_schedule.name, **cfg.student_schedule.options}),
            "heun": ({"name": "heun"}, karras)}


def cross_use(student, teacher, *, metric, reference, samplers: dict[str, tuple[dict, dict]], nfe: int, num: int,
              shape, label_dim: int = 0, seed: int = 0, batch_size: int = 256, dist: Dist | None = None,
              progress: Progress | None = None, keep: int = 64) -> tuple[dict, dict]:
    """The DPDM paper's cross-use of models and samplers (Section 5.2, Figure 6): each model (student, teacher) with
    each sampling ``samplers[column] = (sampler spec, schedule spec)`` at the largest NFE ≤ ``nfe`` that sampler
    reaches. Returns ``({model: {column: {"steps", "nfe", "value", "sigmas"}}}, {model: {column: first items}})``;
    every cell draws the same per-item seeds."""
    cells: dict = {"student": {}, "teacher": {}}
    grids: dict = {"student": {}, "teacher": {}}
    for model_name, model in (("student", student), ("teacher", teacher)):
        for column, (sampler, schedule) in samplers.items():
            sample_fn, nfe_of, sigmas_of = sampler_and_schedule(sampler, schedule)
            reached = reachable_steps(nfe_of, nfe)
            if reached is None:
                raise DpdmError(f"--nfe {nfe}: the {sampler['name']} sampler cannot take {nfe} or fewer evaluations")
            n, actual = reached
            sigmas = sigmas_of(n)
            value, first = score(model, sample_fn, sigmas, metric, reference, num=num, shape=shape,
                                 label_dim=label_dim, seed=seed, batch_size=batch_size, dist=dist, progress=progress,
                                 keep=keep, description=f"{model_name}, {sampler['name']} sampler, NFE {actual}")
            cells[model_name][column] = {"steps": n, "nfe": actual, "value": value,
                                         "sigmas": [float(s) for s in sigmas]}
            grids[model_name][column] = first
    return cells, grids
