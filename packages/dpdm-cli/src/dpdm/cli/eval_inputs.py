"""What the ``dpdm eval`` commands (and ``dpdm recover`` / ``dpdm sample``) load before they score: the metric
(on every rank), the reference, a run's or a checkpoint's models, a dataset named on the command line, the sampler
and schedule of a model; and how they write JSON and sample grids."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from .common import err


def metric_spec(metric: str | None, detector: str | None, recipe=None, kind: str | None = None):
    """``(name, options)`` of the metric to use, checked without building it: ``--detector`` alone means ``fid``
    with that detector; ``--metric NAME`` any metric (``fid`` takes ``--detector``); neither: the run's
    ``eval.metric``. ``kind``: the data's (``image`` or ``vector``); a metric that does not apply to it is refused."""
    from dpdm.core.errors import DpdmError
    from dpdm.core.eval.metrics import data_problem

    if metric is None and detector is None:
        if recipe is None:
            raise DpdmError("no metric: give --detector PATH (the FID Inception-v3) or --metric NAME "
                            "(e.g. fd-mnist, the substitute; energy for vectors)")
        name, options = recipe.eval.metric.name, dict(recipe.eval.metric.options)
    else:
        name = metric or "fid"
        options = {}
        if detector is not None:
            if name != "fid":
                raise DpdmError(f"--detector is the FID Inception-v3; metric {name!r} does not take it")
            options["detector"] = detector
    unfit = data_problem(name, kind) if kind is not None else None
    if unfit:
        raise DpdmError(("the run's eval.metric " if metric is None and detector is None else "--metric ") + unfit)
    if name == "fid" and "detector" not in options:
        raise DpdmError("metric fid needs the FID Inception-v3: give --detector PATH or URL "
                        "(inception-2015-12-05.pkl/.pt, or pytorch-fid's pt_inception-2015-12-05-*.pth)")
    return name, options


def resolve_metric(metric: Optional[str], detector: Optional[str], recipe=None, device="cpu", progress=None,
                   kind: str | None = None):
    """``(name, metric fn)``: the metric of ``metric_spec``, built."""
    from dpdm.core.eval.metrics import make_metric

    name, options = metric_spec(metric, detector, recipe, kind)
    data = (recipe.data.name, recipe.data.options) if recipe is not None else None
    return name, make_metric(name, options, data=data, progress=progress, device=device)


def metric_on_ranks(dist, metric, detector, recipe, progress, kind=None):
    """``resolve_metric`` on rank 0 first (it may download a detector or train an fd classifier into the cache),
    then on the other ranks, which find it cached. The options are checked on every rank first, so that a refused
    metric stops every rank rather than leaving the others waiting at the barrier."""
    metric_spec(metric, detector, recipe, kind)
    if dist.is_main:
        result = resolve_metric(metric, detector, recipe, dist.device, progress, kind)
    dist.barrier()
    if not dist.is_main:
        result = resolve_metric(metric, detector, recipe, dist.device, kind=kind)
    return result


def load_reference(ref: Optional[str], metric, recipe, dist, progress):
    """The reference: ``--ref`` statistics, else (for a run) the recipe's ``eval.ref``, else its test split (feature
    statistics cached)."""
    from dpdm.core.errors import DpdmError
    from dpdm.core.eval.fid import load_stats
    from dpdm.core.eval.protocols import cached_dataset_stats, is_feature_metric

    if ref is None and recipe is not None and recipe.eval.ref and is_feature_metric(metric):
        ref = recipe.eval.ref  # the run's own reference statistics (e.g. EDM's published ones)
    if ref is not None:
        if not is_feature_metric(metric):
            raise DpdmError("--ref holds feature statistics, for fid or fd-<dataset>; this metric compares data")
        stats = load_stats(ref)
        d = metric.detector.feature_dim
        if len(stats.mu) != d:
            raise DpdmError(f"--ref {ref} holds {len(stats.mu)}-dimensional statistics but {metric.detector.key} gives "
                            f"{d} features per image: the reference was computed with another detector; recompute it "
                            f"with `dpdm eval ref DATASET OUT.npz` and this detector, or give the matching detector")
        return stats, ref
    if recipe is None:
        raise DpdmError("no reference: give --ref REF.npz (make one with `dpdm eval ref DATASET REF.npz`, or use "
                        "EDM's published https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/<dataset>.npz)")
    from dpdm.core.eval.protocols import dataset_key
    from dpdm.core.pipeline.run import make_dataset, references

    test_set = make_dataset(recipe.data, "test")
    if is_feature_metric(metric):
        return (cached_dataset_stats(dataset_key(recipe.data, "test"), test_set, metric.detector, dist=dist,
                                     progress=progress), f"{recipe.data.name} test split ({len(test_set)} items)")
    reference, _ = references(recipe, make_dataset(recipe.data, "train"), test_set, recipe.eval.num_samples)
    what = "fresh samples" if hasattr(test_set, "sample") else "test split"
    return reference, f"{recipe.data.name} {what} ({len(reference)} items)"


def run_models(run_dir, recipe, dist, metric, detector, ref, progress):
    """A run's (``RunDir``) student and teacher on the rank's device, its metric and reference: ``(student, teacher,
    spec, metric name, metric fn, reference, reference name)`` (``eval sweep`` and ``eval cross``)."""
    from dpdm.core.io.checkpoint import load_checkpoint

    student, spec = load_checkpoint(run_dir.checkpoint("student"), device=dist.device)
    teacher, _ = load_checkpoint(run_dir.checkpoint("teacher"), device=dist.device)
    kind = "image" if len(spec["shape"]) == 3 else "vector"
    name, metric_fn = metric_on_ranks(dist, metric, detector, recipe, progress, kind)
    reference, ref_name = load_reference(ref, metric_fn, recipe, dist, progress)
    return student, teacher, spec, name, metric_fn, reference, ref_name


