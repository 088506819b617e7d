"""Training: the engine (``Trainable``, ``Trainer``), the teacher's EDM job and the DPDM distillation job
(Algorithm 1), with precision, EMA, distributed helpers, resumable snapshots and the metrics log."""
