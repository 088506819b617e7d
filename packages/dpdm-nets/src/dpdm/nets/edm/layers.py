"""Layers of the official EDM networks (Karras et al. 2022, NVlabs/edm ``training/networks.py``).

Written from the facts in ``shared/edm_ref/README.md`` §1 and §7 so that official checkpoints
load into :class:`~dpdm.nets.edm.songunet.SongUNet` and :class:`~dpdm.nets.edm.dhariwal.DhariwalUNet`
with the same state_dict keys, order and shapes, and run the same floating-point operations:

- parameters are created in the same order with the same random draws, so the registration
  order (and with it the state_dict order) matches;
- every layer casts its fp32 weights to the dtype of its input, so the UNet body can run in
  fp16/bf16 while the weights stay fp32;
- biases are added after the matmul/convolution, not fused into it, as EDM does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

INIT_MODES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """A fresh random tensor for EDM's unified initialisation (README §7, "Weight init").

    - ``xavier_uniform``: √(6/(fan_in+fan_out))·U(−1, 1)
    - ``xavier_normal``: √(2/(fan_in+fan_out))·N(0, 1)
    - ``kaiming_uniform``: √(3/fan_in)·U(−1, 1)
    - ``kaiming_normal``: √(1/fan_in)·N(0, 1) (a gain of 1, not PyTorch's 2)

    The draws are ``rand(shape)·2 − 1`` and ``randn(shape)``, so a seeded construction makes the
    same values as EDM's.
    """
    shape = [int(s) for s in shape]
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init mode {mode!r}; expected one of {', '.join(INIT_MODES)}")


class Linear(nn.Module):
    """Fully connected layer ``y = x Wᵀ + b`` with EDM's initialisation (NVlabs/edm ``Linear``).

    ``weight`` is ``weight_init(mode)·init_weight`` and ``bias`` is ``weight_init(mode)·init_bias``
    (the bias is drawn even when ``init_bias`` is 0, as EDM does, which keeps seeded draws aligned).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_mode: str = "kaiming_normal",
                 init_weight: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        fans = dict(mode=init_mode, fan_in=self.in_features, fan_out=self.out_features)
        self.weight = nn.Parameter(weight_init([self.out_features, self.in_features], **fans) * init_weight)
        self.bias = nn.Parameter(weight_init([self.out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x @ self.weight.to(x.dtype).t()  # (..., out_features)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype)
        return x


def make_resample_filter(taps: Sequence[float]) -> torch.Tensor:
    """The 2-D resampling filter ``outer(r, r) / sum(r)²`` as a ``(1, 1, k, k)`` float32 tensor (README §7).

    ``[1, 1]`` gives a 2x2 filter of 0.25 (box average / nearest neighbour), ``[1, 3, 3, 1]`` a 4x4 binomial.
    """
    r = torch.as_tensor(list(taps), dtype=torch.float32)
    return (torch.outer(r, r) / r.sum().square())[None, None]  # (1, 1, k, k)


class Conv2d(nn.Module):
    """2-D convolution with optional 2x up/downsampling by a fixed FIR filter (NVlabs/edm ``Conv2d``).

    - ``kernel=0`` gives a pure resampling layer without parameters.
    - The filter is a buffer ``resample_filter`` (``(1, 1, k, k)``), in the state_dict only when
      ``up`` or ``down``; otherwise it is registered as ``None``.
    - Unfused (default): resample first (depthwise, stride 2, padding ``(k−1)//2``; ``up`` uses a
      transposed conv with 4× the filter), then the ``kernel``x``kernel`` conv with "same" padding.
    - Fused (``fused_resample``, used only by NCSN++'s ``aux_residual``): down convolves first with
      padding ``kernel//2 + (k−1)//2`` and then filters with stride 2 and no padding; up filters
      first with padding ``max(f_pad − w_pad, 0)`` and convolves with ``max(w_pad − f_pad, 0)``.
      The two paths differ at the borders.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: Sequence[float] = (1, 1), fused_resample: bool = False,
                 init_mode: str = "kaiming_normal", init_weight: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        if up and down:
            raise ValueError("Conv2d cannot both upsample and downsample")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel = int(kernel)  # 0: no weights, resampling only
        self.up, self.down, self.fused_resample = bool(up), bool(down), bool(fused_resample)
        k = self.kernel
        fans = dict(mode=init_mode, fan_in=self.in_channels * k * k, fan_out=self.out_channels * k * k)
        weight = weight_init([self.out_channels, self.in_channels, k, k], **fans) * init_weight if k else None
        self.weight = nn.Parameter(weight) if k else None
        self.bias = nn.Parameter(weight_init([self.out_channels], **fans) * init_bias) if k and bias else None
        self.register_buffer("resample_filter", make_resample_filter(resample_filter) if up or down else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0

        if self.fused_resample and self.up and w is not None:
            f_up = (f * 4).tile([self.in_channels, 1, 1, 1])  # (C_in, 1, k, k)
            x = F.conv_transpose2d(x, f_up, groups=self.in_channels, stride=2,
                                   padding=max(f_pad - w_pad, 0))  # (B, C_in, ~2H, ~2W)
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))  # (B, C_out, 2H, 2W)
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)  # (B, C_out, H + 2 f_pad, W + 2 f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels,
                         stride=2)  # (B, C_out, H/2, W/2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, (f * 4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels,
                                       stride=2, padding=f_pad)  # (B, C_in, 2H, 2W)
            if self.down:
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2,
                             padding=f_pad)  # (B, C_in, H/2, W/2)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)  # (B, C_out, H', W')
        if b is not None:
            x = x + b.reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with ``min(num_groups, C // min_channels_per_group)`` groups (NVlabs/edm ``GroupNorm``).

    EDM uses eps 1e-6 in SongUNet and 1e-5 (the default here) in ADM.
    """

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_channels = int(num_channels)
        self.num_groups = min(int(num_groups), self.num_channels // int(min_channels_per_group))
        if self.num_groups < 1 or self.num_channels % self.num_groups:
            raise ValueError(f"GroupNorm: {self.num_channels} channels cannot be split into "
                             f"min({num_groups}, {self.num_channels} // {min_channels_per_group}) = "
                             f"{self.num_groups} groups")
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(self.num_channels))
        self.bias = nn.Parameter(torch.zeros(self.num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype),
                            bias=self.bias.to(x.dtype), eps=self.eps)


class _AttentionWeights(torch.autograd.Function):
    """``softmax_k(Σ_c q[n,c,q]·k[n,c,k] / √C)`` computed in (at least) float32, returned in q's dtype.

    Only q, k and the (low-precision) weights are saved for backward, which recomputes in float32,
    so fp16/bf16 activations keep their memory savings (as EDM's ``AttentionOp``).
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        compute = torch.promote_types(q.dtype, torch.float32)
        scale = math.sqrt(k.shape[1])  # √(channels per head)
        logits = torch.einsum("ncq,nck->nqk", q.to(compute), (k / scale).to(compute))  # (N, HW_q, HW_k)
        w = logits.softmax(dim=2).to(q.dtype)
        ctx.save_for_backward(q, k, w)
        return w

    @staticmethod
    def backward(ctx, dw: torch.Tensor):
        q, k, w = ctx.saved_tensors
        compute = torch.promote_types(q.dtype, torch.float32)
        scale = math.sqrt(k.shape[1])
        # Softmax backward, w·(dw − Σ_k dw·w), by torch's own kernel so gradients match EDM's bit for bit.
        dlogits = torch._softmax_backward_data(dw.to(compute), w.to(compute), 2, compute)  # (N, HW_q, HW_k)
        dq = torch.einsum("nck,nqk->ncq", k.to(compute), dlogits).to(q.dtype) / scale  # (N, C, HW_q)
        dk = torch.einsum("ncq,nqk->nck", q.to(compute), dlogits).to(k.dtype) / scale  # (N, C, HW_k)
        return dq, dk


def attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Attention weights ``w[n, q, k]`` for ``q, k`` of shape ``(N, C, HW)``; the softmax runs in float32.

    Inputs of float64 are computed in float64 (EDM would round them through float32).
    """
    return _AttentionWeights.apply(q, k)  # (N, HW, HW)


class UNetBlock(nn.Module):
    """The residual block shared by DDPM++, NCSN++ and ADM (NVlabs/edm ``UNetBlock``, README §7).

    1. ``h = conv0(silu(norm0(x)))``, with the up/downsampling inside conv0;
    2. ``p = affine(emb)``; ADM (``adaptive_scale``): ``scale, shift = p.chunk(2)`` and
       ``h = silu(shift + norm1(h)·(scale + 1))``; Song: ``h = silu(norm1(h + p))``;
    3. ``h = conv1(dropout(h))`` (the only dropout);
    4. ``h = (h + skip(x)) · skip_scale``, ``skip`` existing when the channels change or the block
       resamples (a 1x1 conv if ``resample_proj`` or the channels change, else resampling only);
    5. with attention: ``h = (proj(attn(norm2(h))) + h) · skip_scale`` (skip_scale applied again).

    Sub-modules are registered in the order norm0, conv0, affine, norm1, conv1, skip, norm2, qkv,
    proj, which is the order of the official state_dict.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
                 attention: bool = False, num_heads: int | None = None, channels_per_head: int = 64,
                 dropout: float = 0.0, skip_scale: float = 1.0, eps: float = 1e-5,
                 resample_filter: Sequence[float] = (1, 1), resample_proj: bool = False, adaptive_scale: bool = True,
                 init: dict | None = None, init_zero: dict | None = None, init_attn: dict | None = None):
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_zero) if init_zero is not None else dict(init_weight=0)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.emb_channels = int(emb_channels)
        # Attention heads: 0 means no attention; ADM uses out_channels // channels_per_head (0 below 64 channels).
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = int(num_heads) if num_heads is not None else self.out_channels // channels_per_head
        self.dropout = float(dropout)  # probability, applied before conv1 only
        self.skip_scale = float(skip_scale)  # √0.5 for Song, 1 for ADM
        self.adaptive_scale = bool(adaptive_scale)  # ADM: scale/shift from emb; Song: add emb

        self.norm0 = GroupNorm(self.in_channels, eps=eps)
        self.conv0 = Conv2d(self.in_channels, self.out_channels, kernel=3, up=up, down=down,
                            resample_filter=resample_filter, **init)
        self.affine = Linear(self.emb_channels, self.out_channels * (2 if self.adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(self.out_channels, eps=eps)
        self.conv1 = Conv2d(self.out_channels, self.out_channels, kernel=3, **init_zero)

        self.skip = None
        if self.out_channels != self.in_channels or up or down:
            kernel = 1 if resample_proj or self.out_channels != self.in_channels else 0
            self.skip = Conv2d(self.in_channels, self.out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)

        if self.num_heads:
            if self.out_channels % self.num_heads:
                raise ValueError(f"{self.out_channels} channels cannot be split into {self.num_heads} heads")
            self.norm2 = GroupNorm(self.out_channels, eps=eps)
            self.qkv = Conv2d(self.out_channels, self.out_channels * 3, kernel=1,
                              **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(self.out_channels, self.out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))  # (B, C_out, H', W')

        params = self.affine(emb)[:, :, None, None].to(x.dtype)  # (B, C_out or 2 C_out, 1, 1)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)  # 2 x (B, C_out, 1, 1), scale first
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))

        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x + (self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale

        if self.num_heads:
            x = self.attention(x)
        return x

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """``(proj(attn(norm2(x))) + x) · skip_scale`` with q/k/v interleaved per channel in ``qkv``.

        ``qkv`` channel ``(head·C/heads + c)·3 + j`` holds q (j=0), k (j=1) or v (j=2) of channel c.
        """
        b, c, h, w = x.shape
        heads = self.num_heads
        qkv = self.qkv(self.norm2(x)).reshape(b * heads, c // heads, 3, h * w)  # (B·heads, C/heads, 3, HW)
        q, k, v = qkv.unbind(2)  # 3 x (B·heads, C/heads, HW)
        weights = attention_weights(q, k)  # (B·heads, HW_q, HW_k)
        a = torch.einsum("nqk,nck->ncq", weights, v)  # (B·heads, C/heads, HW_q)
        x = self.proj(a.reshape(b, c, h, w)) + x  # (B, C, H, W)
        return x * self.skip_scale