def model_of(run: Optional[str], checkpoint: Optional[str], model: str, device):
    """``(denoiser, spec-like dict with shape/label_dim, recipe or None, RunDir or None, label)``."""
    from dpdm.core.errors import DpdmError

    if run is not None and checkpoint is not None:
        raise DpdmError("give --run DIR or --checkpoint PATH, not both")
    if model not in ("student", "teacher"):
        raise DpdmError(f"--model must be 'student' or 'teacher', got {model!r}")
    from dpdm.core.io.checkpoint import load_checkpoint

    if checkpoint is not None:
        net, spec = load_checkpoint(checkpoint, device=device)
        return net, spec, None, None, checkpoint
    from dpdm.core.pipeline.rundir import resolve_run

    run_dir = resolve_run(run)
    net, spec = load_checkpoint(run_dir.checkpoint(model), device=device)
    return net, spec, run_dir.recipe(), run_dir, str(run_dir)


@contextmanager
def on_ranks(device: str) -> Iterator[tuple]:
    """``(dist, progress)`` for a command that runs on every rank (under torchrun or ``--nproc``): bars on rank 0
    only; afterwards the process group is destroyed, with a barrier only when this rank finished (a rank that
    failed must not wait for the others, which may never reach it)."""
    from dpdm.core.progress import Progress, RichProgress
    from dpdm.core.train.distributed import init_dist

    dist = init_dist(device)
    finished = False
    try:
        yield dist, (RichProgress(err) if dist.is_main else Progress())
        finished = True
    finally:
        dist.destroy(sync=finished)


def open_dataset(dataset: str, data: list[str], split: str):
    """A registered dataset with ``--data`` options, or a path: ``.zip`` → image-zip, ``.npz`` → npz, else
    image-folder."""
    import yaml
    from dpdm.core.errors import DpdmError
    from dpdm.core.plugins.registry import entries, get

    options = {}
    for item in data:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DpdmError(f"--data {item!r}: expected key=value")
        options[key.strip()] = yaml.safe_load(value)
    if dataset in entries("dataset"):
        name = dataset
    else:
        name = ("image-zip" if dataset.endswith(".zip") else "npz" if dataset.endswith(".npz") else "image-folder")
        options = {"path": dataset, **options}
    try:
        return get("dataset", name)(split=split, **options)
    except (ValueError, TypeError) as exc:
        raise DpdmError(f"dataset {dataset!r} ({name}): {exc}") from None


def check_sigma_max(sigma_max: float | None) -> None:
    """Refuse a ``--sigma-max`` that is not a positive noise level, before anything is loaded."""
    from dpdm.core.errors import DpdmError

    if sigma_max is not None and not sigma_max > 0:
        raise DpdmError(f"--sigma-max: the schedule's largest noise level must be positive, got {sigma_max:g}")


def sampling(recipe, model: str, sampler: Optional[str], schedule: Optional[str], sigma_max: Optional[float]):
    """``(sampler spec, schedule spec)`` for a run's model or a checkpoint's role (``model``: student or teacher).

    Sampler: ``sampler``, else the student's (the run's ``eval.student_sampler``, else dpdm: Algorithm 2) or the
    teacher's (heun, EDM's ODE sampler). Schedule: ``schedule``, else the one that goes with the sampler: the student
    sampler's → the run's ``eval.student_schedule`` (else dpdm, Appendix B.1), any other → the run's
    ``eval.teacher_schedule`` (else karras). A named schedule that is the run's keeps the run's options."""
    cfg = recipe.eval if recipe is not None else None
    student_sampler = cfg.student_sampler.name if cfg is not None else "dpdm"
    if sampler is None:
        if model == "student" and cfg is not None:
            sampler_spec = cfg.student_sampler.as_dict()
        else:
            sampler_spec = {"name": student_sampler if model == "student" else "heun"}
    else:
        sampler_spec = {"name": sampler}
    for_student = sampler_spec["name"] == student_sampler
    own = (cfg.student_schedule if for_student else cfg.teacher_schedule) if cfg is not None else None
    name = schedule or (own.name if own is not None else ("dpdm" if for_student else "karras"))
    schedule_spec = {"name": name, **(dict(own.options) if own is not None and own.name == name else {})}
    if sigma_max is not None:
        schedule_spec["sigma_max"] = sigma_max
    from dpdm.core.plugins.registry import entry

    entry("sampler", sampler_spec["name"])
    entry("schedule", schedule_spec["name"])
    return sampler_spec, schedule_spec


def write_json(path: Path, data: dict) -> None:
    from dpdm.core.io.storage import write_atomic

    write_atomic(str(path), json.dumps(data, indent=2).encode())


def save_grids(folder: Path, stem: str, grids: dict) -> None:
    """One PNG per entry (``<stem>-<key>.png``): images tiled, vectors scattered (needs matplotlib for vectors)."""
    from dpdm.core.eval import figures

    for key, x in grids.items():
        if len(x):
            figures.save_samples(x, folder / f"{stem}-{key}.png", title=f"{stem} {key}")

