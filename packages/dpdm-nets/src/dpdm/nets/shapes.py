"""Shape and size checks shared by the backbones (pure Python: importable without torch)."""

from __future__ import annotations


def square_image(shape, who: str) -> tuple[int, int]:
    """``(channels, resolution)`` of a ``(C, H, W)`` item shape with ``H == W``; ``ValueError`` otherwise."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"{who} needs square (C, H, W) images with H == W, got shape {shape}")
    return shape[0], shape[1]


def at_least(low: int, prefix: str = "", /, **sizes) -> None:
    """Raise ``ValueError`` naming every size below ``low`` (``hidden must be at least 1, got -5``), so that a
    bad width fails with the option's name rather than as a torch error about a negative dimension. A list is
    checked entry by entry (``channel_mult: every entry must be at least 1, got [0, 2]``)."""
    problems = []
    for name, value in sizes.items():
        if isinstance(value, (list, tuple)):
            if any(v < low for v in value):
                problems.append(f"{name}: every entry must be at least {low}, got {list(value)}")
        elif value < low:
            problems.append(f"{name} must be at least {low}, got {value}")
    if problems:
        raise ValueError(prefix + "; ".join(problems))
