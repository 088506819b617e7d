"""Every random state of one rank, for bit-exact resume: the training generator, torch's global CPU (and CUDA)
generators, numpy and ``random``, stored as tensors and plain values that ``torch.load(weights_only=True)`` reads."""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state(generator: torch.Generator | None, device: torch.device) -> dict:
    """This rank's random state: the training generator, torch's global CPU generator (and that of ``device``
    if it is a GPU), numpy and ``random``, as tensors and plain values (``torch.load(weights_only=True)``
    reads them)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"generator": generator.get_state() if generator is not None else None,
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def set_rng_state(state: dict, generator: torch.Generator | None, device: torch.device) -> None:
    """Restore what ``rng_state`` saved."""
    if generator is not None and state["generator"] is not None:
        generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
