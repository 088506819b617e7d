"""Graceful stops: SIGTERM (what Slurm and Kubernetes send before SIGKILL) and SIGINT (Ctrl-C) end a run after
its current training step, with a snapshot to resume from.

``stop_on_signals()`` installs the handlers (main thread; ``dpdm run`` does). A signal raises ``Interrupted`` at
once, except inside ``deferred()`` (``engine.Trainer.fit`` runs its iterations there): it is only noted, and
``pending()`` tells the loop, which finishes the step, saves a snapshot and raises ``Interrupted`` itself (under
DDP every rank decides together, see ``Trainer.fit``). The same signal a second time while deferred raises at once
in a single process (Ctrl-C twice); torchrun's workers wait, as their agent sends its signal once and kills them
after a grace period anyway, and once they stop (``acted_upon``) they ignore later signals: a rank that saw its
signal after the others had decided to stop must not break off its cleanup.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGINT)

_pending: list[int] = []  # signals received while deferred, oldest first
_deferring = [0]  # depth of deferred() blocks
_stopping = [False]  # a stop is under way (acted_upon)


class Interrupted(BaseException):
    """A run stopped by ``signum``: at ``phase`` step ``step`` with the snapshot ``snapshot`` (None when the signal
    came outside training). A ``BaseException``, like ``KeyboardInterrupt``: not an error to catch and go on."""

    def __init__(self, signum: int, phase: str | None = None, step: int | None = None, snapshot: str | None = None):
        self.signum, self.phase, self.step, self.snapshot = int(signum), phase, step, snapshot
        super().__init__(self.describe())

    @property
    def status(self) -> int:
        """The shell's exit status of a process ended by the signal: 128 + its number (143, 130)."""
        return 128 + self.signum

    def describe(self) -> str:
        name = signal.Signals(self.signum).name
        if self.snapshot is None:
            return f"stopped by {name}" + (f" at {self.phase} step {self.step}" if self.phase else "")
        return f"stopped by {name} after {self.phase} step {self.step}; training snapshot: {self.snapshot}"


def _handle(signum, frame):
    worker = "RANK" in os.environ  # a torchrun worker
    if worker and _stopping[0]:
        return
    if _deferring[0] and (worker or signum not in _pending):
        _pending.append(signum)
        return
    raise Interrupted(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT stop the run through ``Interrupted`` (see the module docstring)."""
    previous = {s: signal.signal(s, _handle) for s in SIGNALS}
    _pending.clear()
    _stopping[0] = False
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _pending.clear()
        _stopping[0] = False


@contextmanager
def deferred() -> Iterator[None]:
    """Within the block a signal is noted for ``pending()`` instead of raising; one still pending at the end of
    the block is raised then (the caller did not get to stop at a step boundary)."""
    _deferring[0] += 1
    try:
        yield
    finally:
        _deferring[0] -= 1
    if not _deferring[0] and _pending:
        raise Interrupted(_pending.pop(0))


def pending() -> int | None:
    """The first signal received within ``deferred()`` and not yet acted upon, or None."""
    return _pending[0] if _pending else None


def acted_upon() -> None:
    """The loop stops for the pending signals: forget them (see the module docstring)."""
    _pending.clear()
    _stopping[0] = True
