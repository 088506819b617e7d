"""Defaults that the library classes and the recipe schema share, written once: the DPDM paper's (Table 8,
Appendix B) where it states them, EDM's for the teacher, and the engine's."""

from __future__ import annotations

STUDENT_LR = 1e-5  # the student's learning rate (Table 8)
STUDENT_BETAS = (0.0, 0.99)  # Adam's (β1, β2) for the student and the fake score (Table 8)
FAKE_UPDATES = 1  # fake-score updates per student update (Algorithm 1 alternates one and one)
TEACHER_LR = 1e-3  # Adam's learning rate for the EDM loss
TEACHER_BETAS = (0.9, 0.999)  # Adam's (β1, β2) for the teacher
MAX_NONFINITE = 10  # consecutive skipped (NaN/Inf) optimizer steps of one model that stop the run
LOG_EVERY = 50  # iterations between records of the metrics log
