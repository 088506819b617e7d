"""Evaluation: generation with per-item seeds, metrics (energy, sliced Wasserstein, FID and the ``fd`` family),
the NFE sweep, one-step σ_max search and recovery protocols, the report and its figures."""
