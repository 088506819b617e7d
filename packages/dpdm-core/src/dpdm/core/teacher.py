"""Teacher training: EDM's denoising objective (Karras et al. 2022, Eq. 2; ``training/loss.py``),
one step at a time so that any loop (ours, a user's) can drive it."""

from __future__ import annotations

import torch
from torch import nn

from .ema import EMA
from .losses import EDMLoss


class TeacherTrainer:
    """Adam on the EDM loss, averaged over the batch (summed over pixels as in EDM), with an
    optional EMA of the weights and gradient clipping.

    ``denoiser`` is a preconditioned denoiser ``D(x, sigma, class_labels=None)``.
    """

    def __init__(self, denoiser: nn.Module, loss: EDMLoss, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), ema_halflife_nimg: float | None = None,
                 ema_rampup: float | None = 0.05, grad_clip: float | None = None, lr_warmup_nimg: float = 0.0):
        self.denoiser = denoiser.train()
        self.loss = loss
        self.lr = float(lr)  # base learning rate
        self.lr_warmup_nimg = float(lr_warmup_nimg)  # linear warm-up length in images (EDM: lr_rampup_kimg)
        self.opt = torch.optim.Adam(denoiser.parameters(), lr=lr, betas=tuple(betas), eps=1e-8)
        self.ema = EMA(denoiser, ema_halflife_nimg, ema_rampup) if ema_halflife_nimg else None
        self.grad_clip = grad_clip
        self.nimg = 0

    @property
    def model(self) -> nn.Module:
        """The model to evaluate: the EMA if kept, else the trained weights."""
        return self.ema.model if self.ema is not None else self.denoiser

    def step(self, x0: torch.Tensor, class_labels=None, generator=None) -> dict:
        batch = x0.shape[0]
        if self.lr_warmup_nimg > 0:
            for group in self.opt.param_groups:
                group["lr"] = self.lr * min(self.nimg / self.lr_warmup_nimg, 1.0)
        loss = self.loss(self.denoiser, x0, class_labels=class_labels, generator=generator).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in self.denoiser.parameters():
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)
        if self.grad_clip:
            nn.utils.clip_grad_norm_(self.denoiser.parameters(), self.grad_clip)
        self.opt.step()
        if self.ema is not None:
            self.ema.update(self.denoiser, self.nimg, batch)
        self.nimg += batch
        return {"loss": float(loss.detach())}
