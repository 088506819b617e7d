"""Building what a recipe names: its datasets, network specs, divergence, schedules, device and resumable batches.

Small functions from recipe fields to objects. ``preflight`` calls them once and hands what they built to the run
in a ``Plan``."""

from __future__ import annotations

from ..config.recipe import EngineConfig, Recipe
from ..config.components import Component
from ..errors import DpdmError
from ..io.checkpoint import network_spec
from ..train.distributed import Dist, resolve_device  # noqa: F401  (resolve_device: 0.1's run.resolve_device)
from ..train.engine import DeviceBatches


def make_dataset(data: Component, split: str):
    """The ``split`` of the recipe's ``data`` component."""
    try:
        return data.build("dataset", split=split)
    except (ValueError, TypeError) as exc:
        raise DpdmError(f"recipe.data ({data.name}): {exc}") from None


def schedule_fn(schedule: Component):
    """``(n, **overrides) -> sigmas`` of a schedule component, not clamped to any network (``eval`` clamps)."""
    return schedule.build("schedule")


def build_divergence(recipe: Recipe, sigma_data: float, cfg=None):
    """The divergence of ``cfg`` (a ``TrainConfig``; default the recipe's ``train``) over its ``sigma``; a
    divergence that names a ``sigma_data`` parameter (the built-ins, for ``weighting: edm``) gets the teacher's σ_d,
    which the recipe cannot set apart from the teacher; one that only takes ``**options`` is not handed it."""
    train = cfg if cfg is not None else recipe.train
    return train.divergence.build("divergence", sigma=train.sigma, optional={"sigma_data": float(sigma_data)})


def student_spec(recipe: Recipe, teacher_spec: dict, cfg=None) -> dict:
    """The student's network: ``train.student`` (of ``cfg``, default the recipe's ``train``) if it names one, else
    the teacher's."""
    m = (cfg if cfg is not None else recipe.train).student
    if m is None:
        return teacher_spec
    return network_spec(m.backbone.as_dict(), m.precond.as_dict(), teacher_spec["shape"], teacher_spec["label_dim"])


def spec_of(recipe: Recipe, dataset) -> dict:
    m = recipe.model
    return network_spec(m.backbone.as_dict(), m.precond.as_dict(), dataset.shape, dataset.label_dim)


def check_teacher_fits(spec: dict, dataset, url: str) -> None:
    """A loaded teacher must take the recipe's data: same item shape and number of classes."""
    want = (list(dataset.shape), int(dataset.label_dim))
    if (list(spec["shape"]), int(spec["label_dim"])) != want:
        raise DpdmError(f"recipe.teacher.checkpoint: {url!r} is a network for items of shape {list(spec['shape'])} "
                        f"with label_dim {spec['label_dim']}, but the recipe's data has shape {want[0]} with "
                        f"label_dim {want[1]}; pick the checkpoint that was trained on this dataset")


def batches(engine: EngineConfig, dataset, batch_size: int, dist: Dist, seed: int):
    """Resumable batches for one phase: ``batch_size`` is global (all ranks, all ``engine.accum`` micro-batches)."""
    try:
        from dpdm.data.loader import Loader
    except ImportError:  # pragma: no cover - dpdm-core installed alone
        raise DpdmError("training needs dpdm-data's resumable Loader; install dpdm-data "
                        "(pip install packages/dpdm-data in a dpdm checkout)") from None
    per_rank = batch_size // (dist.world_size * engine.accum)
    loader = Loader(dataset, per_rank, seed=seed, rank=dist.rank, world_size=dist.world_size,
                    num_workers=engine.num_workers, persistent_workers=engine.num_workers > 0,
                    pin_memory=dist.device.type == "cuda")
    return DeviceBatches(loader, dist.device, conditional=bool(dataset.label_dim))
