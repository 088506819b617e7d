"""Reproducible batched generation for evaluation: every item has its own seed.

Item ``i`` of a generation with seed ``s`` draws all its randomness (initial noise, class label, the
fresh noise of stochastic samplers such as Algorithm 2's re-noising) from its own ``torch.Generator``
seeded with ``derive_seed(s, i)``, the idea of EDM's ``StackedRandomGenerator`` (``generate.py``). So
item ``i`` is the same whatever the batch size, the number of processes, or which rank draws it; a
50k-image FID run can be split over ranks or resumed by index range and gives the same images.

- ``ItemGenerators``: the per-item generators of one batch; samplers take it as their ``generator``
  (``samplers.noise_like`` draws one (C, H, W) slice per item from it).
- ``shard(num, rank, world_size)``: the item indices of one rank (``rank::world_size``).
- ``generate_items``: model-space batches ``(indices, x)`` for given indices.
- ``all_reduce_stats``: Σx, Σxxᵀ and n of each rank's detector features summed over ranks in float64 (the
  engine, ``protocols``, featurises each rank's shard).
- ``build_sampler`` / ``schedule_for`` / ``sigmas_for`` / ``sampler_and_schedule``: the one route from a recipe's
  sampler and schedule components (or ``{"name": ..., **options}`` dicts) to the calls above, the components' options
  bound (``plugins.registry.build``), the schedule clamped to the network's σ range as EDM's ``generate.py`` does.
- ``noise_seeds``: the per-item seeds of the recovery experiment's noise at σ (Section 5.1).
"""

from __future__ import annotations

import struct
from typing import Callable, Iterator, Sequence

import torch

from .. import schedules
from ..plugins.registry import build
from ..train.distributed import Dist, derive_seed
from ..utils import accepts
from .fid import FeatureStats, StatsAccumulator


