"""Low-rank adapters (LoRA, Hu et al. 2021) on a frozen network: the auxiliary ("fake") score of Algorithm 1 as the
teacher's own weights plus a trainable low-rank difference, instead of a second full copy.

The DPDM paper names its auxiliary model's memory as its limitation (Section 6): a full copy of the teacher with its
gradients and two Adam moments. The fake score starts as the teacher and only has to follow how the student's
outputs differ from the data, so here each targeted weight is

    W' = W + (α / r) · B A        B: (out, r), A: (r, fan_in), ΔW viewed as W's shape

with ``W`` the teacher's tensor itself (shared, frozen: held once in memory), ``A`` drawn as LoRA draws it and
``B = 0``, so that at initialisation ``W' = W`` exactly and the fake score equals the teacher to the bit (the
student's gradient is then exactly zero, as with a full copy). Only ``A`` and ``B`` are trained, saved in snapshots
and synchronised under DDP.

Mechanism: ``torch.nn.utils.parametrize`` puts the low-rank difference on the tensor named ``weight`` of each
targeted layer. That works for any layer that owns a ``weight`` parameter and reads it as ``self.weight`` in its
forward: ``nn.Linear``/``nn.Conv2d``, the EDM networks' own ``Linear``/``Conv2d`` (weights scaled, resampled, cast),
StyleGAN2's modulated convolutions, DiT's embeddings, whatever a plugin's backbone defines, with no per-class code.
peft's LoRA layers instead replace modules of known types (``nn.Linear``, ``nn.Conv2d``, ...) by wrappers that add
a side path; our layers are classes of their own (EDM's ``Conv2d`` fuses up/down-sampling into the convolution), so
each would need a hand-written peft layer, and peft brings transformers-sized dependencies. The price of the
parametrization is that a layer computes ``W'`` (one (out × r)·(r × fan_in) product, small next to the layer) on
each forward; when it trains, the backward computes it once more instead of autograd keeping every ``W'`` until then
(``RecomputeMerged``). ``benchmarks/train_step.py`` measures what adapters save and cost.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from typing import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import DpdmError

ALL = ("*",)  # every layer with a weight matrix


class LoraError(DpdmError):
    """Adapters that cannot be put on a network (targets matching no layer, a rank below 1)."""


class LowRank(nn.Module):
    """The parametrization ``W ↦ W + scale · (B A).view_as(W)`` of one weight (``scale = alpha / rank``).

    ``rank`` is capped at ``min(out, fan_in)`` (a higher rank adds nothing); ``A`` and ``B`` are float32 (float64
    for a float64 weight) whatever the weight's dtype, and the difference is cast to it. A parametrized ``weight`` is
    recomputed on every read, and layers read it more than once per call (EDM's ``Conv2d``: ``self.weight is not
    None``, then ``self.weight.to(dtype)``); so while the owning layer runs (``enter``/``exit``, hooks put on it by
    ``add_adapters``) the first merge is kept and returned again: one merge per call of the layer.
    """

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        out, fan_in = weight.shape[0], weight[0].numel()
        r = min(int(rank), out, fan_in)
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        a = torch.empty(r, fan_in, dtype=dtype)
        bound = 1 / math.sqrt(fan_in)  # LoRA's (and peft's) draw: kaiming_uniform with a = √5
        a.uniform_(-bound, bound, generator=generator)
        self.A = nn.Parameter(a.to(weight.device))  # (r, fan_in)
        self.B = nn.Parameter(torch.zeros(out, r, dtype=dtype, device=weight.device))  # (out, r): W' = W at first
        self.scale = float(alpha) / float(rank)
        self._depth, self._merged = 0, None  # within the owning layer's call: its merged weight

    def merge(self, weight: torch.Tensor) -> torch.Tensor:
        """``W + scale · (B A).view_as(W)``, computed."""
        delta = (self.B @ self.A).view(weight.shape)  # (out, fan_in) -> W's shape
        return weight + (self.scale * delta).to(weight.dtype)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self._merged is not None and self._merged[0] == torch.is_grad_enabled():
            return self._merged[1]
        merged = self.merge(weight)
        if torch.is_grad_enabled():
            merged._lora_source = (self, weight)  # what _pack needs to recompute it (see RecomputeMerged)
        if self._depth:
            self._merged = (torch.is_grad_enabled(), merged)
        return merged

    def enter(self, layer, args):
        """Forward pre-hook of the owning layer: keep the first merge of this call."""
        self._depth += 1

    def exit(self, layer, args, output):
        """Forward hook of the owning layer (always called): drop the kept merge when its outermost call ends."""
        self._depth -= 1
        if not self._depth:
            self._merged = None

    def extra_repr(self) -> str:
        return f"rank={self.A.shape[0]}, scale={self.scale:g}"


class _Merged:
    """What autograd keeps of a merged weight (or of a view of one, e.g. ``W'.t()``) in place of the tensor: the
    adapter and the frozen weight to remake it, and the view's geometry."""

    __slots__ = ("lowrank", "weight", "view")

    def __init__(self, lowrank: LowRank, weight: torch.Tensor, view: tuple):
        self.lowrank, self.weight, self.view = lowrank, weight, view


def _pack(tensor: torch.Tensor):
    base = tensor._base if tensor._base is not None else tensor
    source = getattr(base, "_lora_source", None)
    if source is None:
        return tensor
    return _Merged(*source, (tensor.size(), tensor.stride(), tensor.storage_offset()))


def _unpack(packed):
    if isinstance(packed, _Merged):
        with torch.no_grad():  # the same computation on the same (unchanged until the optimizer steps) tensors
            return packed.lowrank.merge(packed.weight).as_strided(*packed.view)
    return packed


class RecomputeMerged:
    """Forward hooks on an adapted model that keep autograd from holding each merged weight ``W'`` until the backward
    (in fp32 a layer's op saves ``W'`` itself: one more copy of all adapted weights per training forward, on top of
    what a full copy's step holds); the backward recomputes ``W'`` from ``W``, ``A`` and ``B`` (one small matmul per
    layer). Under autocast the op saves its low-precision cast of ``W'`` instead, as it saves a plain layer's, and
    nothing changes. Implemented with ``torch.autograd.graph.saved_tensors_hooks`` around the model's forward."""

    def __init__(self, model: nn.Module):
        self.active: list = []
        model.register_forward_pre_hook(self.enter)
        model.register_forward_hook(self.exit, always_call=True)

    def enter(self, module, args):
        hooks = torch.autograd.graph.saved_tensors_hooks(_pack, _unpack) if torch.is_grad_enabled() else None
        if hooks is not None:
            hooks.__enter__()
        self.active.append(hooks)

    def exit(self, module, args, output):
        hooks = self.active.pop()
        if hooks is not None:
            hooks.__exit__(None, None, None)


def layers(model: nn.Module) -> list[str]:
    """The names of ``model``'s layers an adapter can go on: those owning a ``weight`` parameter of two or more
    dimensions (linear, convolution and embedding weights; not normalisation gains)."""
    return [name for name, module in model.named_modules()
            if isinstance(module._parameters.get("weight"), nn.Parameter) and module._parameters["weight"].ndim >= 2]


def targeted(model: nn.Module, targets: Iterable[str] = ALL) -> list[str]:
    """The layers (``layers``) whose names match one of the glob ``targets`` (``fnmatch``: ``*`` also spans dots,
    e.g. ``*attn*``, ``model.enc.*``); a pattern that matches no such layer is an error naming some that exist."""
    names = layers(model)
    targets = list(targets)
    if not targets:
        raise LoraError("targets is empty; give glob patterns of layer names (e.g. ['*'] for every layer)")
    unmatched = [t for t in targets if not any(fnmatch.fnmatchcase(n, t) for n in names)]
    if unmatched:
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        raise LoraError(f"targets {', '.join(map(repr, unmatched))} match no layer with a weight matrix; the "
                        f"network's layers with one are {shown or 'none'}")
    return [n for n in names if any(fnmatch.fnmatchcase(n, t) for t in targets)]


def scale_numerator(rank: int, alpha: float | None = None) -> float:
    """The ``alpha`` of ``scale = alpha / rank``: as given, or ``rank`` (scale 1) when None."""
    return float(rank if alpha is None else alpha)


def add_adapters(model: nn.Module, rank: int, alpha: float | None = None, targets: Iterable[str] = ALL,
                 generator: torch.Generator | None = None, recompute: bool = True) -> list[str]:
    """Put a ``LowRank`` adapter on the weight of every targeted layer of ``model`` (in place), freeze everything
    else, and return the adapted layers' names. ``alpha``: the scale's numerator (default ``rank``: scale 1).
    ``recompute``: remake merged weights in the backward rather than keep them (``RecomputeMerged``)."""
    if int(rank) < 1:
        raise LoraError(f"rank must be at least 1, got {rank}")
    alpha = scale_numerator(rank, alpha)
    names = targeted(model, targets)
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in names:
        layer = modules[name]
        lowrank = LowRank(layer.weight, rank, alpha, generator)
        parametrize.register_parametrization(layer, "weight", lowrank)
        layer.register_forward_pre_hook(lowrank.enter)
        layer.register_forward_hook(lowrank.exit, always_call=True)
    if recompute:
        RecomputeMerged(model)
    return names


def adapted_copy(frozen: nn.Module, rank: int, alpha: float | None = None, targets: Iterable[str] = ALL,
                 generator: torch.Generator | None = None, recompute: bool = True) -> nn.Module:
    """A module that computes ``frozen``'s function through its very tensors (no copy of any parameter or buffer:
    the same storage) with adapters on the targeted weights (``add_adapters``). ``frozen`` is left as it was, except
    that its parameters no longer require grad (they are shared with a model whose base must not train)."""
    frozen.requires_grad_(False)
    shared = {id(t): t for t in (*frozen.parameters(), *frozen.buffers())}
    model = copy.deepcopy(frozen, memo=shared)  # new module objects around the same tensors
    add_adapters(model, rank, alpha, targets, generator, recompute)
    return model


def adapted_layers(model: nn.Module) -> list[str]:
    """The names of ``model``'s layers that carry an adapter."""
    return [name for name, m in model.named_modules() if parametrize.is_parametrized(m, "weight")
            and any(isinstance(p, LowRank) for p in m.parametrizations["weight"])]


def is_adapted(model: nn.Module) -> bool:
    return any(isinstance(m, LowRank) for m in model.modules())


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' ``A`` and ``B`` parameters, in module order."""
    return [p for m in model.modules() if isinstance(m, LowRank) for p in (m.A, m.B)]


def adapter_names(model: nn.Module) -> list[str]:
    """The adapters' parameter names in ``model.named_parameters()`` (``…parametrizations.weight.0.A``)."""
    ids = {id(p) for p in adapter_parameters(model)}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def frozen_tensors(model: nn.Module) -> dict[int, torch.Tensor]:
    """``{id: tensor}`` of an adapted model's frozen parameters and buffers (none for a model without adapters): a
    ``copy.deepcopy`` memo that makes a copy share them and copy only the adapters."""
    if not is_adapted(model):
        return {}
    adapters = {id(p) for p in adapter_parameters(model)}
    return {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in adapters}


class Adapters:
    """The adapters of an adapted model as a snapshot sees a module: ``state_dict()`` holds only them (``A``, ``B``
    of each layer, by their names in the model), ``load_state_dict`` loads exactly those. The frozen weights are
    the teacher's, which a run restores on its own."""

    def __init__(self, model: nn.Module):
        self.model = model

    def parameters(self):
        return iter(adapter_parameters(self.model))

    def state_dict(self) -> dict[str, torch.Tensor]:
        own = dict(self.model.named_parameters())
        return {name: own[name].detach() for name in adapter_names(self.model)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.model.named_parameters())
        names = adapter_names(self.model)
        missing, unexpected = sorted(set(names) - set(state)), sorted(set(state) - set(names))
        if missing or unexpected:
            raise RuntimeError(f"adapters: missing {missing[:3]}, unexpected {unexpected[:3]} (were the rank or the "
                               "targets changed?)")
        with torch.no_grad():
            for name in names:
                if own[name].shape != state[name].shape:
                    raise RuntimeError(f"adapter {name}: shape {tuple(state[name].shape)} in the snapshot, "
                                       f"{tuple(own[name].shape)} here (was the rank changed?)")
                own[name].copy_(state[name])


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain network ``model`` computes: ``merged_state_dict`` for an adapted model, else its
    own; what a denoiser checkpoint holds."""
    return merged_state_dict(model) if is_adapted(model) else model.state_dict()


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict as the plain network's: each adapted weight merged (``W + scale·B A``) under its own
    name (``….weight``), the adapters' and originals' keys gone; it loads into the network the adapters were put on
    (``load_state_dict``, strict)."""
    state = dict(model.state_dict())
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            prefix = f"{name}." if name else ""
            for key in [k for k in state if k.startswith(f"{prefix}parametrizations.weight.")]:
                del state[key]
            state[f"{prefix}weight"] = module.weight.detach()
    return state
