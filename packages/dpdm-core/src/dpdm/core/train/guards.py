"""The divergence guard: a run whose loss runs away while staying finite (a learning rate far too high) is
stopped, rather than training on to a model that samples garbage. Non-finite steps have their own guard
(``engine.Trainer``'s ``max_nonfinite``).

``LossGuard`` watches the EDM losses of the iteration stats: the teacher's ``loss`` and the fake score's
``fake_loss``, which is fitted to the student's outputs and so explodes when they do (the student's own
``student_loss`` is a surrogate whose value says little: it starts near 0, where fake score and teacher agree, and
fell to 0 in a diverged run). A value above ``factor`` times the robust reference of its loss (the median of its
last ``window`` values that were not themselves outliers, once there are ``warmup`` of them) is an outlier;
``patience`` consecutive outliers of one loss trip the guard. Outliers stay out of the window, so a diverging loss
cannot drag its reference up, even when it blows up at the second step (a student lr of 1e3 on toy2d: the fake loss
went from 1.6 to 7e13 in one step); a spike shorter than ``patience`` steps does not trip it.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

from ..defaults import LOSS_GUARD_FACTOR, LOSS_GUARD_PATIENCE, LOSS_GUARD_WARMUP, LOSS_GUARD_WINDOW
from ..errors import DpdmError


class LossDiverged(DpdmError):
    """A training loss stayed far above its running median (see ``LossGuard``)."""


class LossGuard:
    """Trips when a loss stays above ``factor`` × its running median for ``patience`` consecutive iterations.

    Args:
        factor: how many times its reference (the median of the window) a loss must exceed to be an outlier.
        window: iterations of non-outlier values the median is taken over.
        patience: consecutive outliers of one loss that trip the guard.
        warmup: values of a loss in its window before any value is judged (at most ``window``; the window travels
            in snapshots, so a resumed run continues it). More than 1 lets a blow-up in the first steps into the
            reference, where it hides.
        keys: the stats watched.
    """

    KEYS = ("loss", "fake_loss")

    def __init__(self, factor: float = LOSS_GUARD_FACTOR, window: int = LOSS_GUARD_WINDOW,
                 patience: int = LOSS_GUARD_PATIENCE, warmup: int = LOSS_GUARD_WARMUP, keys=KEYS):
        if not (factor > 1 and window >= 1 and patience >= 1 and warmup >= 1):
            raise DpdmError(f"loss guard: factor must be > 1, window, patience and warmup at least 1; got "
                            f"factor={factor}, window={window}, patience={patience}, warmup={warmup}")
        self.factor, self.window, self.patience, self.warmup = float(factor), int(window), int(patience), int(warmup)
        self.keys = tuple(keys)
        self.seen = 0  # iterations observed
        self.history: dict[str, deque] = {}
        self.streak: dict[str, int] = {}  # consecutive outliers per loss
        self.first: dict[str, int] = {}  # the iteration (of this guard) at which the current streak began

    def update(self, losses: dict[str, float]) -> dict | None:
        """Observe one iteration's stats (those of ``keys``); returns ``{"key", "value", "median", "since"}`` of the
        loss that trips the guard (``since``: iterations ago its streak began), else None. Non-finite values are
        ignored."""
        self.seen += 1
        tripped = None
        for key, value in losses.items():
            if key not in self.keys:
                continue
            value = abs(float(value))
            if not math.isfinite(value):
                continue
            history = self.history.setdefault(key, deque(maxlen=self.window))
            median = statistics.median(history) if len(history) >= min(self.warmup, self.window) else math.inf
            if value > self.factor * max(median, 1e-30):
                self.streak[key] = self.streak.get(key, 0) + 1
                if self.streak[key] == 1:
                    self.first[key] = self.seen
                if self.streak[key] >= self.patience and tripped is None:
                    tripped = {"key": key, "value": value, "median": median, "since": self.seen - self.first[key]}
                continue
            self.streak[key] = 0
            history.append(value)
        return tripped

    def state_dict(self) -> dict:
        """What the guard has seen, as plain values (a snapshot's ``state.pt``): a resumed run judges its losses
        against the same medians and streaks as the run that was stopped."""
        return {"seen": self.seen, "history": {k: list(v) for k, v in self.history.items()},
                "streak": dict(self.streak), "first": dict(self.first)}

    def load_state_dict(self, state: dict) -> None:
        self.seen = int(state["seen"])
        self.history = {k: deque(v, maxlen=self.window) for k, v in state["history"].items()}
        self.streak, self.first = dict(state["streak"]), dict(state["first"])

    def error(self, tripped: dict, phase: str, step: int, checkpoint: str | None, saved_at: int,
              lrs: dict[str, float]) -> LossDiverged:
        """The message of a tripped guard at ``step``, naming the newest checkpoint (saved at step ``saved_at``)
        and the learning rates."""
        began = step - tripped["since"]
        if checkpoint is None:
            kept = "no checkpoint was saved before this"
        elif saved_at < began:
            kept = f"the last good checkpoint is {checkpoint}"
        else:
            kept = (f"the newest checkpoint, {checkpoint}, was saved after the divergence began: an older one (if "
                    "kept) or a fresh start is better")
        rates = ", ".join(f"{name} {lr:g}" for name, lr in lrs.items())
        return LossDiverged(
            f"{phase} training stopped at step {step}: the {tripped['key']} diverged: {tripped['value']:.3g}, more "
            f"than {self.factor:g}x its running median ({tripped['median']:.3g}) in {self.patience} consecutive "
            f"steps since step {began} (engine.loss_guard: factor {self.factor:g}, patience {self.patience}); "
            f"{kept}. Try a lower learning "
            f"rate (now {rates}), a longer lr warm-up or gradient clipping (grad_clip); set engine.loss_guard=null "
            "to train on regardless")
