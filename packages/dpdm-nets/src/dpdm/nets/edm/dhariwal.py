"""``DhariwalUNet``: the ADM UNet as used by EDM (NVlabs/edm ``DhariwalUNet``; Dhariwal & Nichol 2021).

Built from ``shared/edm_ref/README.md`` §1, §3 and §7 so that ``edm-imagenet-64x64-cond-adm.pkl``
loads with identical keys, order and shapes (295,899,267 parameters). Differences from SongUNet:
level 0's conv goes to ``model_channels·channel_mult[0]``; blocks use scale/shift conditioning
(``adaptive_scale``), skip_scale 1, GroupNorm eps 1e-5 and 64 channels per attention head;
attention sits in *every* block at ``attn_resolutions`` (plus ``in0``); the class label is added
after ``map_layer1``; no half swap of the noise embedding; output ``out_conv(silu(out_norm(x)))``.

``use_fp16``: on CUDA the body runs in ``fp16_dtype`` (weights stay fp32 and are cast per layer,
the attention softmax runs in fp32, the mapping network sees the fp32 noise labels) and the
output is returned as float32, as EDM's preconditioning does with ``use_fp16``. On CPU it runs
in the input's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..embeddings import PositionalEmbedding
from ..shapes import at_least
from .layers import Conv2d, GroupNorm, Linear, UNetBlock

FP16_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class DhariwalUNet(nn.Module):
    """ADM backbone ``F(x, noise_labels, class_labels=None, augment_labels=None)`` (NVlabs/edm).

    The arguments and their defaults are those of the official constructor, plus ``use_fp16`` and
    ``fp16_dtype`` ("float16" or "bfloat16"), which EDM keeps on its preconditioning wrapper.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 192, channel_mult: Sequence[int] = (1, 2, 3, 4),
                 channel_mult_emb: int = 4, num_blocks: int = 3, attn_resolutions: Sequence[int] = (32, 16, 8),
                 dropout: float = 0.10, label_dropout: float = 0.0, use_fp16: bool = False,
                 fp16_dtype: str = "float16"):
        super().__init__()
        if fp16_dtype not in FP16_DTYPES:
            raise ValueError(f"fp16_dtype must be one of {tuple(FP16_DTYPES)}, got {fp16_dtype!r}")
        channel_mult = [int(m) for m in channel_mult]  # channel multiplier per resolution level
        attn_resolutions = [int(r) for r in attn_resolutions]  # resolutions with self-attention
        if img_resolution % (1 << (len(channel_mult) - 1)):
            raise ValueError(f"img_resolution {img_resolution} is not divisible by 2^{len(channel_mult) - 1} "
                             f"({len(channel_mult)} levels)")
        at_least(1, model_channels=model_channels, channel_mult=channel_mult, channel_mult_emb=channel_mult_emb)
        at_least(0, augment_dim=augment_dim, num_blocks=num_blocks)

        self.img_resolution = int(img_resolution)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.label_dim = int(label_dim)  # width of one-hot labels; 0: unconditional
        self.augment_dim = int(augment_dim)  # width of augmentation labels; 0: none
        self.label_dropout = float(label_dropout)  # probability of dropping a row's labels in training
        self.use_fp16 = bool(use_fp16)  # run the body in fp16_dtype on CUDA
        self.fp16_dtype = fp16_dtype
        emb_channels = model_channels * channel_mult_emb  # width of the embedding fed to every block
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)  # exactly zero
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init,
                            init_zero=init_zero)

        # Mapping: noise (+ augmentation) -> emb_channels; labels are added after map_layer1.
        self.map_noise = PositionalEmbedding(model_channels, endpoint=False, freq_dtype=torch.float32)
        self.map_augment = (Linear(self.augment_dim, model_channels, bias=False, **init_zero)
                            if self.augment_dim else None)
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(self.label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(self.label_dim))  # std 1
                          if self.label_dim else None)

        # Encoder: every output is saved as a skip.
        self.enc = nn.ModuleDict()
        cout = self.in_channels
        skips = []  # channels of every saved skip, in order
        for level, mult in enumerate(channel_mult):
            res = self.img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            skips.append(cout)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
                skips.append(cout)

        # Decoder.
        self.dec = nn.ModuleDict()
        self._takes_skip = set()  # decoder blocks that concatenate a popped encoder skip to their input
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = self.img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult  # input is [x, skip]
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
                self._takes_skip.add(f"{res}x{res}_block{idx}")
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, self.out_channels, kernel=3, **init_zero)

    def body_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the UNet body runs in: ``fp16_dtype`` with ``use_fp16`` on CUDA, else the input's."""
        return FP16_DTYPES[self.fp16_dtype] if self.use_fp16 and x.device.type == "cuda" else x.dtype

    def embed(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
              augment_labels: torch.Tensor | None = None, batch: int | None = None) -> torch.Tensor:
        """The block embedding ``silu(map_layer1(silu(map_layer0(map_noise + augment))) + map_label(onehot))``.

        Missing labels count as zeros (the label term vanishes: map_label has no bias). ``batch`` is
        the images' batch size, the number of label-dropout draws (default: the labels' rows).
        """
        emb = self.map_noise(noise_labels)  # (B, model_channels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))  # (B, emb_channels)
        emb = self.map_layer1(emb)
        if self.map_label is not None and class_labels is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                batch = batch if batch is not None else labels.shape[0]  # the images' batch size
                keep = torch.rand([batch, 1], device=labels.device) >= self.label_dropout  # (B, 1)
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels)
        return F.silu(emb)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.body_dtype(x)
        low_precision = dtype != x.dtype
        x = x.to(dtype)
        emb = self.embed(noise_labels, class_labels, augment_labels, batch=x.shape[0])  # (B, emb_channels)

        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for name, block in self.dec.items():
            if name in self._takes_skip:
                x = torch.cat([x, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            x = block(x, emb)
        x = self.out_conv(F.silu(self.out_norm(x)))  # (B, out_channels, H, W)
        return x.to(torch.float32) if low_precision else x
