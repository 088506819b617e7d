"""The evaluation metrics of dpdm-core, registered through dpdm-core's ``dpdm`` entry point like any plugin's:
``energy`` and ``sliced-wasserstein`` (vector data), ``fid``, and the ``fd`` family (``fd-<dataset>``: the Fréchet
distance in the features of a small classifier trained on a registered dataset). Each carries the ``note`` that
reports print about its numbers (``{dataset}`` filled in for a family member)."""

from __future__ import annotations

from ..plugins.hookspecs import hookimpl


@hookimpl
def register_metrics(register):
    from .classifier import fd_metric
    from .fid import fid_metric
    from .metrics import energy, sliced

    register("energy", energy,
             note="squared energy distance (Székely & Rizzo), U-statistic estimate, in model space; lower is better")
    register("sliced-wasserstein", sliced,
             note="sliced 2-Wasserstein distance over random projections, in model space; lower is better")
    # data="image": these score images in a detector's features and do not apply to vectors
    register("fid", fid_metric, data="image",
             note="Fréchet Inception Distance (Inception-v3 pool features, as EDM computes it); lower is better")
    # deferred: built at evaluation, not by preflight (its classifier may have to be trained first)
    register("fd", fd_metric, family="fd-{dataset}", deferred=True, data="image",
             note="Fréchet distance in the features of a small classifier trained on {dataset} (a substitute for FID, "
                  "not comparable with published FIDs); lower is better")
