"""Shape checks shared by the image backbones (pure Python: importable without torch)."""

from __future__ import annotations


def square_image(shape, who: str) -> tuple[int, int]:
    """``(channels, resolution)`` of a ``(C, H, W)`` item shape with ``H == W``; ``ValueError`` otherwise."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"{who} needs square (C, H, W) images with H == W, got shape {shape}")
    return shape[0], shape[1]
