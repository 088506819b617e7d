"""Defaults that the library classes and the recipe schema share, written once: the DPDM paper's (Table 8,
Appendix B) where it states them, EDM's for the teacher, and the engine's."""

from __future__ import annotations

STUDENT_LR = 1e-5  # the student's learning rate (Table 8)
STUDENT_BETAS = (0.0, 0.99)  # Adam's (β1, β2) for the student and the fake score (Table 8)
FAKE_UPDATES = 1  # fake-score updates per student update (Algorithm 1 alternates one and one)
TEACHER_LR = 1e-3  # Adam's learning rate for the EDM loss
TEACHER_BETAS = (0.9, 0.999)  # Adam's (β1, β2) for the teacher
MAX_NONFINITE = 10  # consecutive skipped (NaN/Inf) optimizer steps of one model that stop the run
# the divergence guard (train.guards.LossGuard, recipe engine.loss_guard): a loss above LOSS_GUARD_FACTOR x the median
# of its last LOSS_GUARD_WINDOW values for LOSS_GUARD_PATIENCE consecutive steps stops the run, once the median has
# LOSS_GUARD_WARMUP values. In a normal recipes/toy2d.yaml run (logged every step) no loss came above 1.6x its running
# median (teacher 1.15x, fake score 1.58x): 600x below the factor; a student lr of 1e3 put the fake loss at 4e13x.
LOSS_GUARD_FACTOR = 1e3
LOSS_GUARD_WINDOW = 200
LOSS_GUARD_PATIENCE = 50
LOSS_GUARD_WARMUP = 1
LOG_EVERY = 50  # iterations between records of the metrics log
