"""The plugin API of dpdm: one hook per component kind.

Each hook receives a ``register(name, obj)`` callback. Built-in components are
registered through exactly these hooks, so a third-party package is a peer of
``dpdm-nets`` and ``dpdm-data``. Plugins are discovered through the ``dpdm``
entry-point group::

    [project.entry-points.dpdm]
    acme = "acme_dpdm.plugin"

What each kind's object must be:

- ``backbone``: ``factory(shape=..., label_dim=..., **options) -> nn.Module`` with
  ``forward(x, noise_labels, class_labels=None)`` returning a tensor shaped like ``x``.
- ``preconditioning``: ``factory(backbone, **options) -> Denoiser`` (see ``dpdm.core.precond``).
- ``schedule``: ``fn(n, **options) -> sigmas`` (float64, descending, ending in 0).
- ``sampler``: ``fn(denoiser, x, sigmas, *, generator=None, callback=None, class_labels=None, **options) -> x``
  with an ``nfe(num_steps) -> int`` attribute.
- ``divergence``: ``factory(**options) -> Divergence`` (see ``dpdm.core.divergences``).
- ``dataset``: ``factory(split="train", **options) -> Dataset`` (see ``dpdm.core.datasets``).
- ``metric``: ``factory(**options) -> fn(samples, reference) -> float``. A metric on detector features
  (like ``fid``) is best built with ``dpdm.core.fid.feature_metric(detector)``: it then streams under
  ``dpdm eval`` (statistics summed over ranks) and featurises each reference once.
"""

from __future__ import annotations

import pluggy

PROJECT = "dpdm"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_backbones(register):
    """Register raw networks ``F(x, noise_labels, class_labels=None)`` by name."""


@hookspec
def register_preconditionings(register):
    """Register wrappers that turn a backbone into a denoiser ``D(x, sigma, class_labels=None)``."""


@hookspec
def register_schedules(register):
    """Register sampling noise schedules ``(n, **options) -> sigmas``."""


@hookspec
def register_samplers(register):
    """Register samplers ``(denoiser, x, sigmas, *, generator, callback, class_labels) -> x``."""


@hookspec
def register_divergences(register):
    """Register generator divergences (smoothed KL, IKL, ...)."""


@hookspec
def register_datasets(register):
    """Register dataset factories ``(split="train", **options) -> Dataset``."""


@hookspec
def register_metrics(register):
    """Register distribution distances ``factory(**options) -> fn(samples, reference) -> float``."""
