"""Mixed precision and the guarded optimizer step.

``Precision("bf16", device)`` runs forward passes under ``torch.autocast`` in bfloat16 (CPU and CUDA), with
fp32 weights, gradients and optimizer state; ``"fp16"`` does the same in float16 with a ``torch.amp.GradScaler``
per optimizer (dynamic loss scaling: the loss is multiplied by the scale before ``backward``, gradients are
unscaled before clipping, and a step whose gradients overflow is skipped while the scale backs off);
``"fp32"`` is plain float32.

``guarded_step`` is the one sequence every optimizer step of the engine ends with: unscale (fp16), the
gradient norm (clipped to ``grad_clip`` if given), the finite check, then either the optimizer step or a
skip, and in both cases ``zero_grad(set_to_none=True)`` so the model holds no gradients between its steps.
A non-finite loss or gradient norm skips the step: the parameters and the optimizer state stay as they
were. Under DDP the decision is all-reduced, so that all ranks skip together.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from ..errors import DpdmError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """The numeric precision of forward passes: ``fp32``, ``bf16`` or ``fp16`` (the latter with loss scaling)."""

    def __init__(self, mode: str = "fp32", device: str | torch.device = "cpu"):
        if mode not in DTYPES:
            raise DpdmError(f"unknown precision {mode!r}; choose one of {', '.join(DTYPES)}")
        self.mode = mode
        self.device = torch.device(device)
        self.dtype = DTYPES[mode]
        if mode == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise DpdmError(f"precision 'bf16' is not supported by {torch.cuda.get_device_name(self.device)}; "
                            "use 'fp16' (with loss scaling) or 'fp32'")
        if mode == "fp16" and not _fp16_supported(self.device):
            raise DpdmError(f"precision 'fp16' needs autocast and a GradScaler on {self.device.type}, which this "
                            f"torch {torch.__version__} lacks; use 'bf16' or 'fp32' there (fp16 is meant for GPUs)")

    def autocast(self):
        """The context for forward passes (and losses): autocast in ``bf16``/``fp16``, nothing in ``fp32``."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self, module: nn.Module | None = None) -> torch.amp.GradScaler | None:
        """A new loss scaler for one optimizer: with ``fp16``, or whenever ``module`` runs any part in float16
        itself (``runs_fp16``, e.g. EDM's ADM body with ``use_fp16``), whatever the mode: fp16 gradients need
        loss scaling (EDM scales the loss for its fp16 networks); None otherwise."""
        if self.mode == "fp16" or (module is not None and runs_fp16(module, self.device)):
            return torch.amp.GradScaler(self.device.type)
        return None

    def __repr__(self) -> str:
        return f"Precision({self.mode!r}, {str(self.device)!r})"


def runs_fp16(module: nn.Module, device: str | torch.device) -> bool:
    """Whether ``module`` runs any part of its forward in float16 on ``device`` by its own choice: a submodule with
    ``use_fp16`` set and ``fp16_dtype`` float16 (the convention of dpdm-nets' ``edm-dhariwal``, whose body runs
    in fp16 on CUDA only; bfloat16 needs no loss scaling)."""
    if torch.device(device).type != "cuda":
        return False
    return any(getattr(m, "use_fp16", False) and str(getattr(m, "fp16_dtype", "float16")) in ("float16", "torch.float16")
               for m in module.modules())


def frozen_call():
    """The context for calling a model that is not being trained inside another model's autocast forward:
    autocast's weight cache off, so the bf16/fp16 copies of its trainable weights are not kept until the
    outer context ends (they would be, because those weights require grad). Nothing outside autocast."""
    for device_type in ("cuda", "cpu"):
        if torch.is_autocast_enabled(device_type):
            return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=False)
    return contextlib.nullcontext()


def _fp16_supported(device: torch.device) -> bool:
    try:
        torch.amp.GradScaler(device.type)
        with torch.autocast(device.type, dtype=torch.float16):
            pass
    except (AttributeError, RuntimeError, ValueError, AssertionError, TypeError):  # AttributeError: torch < 2.3
        return False
    return True


def backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    """``loss.backward()``, through the loss scaler when there is one."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


def guarded_step(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], *, scaler=None,
                 grad_clip: float | None = None, loss_finite: bool = True, dist=None) -> tuple[bool, float]:
    """Finish one optimizer step whose gradients are in ``params``; returns ``(applied, grad_norm)``.

    The gradient norm is the global L2 norm of the (unscaled) gradients before clipping. The step is
    skipped when the loss or the norm is NaN/Inf on any rank (``dist``); for fp16 the scaler then backs
    off its scale as its own skip logic does. Gradients are always dropped afterwards (set to None).
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    grads = [p for p in params if p.grad is not None]
    norm = nn.utils.clip_grad_norm_(grads, grad_clip if grad_clip else math.inf, error_if_nonfinite=False)
    norm = float(norm)
    bad = not (loss_finite and math.isfinite(norm))
    if dist is not None:
        bad = dist.any(bad)
    if not bad:
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
    if scaler is not None:
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return not bad, norm
