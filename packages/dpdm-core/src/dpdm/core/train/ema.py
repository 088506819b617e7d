"""Exponential moving average of a model's parameters with EDM's half-life rule
(Karras et al. 2022, App. F; ``training_loop.py``): the half-life in images is
h = min(halflife, rampup·cur_nimg), β = 0.5^(batch/h), p_ema ← β·p_ema + (1−β)·p.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .lora import frozen_tensors


class EMA:
    """Keeps ``self.model``, an EMA copy of ``model`` (parameters averaged, buffers copied). Of a model with low-rank
    adapters on a frozen network (``lora.py``) only the adapters are copied and averaged: the copy shares the frozen
    tensors."""

    def __init__(self, model: nn.Module, halflife_nimg: float, rampup_ratio: float | None = 0.05):
        self.model = copy.deepcopy(model, memo=frozen_tensors(model)).eval().requires_grad_(False)
        self.halflife_nimg = float(halflife_nimg)  # half-life of the average, in images
        self.rampup_ratio = rampup_ratio  # early half-life is at most this fraction of images seen (None: off)

    def beta(self, cur_nimg: int, batch: int) -> float:
        h = self.halflife_nimg
        if self.rampup_ratio is not None:
            h = min(h, self.rampup_ratio * cur_nimg)
        return 0.5 ** (batch / max(h, 1e-8))

    @torch.no_grad()
    def update(self, model: nn.Module, cur_nimg: int, batch: int) -> None:
        """Update after a step on ``batch`` images; ``cur_nimg`` counts images *before* this batch."""
        beta = self.beta(cur_nimg, batch)
        for p_ema, p in zip(self.model.parameters(), model.parameters()):
            if p_ema is not p:  # (a frozen tensor the two share is its own average)
                p_ema.copy_(p.detach().lerp(p_ema, beta))
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            if b_ema is not b:
                b_ema.copy_(b)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        self.model.load_state_dict(state)
