"""A trained model's side of one optimizer step: ``Trainable`` owns the raw module, its DDP wrapper, Adam, the fp16
loss scaler, the learning-rate warm-up (EDM's), gradient clipping and the counters; ``Job`` is what the ``Trainer``
(``engine.py``) drives, and ``job_state``/``load_job_state`` are a job's non-weight state in snapshots."""

from __future__ import annotations

import contextlib
from typing import Callable, Protocol

import torch
from torch import nn

from ..errors import DpdmError
from .distributed import Dist
from .precision import Precision, backward, guarded_step

MicroLoss = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def warmup_lr(lr: float, nimg: int, warmup_nimg: float) -> float:
    """EDM's linear learning-rate warm-up in images: lr · min(nimg / warmup_nimg, 1) (none when 0)."""
    return lr * min(nimg / warmup_nimg, 1.0) if warmup_nimg > 0 else lr


class Trainable:
    """One trained model and everything one optimizer step of it needs.

    Args:
        name: the model's name in stats, logs and snapshots (``model``, ``student``, ``fake``).
        module: the raw model; moved to ``dist.device``, set to train mode with gradients on.
        lr, betas, eps: Adam (EDM: betas (0.9, 0.999), eps 1e-8).
        warmup_nimg: linear learning-rate warm-up length in images (0: none).
        grad_clip: clip the global gradient norm to this value (None: no clipping).
        precision: forward precision and (fp16) loss scaling.
        dist: the process group; with more than one rank the module is wrapped in its own
            ``DistributedDataParallel`` (``wrapped``); ``module`` stays the raw model, to be called
            without gradients by the other model's steps.
        find_unused_parameters: DDP's option, for networks whose forward skips parameters.
        params: the parameters to train, when not all of the module's (a fake score's low-rank adapters,
            ``lora.py``): only they get gradients, Adam states and, under DDP, synchronisation; the module's other
            parameters and buffers are left frozen and are neither broadcast nor synced by DDP.
    """

    def __init__(self, name: str, module: nn.Module, *, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 warmup_nimg: float = 0.0, grad_clip: float | None = None, precision: Precision | None = None,
                 dist: Dist | None = None, find_unused_parameters: bool = False,
                 params: list[nn.Parameter] | None = None):
        self.name = name
        self.dist = dist or Dist()
        self.precision = precision or Precision("fp32", self.dist.device)
        if self.precision.device.type != self.dist.device.type:
            raise DpdmError(f"{name}: the precision is set up for {self.precision.device} but the model trains on "
                            f"{self.dist.device}; build Precision(mode, dist.device)")
        self.module = module.to(self.dist.device).train()
        if params is None:
            self.params = list(self.module.requires_grad_(True).parameters())
        else:
            self.params = _own(self.module, params, name)
        self.wrapped = self.module
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel

            if params is not None:  # DDP's own (long-standing, static) way to leave tensors out of its sync
                trained = {id(p) for p in self.params}
                frozen = [n for n, p in self.module.named_parameters() if id(p) not in trained]
                DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                    self.module, frozen + [n for n, _ in self.module.named_buffers()])
            ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(self.module, device_ids=ids,
                                                   find_unused_parameters=find_unused_parameters)
        self.lr = float(lr)  # base learning rate
        self.warmup_nimg = float(warmup_nimg)
        self.grad_clip = grad_clip
        self.optimizer = torch.optim.Adam(self.params, lr=self.lr, betas=tuple(betas), eps=eps)
        self.scaler = self.precision.grad_scaler(self.module)  # fp16, or a network with fp16 parts
        self.nimg = 0  # images of the applied steps, all ranks
        self.steps = 0  # applied optimizer steps
        self.skipped = 0  # steps skipped for a non-finite loss or gradient
        self.consecutive = 0  # skipped steps since the last applied one

    def step(self, micro_loss: MicroLoss, next_batch: Callable[[], tuple], accum: int = 1) -> dict:
        """One optimizer step over ``accum`` micro-batches from ``next_batch()``.

        ``micro_loss(model, x0, labels)`` returns per-sample losses ``(B,)``; ``model`` is the module to
        differentiate (the DDP wrapper under DDP). Returns ``loss`` (mean over the micro-batches, this
        rank), ``grad_norm`` (before clipping), ``lr``, ``images`` (all ranks) and ``applied`` (False: skipped).
        """
        lr = warmup_lr(self.lr, self.nimg, self.warmup_nimg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        losses, images = [], 0
        for i in range(accum):
            x0, labels = next_batch()
            sync = i == accum - 1 or self.wrapped is self.module
            with contextlib.nullcontext() if sync else self.wrapped.no_sync():
                with self.precision.autocast():
                    loss = micro_loss(self.wrapped, x0, labels).mean()
                backward(loss / accum, self.scaler)
            losses.append(loss.detach().float())
            images += x0.shape[0]
            del loss  # the graph is gone after backward; drop the last reference too
        loss = torch.stack(losses).mean()
        applied, norm = guarded_step(self.optimizer, self.params, scaler=self.scaler,
                                     grad_clip=self.grad_clip, loss_finite=bool(torch.isfinite(loss)),
                                     dist=self.dist)
        images *= self.dist.world_size
        if applied:
            self.nimg += images
            self.steps += 1
            self.consecutive = 0
        else:
            self.skipped += 1
            self.consecutive += 1
        return {"loss": float(loss), "grad_norm": norm, "lr": lr, "images": images, "applied": applied}

    def state_dict(self) -> dict:
        """Optimizer, loss scaler and counters (the weights go to the snapshot's safetensors file)."""
        return {"optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "nimg": self.nimg, "steps": self.steps, "skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.nimg, self.steps = int(state["nimg"]), int(state["steps"])
        self.skipped, self.consecutive = int(state["skipped"]), int(state["consecutive"])


def _own(module: nn.Module, params: list[nn.Parameter], name: str) -> list[nn.Parameter]:
    """``params``, checked to be ``module``'s own, switched to require grad."""
    own = {id(p) for p in module.parameters()}
    if not params or any(id(p) not in own for p in params):
        raise DpdmError(f"{name}: the parameters to train must be some of the model's own (got {len(params)})")
    return [p.requires_grad_(True) for p in params]


class Job(Protocol):
    """What the ``Trainer`` drives: one training iteration at a time (``teacher.TeacherJob``,
    ``distill.DistillJob``)."""

    phase: str  # "teacher" or "student": names the snapshots' phase and the log records
    parts: dict[str, Trainable]  # the trained models, by name

    @property
    def model(self) -> nn.Module:
        """The model to evaluate (the EMA if kept)."""

    @property
    def nimg(self) -> int:
        """Images shown to the main model (the one the EMA follows)."""

    def iteration(self, next_batch: Callable[[], tuple], generator: torch.Generator | None) -> dict:
        """One training iteration; returns float stats."""

    def weights(self) -> dict[str, nn.Module]:
        """Every module a snapshot keeps, by name (the trained ones, their EMA)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class EvaluatedModel:
    """What both jobs share about the model they hand to evaluation: ``main`` (the ``Trainable`` the EMA follows:
    the teacher, or the student) and ``ema`` (an ``EMA`` or None)."""

    main: Trainable
    ema: object | None

    @property
    def model(self) -> nn.Module:
        """The model to evaluate: the EMA if kept, else the trained weights (the raw module, never the DDP wrapper)."""
        return self.ema.model if self.ema is not None else self.main.module

    @property
    def nimg(self) -> int:
        """Images shown to the main model (all ranks)."""
        return self.main.nimg


def job_state(job: Job) -> dict:
    """The non-weight state of a job's trained models: optimizers, loss scalers, counters."""
    return {"parts": {name: part.state_dict() for name, part in job.parts.items()}}


def load_job_state(job: Job, state: dict) -> None:
    missing = sorted(set(job.parts) - set(state["parts"]))
    if missing:
        raise DpdmError(f"the snapshot has no optimizer state for {', '.join(missing)}; was it written by "
                        "another kind of job?")
    for name, part in job.parts.items():
        part.load_state_dict(state["parts"][name])