class ItemGenerators:
    """One ``torch.Generator`` per item of a batch; draws are stacked along the batch dimension."""

    def __init__(self, seeds: Sequence[int], device="cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], *, dtype=torch.float32, device=None) -> torch.Tensor:
        """``(len(self), *shape)``: item ``i`` drawn from generator ``i``.

        The draw is always float32 and then cast to ``dtype`` (EDM's ``generate.py`` draws its latents in
        float32 and casts them to the float64 sampler state): torch's float64 normal draws are different
        numbers, so drawing in ``dtype`` would make an item depend on the precision of the sampler state.
        """
        device = self.device if device is None else torch.device(device)
        out = torch.stack([torch.randn(tuple(shape), generator=g, device=self.device, dtype=torch.float32)
                           for g in self.generators])
        return out.to(device=device, dtype=dtype)

    def randint(self, high: int) -> torch.Tensor:
        """``(len(self),)`` int64 in [0, high)."""
        return torch.cat([torch.randint(high, (1,), generator=g, device=self.device) for g in self.generators])


def item_seeds(seed: int, indices) -> list[int]:
    """The seed of each item: ``derive_seed(seed, i)``."""
    return [derive_seed(seed, int(i)) for i in indices]


def sigma_stream(sigma: float) -> int:
    """A stable non-negative integer for σ: the IEEE-754 bits of ``float(sigma)`` (σ > 0, so the sign bit is 0)."""
    return struct.unpack("<Q", struct.pack("<d", float(sigma)))[0]


def noise_seeds(seed: int, sigma: float, indices) -> list[int]:
    """The seed of each item's noise at σ in the recovery experiment (Section 5.1):
    ``derive_seed(derive_seed(seed, sigma_stream(σ)), i)``, so σ = 2 draws the same noise asked alone or in a list."""
    return item_seeds(derive_seed(seed, sigma_stream(sigma)), indices)


def shard(num: int, rank: int = 0, world_size: int = 1) -> range:
    """The indices rank ``rank`` of ``world_size`` generates: ``rank, rank + world_size, ...`` below ``num``."""
    return range(rank, num, world_size)


STATE_DTYPE = torch.float64  # the sampler state of evaluation, as in EDM's generate.py


def state_dtype(dtype, device) -> torch.dtype:
    """The sampler-state dtype used on ``device``: ``dtype``, except float64 on MPS (which has no float64),
    where float32 is used."""
    dtype = STATE_DTYPE if dtype is None else dtype
    if dtype == torch.float64 and torch.device(device).type == "mps":
        return torch.float32
    return dtype


@torch.no_grad()
def generate_items(denoiser, sampler: Callable, sigmas: torch.Tensor, indices: Sequence[int], shape, *,
                   label_dim: int = 0, seed: int = 0, batch_size: int = 256, device="cpu",
                   dtype=STATE_DTYPE, out_dtype=torch.float32) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(indices, x)`` batches: x (B, *shape) in ``out_dtype`` (float32; None: the state's dtype) on the
    CPU, in model space.

    Item ``i``: ε ~ N(0, I) and (if ``label_dim``) a uniform class from its own generator, x = σ_0·ε, then
    ``sampler(denoiser, x, sigmas, generator=<the batch's ItemGenerators>, class_labels=labels)``.

    The sampler state ``x`` is held in ``dtype``, float64 by default, as EDM's ``generate.py`` does
    (``x_next = latents.to(torch.float64) * t_steps[0]``, the network output cast with ``.to(torch.float64)``):
    the network runs in its own precision (``precond.Precond``), the samplers keep the state's dtype. This
    holds for every sampler, the teacher's ODE/SDE baselines and the student's ``dpdm`` sampler alike, so
    that both sides of a comparison are computed the same way (the student's few steps make the cost
    negligible). ε is drawn in float32 and cast (``ItemGenerators.randn``), so an item is the same in float32
    and float64 up to round-off. ``dtype=None`` means float64; on MPS float64 falls back to float32.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    dtype = state_dtype(dtype, device)
    indices = list(indices)
    sigmas = sigmas.to(device)
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        gens = ItemGenerators(item_seeds(seed, idx), device=device)
        x = gens.randn(tuple(shape), dtype=dtype) * sigmas[0].to(dtype)
        labels = gens.randint(label_dim) if label_dim else None
        out = sampler(denoiser, x, sigmas, generator=gens, class_labels=labels)
        yield torch.as_tensor(idx, dtype=torch.int64), (out if out_dtype is None else out.to(out_dtype)).cpu()


def generate(denoiser, sampler: Callable, sigmas: torch.Tensor, num: int, shape, **kwargs) -> torch.Tensor:
    """All ``num`` items (0 … num − 1) of ``generate_items`` in one tensor (single process)."""
    parts = [x for _, x in generate_items(denoiser, sampler, sigmas, range(num), shape, **kwargs)]
    return torch.cat(parts) if parts else torch.empty((0, *shape))


def all_reduce_stats(acc: StatsAccumulator, dist: Dist, feature_dim: int) -> FeatureStats:
    """Sum n, Σx and Σxxᵀ (float64) over the ranks and return the statistics of the union."""
    if acc.sum is None:  # a rank with no items (num < world_size)
        acc.sum = torch.zeros(feature_dim, dtype=torch.float64)
        acc.outer = torch.zeros(feature_dim, feature_dim, dtype=torch.float64)
    if dist.distributed:
        import torch.distributed as tdist

        device = dist.device
        n = torch.tensor([float(acc.n)], dtype=torch.float64, device=device)
        total, outer = acc.sum.to(device), acc.outer.to(device)
        for t in (n, total, outer):
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        acc.n, acc.sum, acc.outer = int(n.item()), total.cpu(), outer.cpu()
    return acc.stats()


def component_parts(spec) -> tuple[str, dict]:
    """``(name, options)`` of a component: a recipe ``Component`` or a ``{"name": ..., **options}`` dict."""
    if isinstance(spec, dict):
        options = dict(spec)
        return options.pop("name"), options
    return spec.name, dict(spec.options)


def build_sampler(spec) -> Callable:
    """The sampler a component names with its options bound (``registry.build``); it carries ``name`` and ``nfe``
    (``steps -> network evaluations``)."""
    return build("sampler", *component_parts(spec))


def schedule_for(denoiser, spec) -> Callable:
    """The schedule every route samples ``denoiser`` with: ``spec`` (a schedule component or ``{"name": ...,
    **options}``) with its ends clamped to the network's σ range as EDM's ``generate.py`` does
    (``schedules.clamp_to_network``; no clamp for a denoiser that declares no ``sigma_min``/``sigma_max``, nor when
    ``denoiser`` is None). Returns ``(n, **overrides) -> sigmas``."""
    fn = build("schedule", *component_parts(spec))
    if denoiser is None:
        return fn
    return schedules.clamp_to_network(fn, denoiser,
                                      takes_range=accepts(fn.func, "sigma_min", "sigma_max", var_keyword=True))


def sigmas_for(denoiser, spec, n: int, **overrides) -> torch.Tensor:
    """The ``n``-step σ list (float64, ending in 0) of ``schedule_for(denoiser, spec)``: e.g. for ``dpdm sample``."""
    return schedule_for(denoiser, spec)(n, **overrides)


def sampler_and_schedule(sampler, schedule, model=None) -> tuple[Callable, Callable, Callable]:
    """``(sample_fn, nfe_of, sigmas_of)`` of a sampler and a schedule component; with ``model``, ``sigmas_of`` is
    clamped to its σ range (``schedule_for``)."""
    sample_fn = build_sampler(sampler)
    return sample_fn, sample_fn.nfe, schedule_for(model, schedule)
