"""Bounds on recipe values, declared next to their fields::

    steps: int = attrs.field(default=1000, metadata={"bound": at_least(0)})

The converter checks a field's bound once its value has the right type, so that bounds and type errors are
reported together (``recipe.train.steps: must be at least 0, got -1``); :func:`bound_problems` checks an
object built in code. A null value of an optional field is always within bounds.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import attrs

__all__ = ["Bound", "at_least", "bound_problems", "each_at_least", "each_in", "each_positive", "positive",
           "run_name", "step_counts", "torch_device"]


@attrs.frozen
class Bound:
    """``test(value)`` must hold; otherwise the problem is ``message`` with the value in place of ``{}``."""

    test: Callable[[Any], bool]
    message: str

    def problem(self, value: Any) -> str | None:
        if value is None or self.test(value):
            return None
        return self.message.format(list(value) if isinstance(value, tuple) else value)


def at_least(low: int) -> Bound:
    return Bound(lambda v: v >= low, f"must be at least {low}, got {{}}")


positive = Bound(lambda v: v > 0, "must be positive, got {}")


def each_at_least(low: int) -> Bound:
    return Bound(lambda vs: all(v >= low for v in vs), f"every entry must be at least {low}, got {{}}")


each_positive = Bound(lambda vs: all(v > 0 for v in vs), "every entry must be positive, got {}")


def each_in(low: float, high: float) -> Bound:
    """Every entry in ``[low, high)`` (Adam's betas: ``[0, 1)``)."""
    return Bound(lambda vs: all(low <= v < high for v in vs), f"every entry must be in [{low}, {high}), got {{}}")


step_counts = Bound(lambda vs: len(vs) > 0 and all(v >= 1 for v in vs),
                    "a non-empty list of step counts of at least 1, got {}")


# a recipe's name names its run folder, runs/<name>-<time>: no '/' or '..' that would put the run elsewhere
run_name = Bound(lambda v: re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v) is not None,
                 "names the run folder (runs/<name>-<time>), so it must start with a letter or digit and hold only "
                 "letters, digits, '.', '-' and '_', got {!r}")


def _is_device(name: str) -> bool:
    if name == "auto":
        return True
    import torch

    try:
        torch.device(name)  # whether CUDA is available here is checked when the run starts
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


torch_device = Bound(_is_device, "must be 'auto' or a torch device such as 'cpu', 'cuda', 'cuda:N' or 'mps', "
                                 "got {!r}")


def bound_problems(obj: Any, path: str = "recipe") -> list[str]:
    """``<path>.<key>: <problem>`` for every field of the attrs object ``obj`` (and of the attrs objects in it)
    whose value is outside its field's bound, in field order."""
    problems = []
    for field in attrs.fields(type(obj)):
        value, where = getattr(obj, field.name), f"{path}.{field.alias}"
        bound = field.metadata.get("bound")
        problem = bound.problem(value) if bound is not None else None
        if problem:
            problems.append(f"{where}: {problem}")
        problems += _nested_problems(value, where)
    return problems


def _nested_problems(value: Any, where: str) -> list[str]:
    if attrs.has(type(value)):
        return bound_problems(value, where)
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in _nested_problems(item, f"{where}.{key}")]
    if isinstance(value, (list, tuple)):
        return [p for i, item in enumerate(value) for p in _nested_problems(item, f"{where}[{i}]")]
    return []
