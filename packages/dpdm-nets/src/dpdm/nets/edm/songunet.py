"""``SongUNet``: the DDPM++ and NCSN++ UNets as used by EDM (NVlabs/edm ``SongUNet``; Song et al. 2021).

Built from ``shared/edm_ref/README.md`` §1 and §7 so that the official EDM checkpoints
(``edm-{cifar10,ffhq,afhqv2}-*-{vp,ve}.pkl``) load with identical keys, order and shapes:

- DDPM++ ("vp" pickles): ``embedding_type='positional', encoder_type='standard', channel_mult_noise=1,
  resample_filter=[1, 1]``;
- NCSN++ ("ve" pickles): ``embedding_type='fourier', encoder_type='residual', channel_mult_noise=2,
  resample_filter=[1, 3, 3, 1]``.

Layout of ``enc`` per level (``res = img_resolution >> level``): level 0 starts with
``{res}x{res}_conv`` (in_channels → model_channels), every other level with ``{res}x{res}_down``
plus the encoder's aux layers; then ``{res}x{res}_block{i}`` for ``i < num_blocks``. ``dec`` goes
from the lowest level up: ``_in0`` (attention) and ``_in1`` at the lowest level, ``_up`` elsewhere,
then ``num_blocks + 1`` blocks that each take one encoder skip, and the output layers
``_aux_norm``/``_aux_conv`` (every level for the 'skip' decoder, level 0 only otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..embeddings import FourierEmbedding, PositionalEmbedding
from ..shapes import at_least
from .layers import Conv2d, GroupNorm, Linear, UNetBlock

EMBEDDING_TYPES = ("positional", "fourier")
ENCODER_TYPES = ("standard", "skip", "residual")
DECODER_TYPES = ("standard", "skip")


def swap_halves(emb: torch.Tensor) -> torch.Tensor:
    """``[cos, sin]`` → ``[sin, cos]``: SongUNet swaps the two halves of its noise embedding (README §7)."""
    b = emb.shape[0]
    return emb.reshape(b, 2, -1).flip(1).reshape(*emb.shape)  # (B, C)


class SongUNet(nn.Module):
    """DDPM++/NCSN++ backbone ``F(x, noise_labels, class_labels=None, augment_labels=None)`` (NVlabs/edm).

    The arguments and their defaults are those of the official constructor, so checkpoint
    configs pass straight through.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0.0, embedding_type: str = "positional",
                 channel_mult_noise: int = 1, encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: Sequence[float] = (1, 1)):
        super().__init__()
        if embedding_type not in EMBEDDING_TYPES:
            raise ValueError(f"embedding_type must be one of {EMBEDDING_TYPES}, got {embedding_type!r}")
        if encoder_type not in ENCODER_TYPES:
            raise ValueError(f"encoder_type must be one of {ENCODER_TYPES}, got {encoder_type!r}")
        if decoder_type not in DECODER_TYPES:
            raise ValueError(f"decoder_type must be one of {DECODER_TYPES}, got {decoder_type!r}")
        channel_mult = [int(m) for m in channel_mult]  # channel multiplier per resolution level
        attn_resolutions = [int(r) for r in attn_resolutions]  # resolutions with self-attention
        resample_filter = [float(t) for t in resample_filter]  # FIR taps of the up/downsampling filter
        if img_resolution % (1 << (len(channel_mult) - 1)):
            raise ValueError(f"img_resolution {img_resolution} is not divisible by 2^{len(channel_mult) - 1} "
                             f"({len(channel_mult)} levels)")
        at_least(1, model_channels=model_channels, channel_mult=channel_mult, channel_mult_emb=channel_mult_emb,
                 channel_mult_noise=channel_mult_noise)
        at_least(0, augment_dim=augment_dim, num_blocks=num_blocks)

        self.img_resolution = int(img_resolution)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.label_dim = int(label_dim)  # width of one-hot labels; 0: unconditional
        self.augment_dim = int(augment_dim)  # width of augmentation labels; 0: none
        self.label_dropout = float(label_dropout)  # probability of dropping a row's labels in training
        self.encoder_type, self.decoder_type = encoder_type, decoder_type
        emb_channels = model_channels * channel_mult_emb  # width of the embedding fed to every block
        noise_channels = model_channels * channel_mult_noise  # width of the noise embedding
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)  # "zero" init is tiny, not 0
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block_kwargs = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
            init=init, init_zero=init_zero, init_attn=init_attn,
        )

        # Mapping: noise (+ labels + augmentation) -> emb_channels.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True, freq_dtype=torch.float32)
        else:
            self.map_noise = FourierEmbedding(noise_channels, scale=16)
        self.map_label = Linear(self.label_dim, noise_channels, **init) if self.label_dim else None
        self.map_augment = (Linear(self.augment_dim, noise_channels, bias=False, **init)
                            if self.augment_dim else None)
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = self.in_channels  # channels of the main path
        caux = self.in_channels  # channels of the aux (input-pyramid) path
        skips = []  # channels of every saved skip, in order
        for level, mult in enumerate(channel_mult):
            res = self.img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
                skips.append(cout)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                skips.append(cout)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, kernel=3, down=True,
                                                                   resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
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
                attention = idx == num_blocks and res in attn_resolutions  # only the level's last block
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attention, **block_kwargs)
                self._takes_skip.add(f"{res}x{res}_block{idx}")
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(self.out_channels, self.out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, self.out_channels, kernel=3, **init_zero)

    def embed(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
              augment_labels: torch.Tensor | None = None, batch: int | None = None) -> torch.Tensor:
        """The block embedding ``silu(map_layer1(silu(map_layer0(swap(map_noise) + label + augment))))``.

        Labels enter as ``map_label(onehot · √label_dim)``; missing labels count as zeros. ``batch`` is
        the images' batch size, the number of label-dropout draws (default: the labels' rows).
        """
        emb = swap_halves(self.map_noise(noise_labels))  # (B, noise_channels)
        if self.map_label is not None:
            labels = class_labels
            if labels is None:
                labels = torch.zeros(emb.shape[0], self.label_dim, device=emb.device, dtype=emb.dtype)
            if self.training and self.label_dropout:
                batch = batch if batch is not None else labels.shape[0]  # the images' batch size
                keep = torch.rand([batch, 1], device=labels.device) >= self.label_dropout  # (B, 1)
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))  # (B, emb_channels)
        return F.silu(self.map_layer1(emb))  # (B, emb_channels)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed(noise_labels, class_labels, augment_labels, batch=x.shape[0])

        # Encoder: every non-aux output is saved; aux layers replace the last saved skip.
        skips = []
        aux = x  # the input pyramid ('skip'/'residual' encoders)
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)  # (B, C_in, H/2, W/2)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        # Decoder: the output is the (sum of the upsampled) aux_conv outputs.
        aux = None
        tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)  # (B, C_out, 2H, 2W)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(F.silu(tmp))  # (B, C_out, H, W)
                aux = tmp if aux is None else tmp + aux
            else:
                if name in self._takes_skip:
                    x = torch.cat([x, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
                x = block(x, emb)
        return aux
