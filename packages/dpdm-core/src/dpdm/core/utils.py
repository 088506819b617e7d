"""Small helpers any module of dpdm-core may use (the contracts at the top included): they import nothing of
dpdm and no torch, so importing them is free."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Per-sample values (``B`` of them, e.g. σ of shape ``(B,)``) as ``(B, 1, ..., 1)`` with ``ndim`` dimensions,
    to broadcast over the item dimensions of a ``(B, ...)`` batch with ``ndim`` dimensions (a view, no copy)."""
    return x.reshape(-1, *([1] * (ndim - 1)))  # (B, 1, ..., 1)


def accepts(fn, *names: str, var_keyword: bool = False) -> bool:
    """Whether a component factory (or any callable) takes every keyword in ``names``: as named parameters, or,
    with ``var_keyword``, through ``**options`` too. False when its signature cannot be read."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    if var_keyword and any(p.kind is p.VAR_KEYWORD for p in params):
        return True
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return all(n in named for n in names)
