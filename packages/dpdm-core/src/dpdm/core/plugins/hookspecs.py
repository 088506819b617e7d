"""The plugin API of dpdm: one hook per component kind.

Each hook receives a ``register(name, obj, **metadata)`` callback. Built-in components (dpdm-core's own
included) are registered through exactly these hooks and the same entry-point group, so a third-party package
is a peer of ``dpdm-nets`` and ``dpdm-data``. Plugins are discovered through the ``dpdm`` entry-point group::

    [project.entry-points.dpdm]
    acme = "acme_dpdm.plugin"

What each kind's object must be:

- ``backbone``: ``factory(shape=..., label_dim=..., **options) -> nn.Module`` with
  ``forward(x, noise_labels, class_labels=None)`` returning a tensor shaped like ``x``.
- ``preconditioning``: ``factory(backbone, **options) -> Denoiser`` (see ``dpdm.core.precond``).
- ``schedule``: ``fn(n, **options) -> sigmas`` (float64, descending, ending in 0).
- ``sampler``: ``fn(denoiser, x, sigmas, *, generator=None, callback=None, class_labels=None, **options) -> x``,
  registered with ``nfe=`` (``register("midpoint", fn, nfe=lambda steps: 2 * steps - 1)``: network evaluations for a
  number of steps; an ``nfe`` attribute on ``fn`` is read too).
- ``divergence``: ``factory(**options) -> Divergence`` (see ``dpdm.core.divergences``).
- ``dataset``: ``factory(split="train", **options) -> Dataset`` (see ``dpdm.core.datasets``).
- ``metric``: ``factory(**options) -> fn(samples, reference) -> float``, registered with ``note=`` (what its
  numbers are, printed in reports). A factory that declares ``device`` gets the run's device, one that declares
  ``progress`` a progress display. ``family="fd-{dataset}"`` registers a family of names that carry an option
  (``fd-mnist`` is the factory with ``dataset="mnist"``). A metric on detector features (like ``fid``) is best
  built with ``dpdm.core.eval.fid.feature_metric(detector)``: it then streams (statistics summed over ranks) and
  featurises each reference once.
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
