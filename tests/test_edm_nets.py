"""Tests of ``dpdm.nets.edm``: our SongUNet (DDPM++/NCSN++) and DhariwalUNet (ADM) against the facts
about the official NVlabs/edm networks in ``shared/edm_ref`` (README §1 and §7, ``keys_<config>.json``).

- every official config builds through our factories with the same state_dict keys, order,
  shapes, buffers (values included) and parameter counts;
- the closed-form pieces: resampling filters, fused vs unfused resampling, embeddings, the
  interleaved q/k/v attention, weight init, "init_zero", label scaling, skip_scale, GroupNorm;
- forward/backward of small configs with every option; the fp16/bf16 path of ADM.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from dpdm.core import get
from dpdm.core.precond import EDMPrecond
from dpdm.nets import plugin
from dpdm.nets.edm.dhariwal import DhariwalUNet
from dpdm.nets.edm import FourierEmbedding, PositionalEmbedding
from dpdm.nets.edm.layers import (
    Conv2d,
    GroupNorm,
    Linear,
    UNetBlock,
    attention_weights,
    make_resample_filter,
    weight_init,
)
from dpdm.nets.edm.songunet import SongUNet, swap_halves

torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]
EDM_REF = Path(os.environ.get("DPDM_EDM_REF", ROOT.parent / "shared" / "edm_ref"))  # the facts about NVlabs/edm

# The official pretrained EDM networks (README §1) and their parameter counts.
PARAMS = {
    "cifar10-32x32-uncond-vp": 55_733_891,
    "cifar10-32x32-cond-vp": 55_735_299,
    "cifar10-32x32-uncond-ve": 56_397_827,
    "cifar10-32x32-cond-ve": 56_400_643,
    "ffhq-64x64-uncond-vp": 61_805_571,
    "ffhq-64x64-uncond-ve": 62_761_091,
    "imagenet-64x64-cond-adm": 295_899_267,
}
DDPMPP = dict(embedding_type="positional", encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
              resample_filter=[1, 1])
NCSNPP = dict(embedding_type="fourier", encoder_type="residual", decoder_type="standard", channel_mult_noise=2,
              resample_filter=[1, 3, 3, 1])


def load_config(name: str) -> dict:
    path = EDM_REF / f"keys_{name}.json"
    if not path.exists():
        pytest.skip(f"{path} not found (set DPDM_EDM_REF to the edm_ref folder)")
    return json.loads(path.read_text())


def build_official(kwargs: dict) -> torch.nn.Module:
    """Our backbone for an official EDMPrecond config (``img_resolution``/``img_channels`` become ``shape``)."""
    kwargs = dict(kwargs)
    resolution, channels = kwargs.pop("img_resolution"), kwargs.pop("img_channels")
    model_type = kwargs.pop("model_type")
    use_fp16 = kwargs.pop("use_fp16", False)
    if model_type == "SongUNet":
        assert not use_fp16
        return get("backbone", "edm-songunet")(shape=(channels, resolution, resolution), **kwargs)
    assert model_type == "DhariwalUNet"
    return get("backbone", "edm-dhariwal")(shape=(channels, resolution, resolution), use_fp16=use_fp16, **kwargs)


def song(**options) -> SongUNet:
    """A tiny SongUNet: 16x16 RGB, 3 levels (16, 8, 4), attention at 8x8."""
    options = {"img_resolution": 16, "in_channels": 3, "out_channels": 3, "model_channels": 16,
               "channel_mult": [1, 2, 2], "num_blocks": 2, "attn_resolutions": [8], "dropout": 0.0, **options}
    return SongUNet(**options)


def adm(**options) -> DhariwalUNet:
    """A tiny DhariwalUNet: 16x16 RGB, 2 levels, 64 channels (one head) with attention at 8x8."""
    options = {"img_resolution": 16, "in_channels": 3, "out_channels": 3, "model_channels": 32,
               "channel_mult": [2, 2], "num_blocks": 1, "attn_resolutions": [8], "dropout": 0.0, **options}
    return DhariwalUNet(**options)


def perturb(net: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    """Add noise to every parameter so the (near-)zero-initialised layers pass signal."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def one_hot(indices, label_dim):
    return F.one_hot(torch.as_tensor(indices), label_dim).float()


def capture_input(module: torch.nn.Module, store: list):
    return module.register_forward_pre_hook(lambda m, args: store.append(args[0].detach().clone()))


# --- official configs ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PARAMS))
def test_official_config_state_dict_matches(name):
    ref = load_config(name)
    kwargs = ref["constructor_kwargs"]
    preset = NCSNPP if name.endswith("-ve") else DDPMPP if name.endswith("-vp") else {}
    assert {k: kwargs[k] for k in preset} == preset  # the pickle configs are the README presets

    net = EDMPrecond(build_official(kwargs))
    state = net.state_dict()
    assert list(state) == list(ref["state_dict"])  # same keys in the same order
    assert {k: list(v.shape) for k, v in state.items()} == ref["state_dict"]
    assert len(state) == ref["num_state_dict_entries"]
    params = sum(p.numel() for p in net.parameters())
    assert params == ref["param_count"] == PARAMS[name]

    buffers = dict(net.named_buffers())
    assert len(buffers) == ref["num_buffers"] and list(buffers) == list(ref["buffers"])
    for key, info in ref["buffers"].items():
        assert list(buffers[key].shape) == info["shape"]
        if key.endswith("map_noise.freqs"):  # random at construction, loaded from the checkpoint
            continue
        assert torch.equal(buffers[key], torch.tensor(info["value"], dtype=torch.float32)), key

    classes = {name or "<root>": type(module).__name__ for name, module in net.named_modules()}
    assert classes == ref["module_classes"]


# --- resampling ----------------------------------------------------------------------------


def conv_ref(x: np.ndarray, w: np.ndarray, pad: int, stride: int = 1) -> np.ndarray:
    """Cross-correlation of a 2-D ``x`` with ``w`` after zero padding, by explicit loops."""
    x = np.pad(x, pad)
    k = w.shape[0]
    rows, cols = (x.shape[0] - k) // stride + 1, (x.shape[1] - k) // stride + 1
    y = np.zeros((rows, cols))
    for i in range(rows):
        for j in range(cols):
            y[i, j] = (x[i * stride:i * stride + k, j * stride:j * stride + k] * w).sum()
    return y


def conv_transpose_ref(x: np.ndarray, w: np.ndarray, pad: int, stride: int = 2) -> np.ndarray:
    """Transposed convolution: scatter ``x[a, b]·w`` at ``(stride·a, stride·b)``, then crop ``pad`` per side."""
    k = w.shape[0]
    y = np.zeros(((x.shape[0] - 1) * stride + k, (x.shape[1] - 1) * stride + k))
    for a in range(x.shape[0]):
        for b in range(x.shape[1]):
            y[a * stride:a * stride + k, b * stride:b * stride + k] += x[a, b] * w
    return y[pad:y.shape[0] - pad, pad:y.shape[1] - pad]


def test_resample_filters():
    assert torch.equal(make_resample_filter([1, 1]), torch.full((1, 1, 2, 2), 0.25))
    binomial = torch.tensor([1.0, 3, 3, 1])
    assert torch.equal(make_resample_filter([1, 3, 3, 1]), (torch.outer(binomial, binomial) / 64)[None, None])
    assert make_resample_filter([1, 3, 3, 1])[0, 0, 1].tolist() == [3 / 64, 9 / 64, 9 / 64, 3 / 64]


def test_box_downsampling_and_nearest_upsampling():
    x = torch.randn(2, 3, 6, 6)
    down = Conv2d(3, 3, kernel=0, down=True)
    up = Conv2d(3, 3, kernel=0, up=True)
    assert list(down.parameters()) == [] and list(up.parameters()) == []
    torch.testing.assert_close(down(x), F.avg_pool2d(x, 2))  # 2x2 box average
    assert torch.equal(up(x), x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))  # nearest neighbour
    assert "resample_filter" in down.state_dict()
    assert "resample_filter" not in Conv2d(3, 3, kernel=1).state_dict()  # registered as None


def test_binomial_resampling_against_loops():
    x = torch.randn(1, 1, 6, 6, dtype=torch.float64)
    f = np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64
    down = Conv2d(1, 1, kernel=0, down=True, resample_filter=[1, 3, 3, 1])
    up = Conv2d(1, 1, kernel=0, up=True, resample_filter=[1, 3, 3, 1])
    np.testing.assert_allclose(down(x)[0, 0].numpy(), conv_ref(x[0, 0].numpy(), f, pad=1, stride=2), atol=1e-12)
    np.testing.assert_allclose(up(x)[0, 0].numpy(), conv_transpose_ref(x[0, 0].numpy(), 4 * f, pad=1), atol=1e-12)
    assert down(x).shape[-1] == 3 and up(x).shape[-1] == 12


@pytest.mark.parametrize("direction", ["down", "up"])
def test_fused_and_unfused_resampling_against_loops(direction):
    torch.manual_seed(0)
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    flags = {direction: True, "resample_filter": [1, 3, 3, 1]}
    unfused, fused = Conv2d(1, 1, kernel=3, **flags), Conv2d(1, 1, kernel=3, fused_resample=True, **flags)
    fused.load_state_dict(unfused.state_dict())
    with torch.no_grad():
        unfused.bias.fill_(0.5)
        fused.bias.fill_(0.5)
    w, f, b = unfused.weight[0, 0].detach().double().numpy(), np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64, 0.5
    image = x[0, 0].numpy()
    if direction == "down":  # unfused: filter (pad 1, stride 2) then conv (pad 1); fused: conv (pad 2) then filter
        want_unfused = conv_ref(conv_ref(image, f, pad=1, stride=2), w, pad=1) + b
        want_fused = conv_ref(conv_ref(image, w, pad=2), f, pad=0, stride=2) + b
    else:  # unfused: transposed filter (pad 1) then conv (pad 1); fused: transposed filter (pad 0) then conv (pad 0)
        want_unfused = conv_ref(conv_transpose_ref(image, 4 * f, pad=1), w, pad=1) + b
        want_fused = conv_ref(conv_transpose_ref(image, 4 * f, pad=0), w, pad=0) + b
    with torch.no_grad():
        got_unfused, got_fused = unfused(x)[0, 0].numpy(), fused(x)[0, 0].numpy()
    np.testing.assert_allclose(got_unfused, want_unfused, atol=1e-12)
    np.testing.assert_allclose(got_fused, want_fused, atol=1e-12)
    assert got_fused.shape == got_unfused.shape == ((4, 4) if direction == "down" else (16, 16))
    assert np.abs(got_fused - got_unfused).max() > 1e-2  # the border effects differ


def test_only_ncsnpp_aux_residual_is_fused():
    net = song(**NCSNPP)
    fused = sorted(name for name, m in net.named_modules() if isinstance(m, Conv2d) and m.fused_resample)
    assert fused == ["enc.4x4_aux_residual", "enc.8x8_aux_residual"]


# --- embeddings ----------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", [True, False])
def test_positional_embedding_formula(endpoint):
    x = torch.tensor([-1.5, 0.0, 0.3, 2.0])
    got = PositionalEmbedding(8, endpoint=endpoint)(x)
    freqs = (1 / 10000) ** (np.arange(4) / (4 - endpoint))
    angles = np.outer(x.numpy().astype(np.float64), freqs)
    np.testing.assert_allclose(got.numpy(), np.concatenate([np.cos(angles), np.sin(angles)], 1), atol=1e-6)
    if endpoint:
        assert freqs[-1] == pytest.approx(1e-4)


def test_fourier_embedding_formula_and_buffer():
    torch.manual_seed(0)
    emb = FourierEmbedding(16)
    assert emb.state_dict()["freqs"].shape == (8,)
    assert 8 < emb.freqs.abs().max() < 64  # randn·16
    x = torch.tensor([0.01, -0.02])
    angles = 2 * math.pi * np.outer(x.numpy().astype(np.float64), emb.freqs.numpy().astype(np.float64))
    np.testing.assert_allclose(emb(x).numpy(), np.concatenate([np.cos(angles), np.sin(angles)], 1), atol=1e-5)


def test_swap_halves():
    emb = torch.arange(12.0).reshape(2, 6)
    assert swap_halves(emb).tolist() == [[3, 4, 5, 0, 1, 2], [9, 10, 11, 6, 7, 8]]


@pytest.mark.parametrize("embedding_type", ["positional", "fourier"])
def test_songunet_feeds_sin_cos_to_the_mapping(embedding_type):
    net = song(embedding_type=embedding_type, channel_mult_noise=2)
    inputs = []
    capture_input(net.map_layer0, inputs)
    noise = torch.tensor([0.02, -0.03])
    net(torch.randn(2, 3, 16, 16), noise)
    if embedding_type == "positional":
        freqs = (1 / 10000) ** (np.arange(16) / 15)  # endpoint=True
    else:
        freqs = 2 * math.pi * net.map_noise.freqs.numpy().astype(np.float64)
    angles = np.outer(noise.numpy().astype(np.float64), freqs)
    np.testing.assert_allclose(inputs[0].numpy(), np.concatenate([np.sin(angles), np.cos(angles)], 1), atol=1e-5)


def test_adm_feeds_cos_sin_to_the_mapping():
    net = adm()
    inputs = []
    capture_input(net.map_layer0, inputs)
    noise = torch.tensor([0.5, -1.0])
    net(torch.randn(2, 3, 16, 16), noise)
    angles = np.outer(noise.numpy().astype(np.float64), (1 / 10000) ** (np.arange(16) / 16))  # endpoint=False
    np.testing.assert_allclose(inputs[0].numpy(), np.concatenate([np.cos(angles), np.sin(angles)], 1), atol=1e-6)


# --- labels --------------------------------------------------------------------------------


def test_songunet_scales_labels_by_sqrt_label_dim():
    net = song(label_dim=9)
    inputs = []
    capture_input(net.map_label, inputs)
    labels = one_hot([2, 7], 9)
    net(torch.randn(2, 3, 16, 16), torch.zeros(2), labels)
    assert torch.equal(inputs[0], labels * 3)  # √9
    emb = []
    capture_input(net.enc["16x16_block0"].affine, emb)
    net(torch.randn(2, 3, 16, 16), torch.zeros(2), labels)
    want = swap_halves(net.map_noise(torch.zeros(2))) + net.map_label(labels * 3)
    want = F.silu(net.map_layer1(F.silu(net.map_layer0(want))))
    torch.testing.assert_close(emb[0], want)


def test_adm_adds_unscaled_labels_after_map_layer1():
    net = adm(label_dim=9, augment_dim=4)
    perturb(net)
    inputs, emb = [], []
    capture_input(net.map_label, inputs)
    capture_input(net.enc["16x16_block0"].affine, emb)
    labels, noise, aug = one_hot([2, 7], 9), torch.tensor([0.3, -0.2]), torch.randn(2, 4)
    net(torch.randn(2, 3, 16, 16), noise, labels, augment_labels=aug)
    assert torch.equal(inputs[0], labels)
    h = net.map_layer1(F.silu(net.map_layer0(net.map_noise(noise) + net.map_augment(aug))))
    torch.testing.assert_close(emb[0], F.silu(h + net.map_label(labels)))


@pytest.mark.parametrize("make", [song, adm])
def test_label_dropout_drops_whole_rows_in_training_only(make):
    net = make(label_dim=5, label_dropout=1.0)
    perturb(net)
    x, noise, labels = torch.randn(3, 3, 16, 16), torch.randn(3), one_hot([0, 1, 4], 5)
    with torch.no_grad():
        eval_out = net.eval()(x, noise, labels)
        train_out = net.train()(x, noise, labels)  # dropout is 0, so only the labels change
        unconditional = net.eval()(x, noise, torch.zeros(3, 5))
    assert torch.equal(train_out, unconditional)
    assert not torch.allclose(eval_out, unconditional)
    assert torch.equal(net(x, noise, None), unconditional)  # missing labels count as zeros


def test_train_mode_without_dropout_equals_eval_mode():
    net = song(label_dim=3)
    perturb(net)
    x, noise, labels = torch.randn(2, 3, 16, 16), torch.randn(2), one_hot([0, 2], 3)
    with torch.no_grad():
        assert torch.equal(net.train()(x, noise, labels), net.eval()(x, noise, labels))
        net.enc["16x16_block0"].dropout = 0.5  # the only stochastic op
        assert not torch.equal(net.train()(x, noise, labels), net.eval()(x, noise, labels))


# --- attention -----------------------------------------------------------------------------


def attention_ref(block: UNetBlock, x: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """``(proj(attn(norm2(x))) + x)·skip_scale`` with explicit per-head indexing of the qkv channels."""
    b, c, h, w = x.shape
    heads, d = block.num_heads, c // block.num_heads
    qkv = block.qkv(block.norm2(x)).reshape(b, 3 * c, h * w)  # (B, 3C, HW)
    out = torch.zeros(b, c, h * w, dtype=x.dtype)
    for n in range(heads):
        def part(j, n=n):  # q (j=0), k (1), v (2) of head n: (B, d, HW)
            if interleaved:
                return torch.stack([qkv[:, (n * d + i) * 3 + j] for i in range(d)], dim=1)
            return qkv[:, j * c + n * d:j * c + (n + 1) * d]
        q, k, v = part(0), part(1), part(2)
        weights = torch.softmax(torch.einsum("bcq,bck->bqk", q, k) / math.sqrt(d), dim=-1)  # (B, HW, HW)
        out[:, n * d:(n + 1) * d] = torch.einsum("bqk,bck->bcq", weights, v)
    return (block.proj(out.reshape(b, c, h, w)) + x) * block.skip_scale


def test_attention_uses_interleaved_qkv_channels():
    torch.manual_seed(0)
    block = UNetBlock(8, 8, emb_channels=4, attention=True, num_heads=2, skip_scale=math.sqrt(0.5)).double()
    perturb(block, scale=0.5)
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        got = block.attention(x)
        torch.testing.assert_close(got, attention_ref(block, x), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(got, attention_ref(block, x, interleaved=False), atol=1e-3)


def test_attention_weights_softmax_in_float32():
    torch.manual_seed(0)
    q, k = torch.randn(3, 4, 5), torch.randn(3, 4, 7)
    want = torch.softmax(torch.einsum("ncq,nck->nqk", q.double(), k.double()) / 2, dim=2)  # √4 = 2
    torch.testing.assert_close(attention_weights(q, k).double(), want, rtol=1e-5, atol=1e-6)
    w16 = attention_weights(q.bfloat16(), k.bfloat16())
    assert w16.dtype == torch.bfloat16
    torch.testing.assert_close(w16.double(), want, rtol=0.02, atol=0.01)
    assert torch.autograd.gradcheck(attention_weights, (q.double().requires_grad_(), k.double().requires_grad_()))


@pytest.mark.parametrize("attention, factor", [(False, math.sqrt(0.5)), (True, 0.5)])
def test_skip_scale_is_applied_twice_in_attention_blocks(attention, factor):
    block = UNetBlock(8, 8, emb_channels=4, attention=attention, num_heads=1, skip_scale=math.sqrt(0.5),
                      adaptive_scale=False)
    with torch.no_grad():
        for layer in [block.conv1] + ([block.proj] if attention else []):  # the residual branches give 0
            layer.weight.zero_()
            layer.bias.zero_()
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(block(x, torch.randn(2, 4)), x * factor)  # x·√½, or x·√½·√½ with attention


def test_adm_blocks_start_as_identity():
    block = UNetBlock(64, 64, emb_channels=16, attention=True)  # ADM defaults: skip_scale 1, one head of 64
    assert block.num_heads == 1
    x = torch.randn(2, 64, 4, 4)
    assert torch.equal(block(x, torch.randn(2, 16)), x)  # conv1 and proj are zero-initialised
    assert UNetBlock(32, 32, emb_channels=16, attention=True).num_heads == 0  # < 64 channels: no attention
    assert "qkv.weight" not in UNetBlock(32, 32, emb_channels=16, attention=True).state_dict()


@pytest.mark.parametrize("adaptive_scale", [True, False])
def test_block_conditioning(adaptive_scale):
    torch.manual_seed(0)
    block = UNetBlock(8, 8, emb_channels=4, adaptive_scale=adaptive_scale)
    perturb(block)
    conv0_out, conv1_in = [], []
    block.conv0.register_forward_hook(lambda m, args, out: conv0_out.append(out.detach()))
    capture_input(block.conv1, conv1_in)
    emb = torch.randn(2, 4)
    block(torch.randn(2, 8, 4, 4), emb)
    p = block.affine(emb)[:, :, None, None]
    if adaptive_scale:  # scale first, then shift
        scale, shift = p[:, :8], p[:, 8:]
        want = F.silu(shift + block.norm1(conv0_out[0]) * (scale + 1))
    else:
        want = F.silu(block.norm1(conv0_out[0] + p))
    torch.testing.assert_close(conv1_in[0], want)
    assert block.affine.out_features == (16 if adaptive_scale else 8)


# --- init ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, std, bound", [
    ("kaiming_normal", math.sqrt(1 / 400), None),  # the gain is 1, not 2
    ("kaiming_uniform", math.sqrt(1 / 400), math.sqrt(3 / 400)),
    ("xavier_normal", math.sqrt(2 / 600), None),
    ("xavier_uniform", math.sqrt(2 / 600), math.sqrt(6 / 600)),
])
def test_weight_init_statistics(mode, std, bound):
    torch.manual_seed(0)
    w = weight_init([200, 400], mode=mode, fan_in=400, fan_out=200)
    assert w.shape == (200, 400)
    assert w.std().item() == pytest.approx(std, rel=0.01)
    assert abs(w.mean().item()) < 0.01 * std
    if bound is not None:
        assert w.abs().max().item() <= bound and w.abs().max().item() > 0.99 * bound


def test_weight_init_fans_and_errors():
    torch.manual_seed(0)
    conv = Conv2d(64, 32, kernel=3, init_mode="kaiming_normal")  # fan_in = 64·3·3
    assert conv.weight.std().item() == pytest.approx(math.sqrt(1 / 576), rel=0.02)
    assert torch.equal(conv.bias, torch.zeros(32))  # init_bias defaults to 0
    linear = Linear(100, 50, init_mode="kaiming_uniform", init_weight=2.0, init_bias=1.0)
    assert linear.weight.abs().max() <= 2 * math.sqrt(3 / 100) and linear.bias.abs().max() <= math.sqrt(3 / 100)
    assert linear.bias.abs().min() > 0
    with pytest.raises(ValueError, match="unknown init mode 'he'"):
        weight_init([2], mode="he", fan_in=1, fan_out=1)


def test_songunet_init_zero_is_tiny_not_zero():
    torch.manual_seed(0)
    net = song(**{**NCSNPP, "decoder_type": "skip"})
    zero = [n for n, m in net.named_modules() if n.endswith(("conv1", "proj", "aux_conv"))]
    assert any(n.endswith("proj") for n in zero) and any(n.endswith("aux_conv") for n in zero)
    for name in zero:
        layer = net.get_submodule(name)
        fan_in, fan_out = layer.in_channels * layer.kernel**2, layer.out_channels * layer.kernel**2
        assert 0 < layer.weight.abs().max() <= 1e-5 * math.sqrt(6 / (fan_in + fan_out)), name
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias)), name
    qkv = net.dec["8x8_block2"].qkv
    assert qkv.weight.abs().max() <= math.sqrt(0.2) * math.sqrt(6 / (qkv.in_channels + qkv.out_channels))
    assert qkv.weight.abs().max() > 0.9 * math.sqrt(0.2) * math.sqrt(6 / (qkv.in_channels + qkv.out_channels))
    for name, p in net.named_parameters():  # every bias starts at zero (GroupNorm shifts too)
        if name.endswith("bias"):
            assert not p.any(), name


def test_adm_init():
    torch.manual_seed(0)
    net = adm(label_dim=1000, augment_dim=9)
    for name in ["enc.16x16_block0.conv1", "enc.8x8_block0.proj", "dec.8x8_in0.proj", "out_conv"]:
        layer = net.get_submodule(name)
        assert not layer.weight.any() and not layer.bias.any(), name  # exactly zero
    assert not net.map_augment.weight.any() and net.map_augment.bias is None
    assert net.map_label.bias is None
    assert net.map_label.weight.std().item() == pytest.approx(1.0, rel=0.02)  # kaiming_normal·√label_dim
    conv0 = net.enc["16x16_block0"].conv0  # kaiming_uniform·√(1/3): bound 1/√fan_in, like PyTorch
    bound = 1 / math.sqrt(64 * 9) * (1 + 1e-6)
    assert conv0.weight.abs().max() <= bound and conv0.bias.abs().max() <= bound
    assert conv0.bias.abs().min() > 0


def test_group_norm():
    assert GroupNorm(256).num_groups == 32 and GroupNorm(64).num_groups == 16 and GroupNorm(12).num_groups == 3
    x = torch.randn(2, 12, 3, 3)
    torch.testing.assert_close(GroupNorm(12, eps=1e-6)(x), F.group_norm(x, 3, eps=1e-6))
    with pytest.raises(ValueError, match="3 channels"):
        GroupNorm(3)
    songs = [m.eps for m in song(decoder_type="skip").modules() if isinstance(m, GroupNorm)]
    adms = [m.eps for m in adm().modules() if isinstance(m, GroupNorm)]
    assert set(songs) == {1e-6} and set(adms) == {1e-5}


# --- topology ------------------------------------------------------------------------------


def attention_blocks(net) -> list[str]:
    return [name for name, m in net.named_modules() if isinstance(m, UNetBlock) and m.num_heads]


def test_attention_placement():
    assert attention_blocks(song()) == ["enc.8x8_block0", "enc.8x8_block1", "dec.4x4_in0", "dec.8x8_block2"]
    assert attention_blocks(adm()) == ["enc.8x8_block0", "dec.8x8_in0", "dec.8x8_block0", "dec.8x8_block1"]


def test_songunet_topology():
    net = song(**NCSNPP)
    assert list(net.enc) == [
        "16x16_conv", "16x16_block0", "16x16_block1",
        "8x8_down", "8x8_aux_residual", "8x8_block0", "8x8_block1",
        "4x4_down", "4x4_aux_residual", "4x4_block0", "4x4_block1",
    ]
    assert list(net.dec) == [
        "4x4_in0", "4x4_in1", "4x4_block0", "4x4_block1", "4x4_block2",
        "8x8_up", "8x8_block0", "8x8_block1", "8x8_block2",
        "16x16_up", "16x16_block0", "16x16_block1", "16x16_block2", "16x16_aux_norm", "16x16_aux_conv",
    ]
    assert net.enc["16x16_conv"].out_channels == 16 and net.enc["16x16_block0"].in_channels == 16
    # Every decoder block concatenates one skip: 4x4 blocks take [32 + 32, 32 + 32, 32 + 32 (the down block)].
    assert [net.dec[f"4x4_block{i}"].in_channels for i in range(3)] == [64, 64, 64]
    assert [net.dec[f"16x16_block{i}"].in_channels for i in range(3)] == [32 + 16, 16 + 16, 16 + 16]
    skip = song(encoder_type="skip", decoder_type="skip")
    assert {"8x8_aux_down", "8x8_aux_skip"} <= set(skip.enc)
    assert skip.enc["4x4_aux_skip"].in_channels == 3  # the skip encoder's aux path stays at in_channels
    assert [n for n in skip.dec if "aux" in n] == [
        "4x4_aux_norm", "4x4_aux_conv", "8x8_aux_up", "8x8_aux_norm", "8x8_aux_conv",
        "16x16_aux_up", "16x16_aux_norm", "16x16_aux_conv",
    ]
    assert list(skip.dec["8x8_aux_up"].parameters()) == []


def test_adm_topology():
    net = adm()
    assert list(net.enc) == ["16x16_conv", "16x16_block0", "8x8_down", "8x8_block0"]
    assert net.enc["16x16_conv"].out_channels == 64  # model_channels·channel_mult[0]
    assert net.enc["8x8_down"].skip.kernel == 0  # pure resampling, no weights
    assert [k for k in net.enc["8x8_down"].state_dict() if k.startswith("skip")] == ["skip.resample_filter"]
    assert song().enc["8x8_down"].skip.kernel == 1  # resample_proj


def test_constructor_errors():
    with pytest.raises(ValueError, match="embedding_type"):
        song(embedding_type="sinusoidal")
    with pytest.raises(ValueError, match="encoder_type"):
        song(encoder_type="fancy")
    with pytest.raises(ValueError, match="decoder_type"):
        song(decoder_type="residual")
    with pytest.raises(ValueError, match="fp16_dtype"):
        adm(fp16_dtype="half")
    with pytest.raises(ValueError, match="not divisible"):
        song(img_resolution=10)
    with pytest.raises(ValueError, match="H == W"):
        get("backbone", "edm-songunet")(shape=(3, 16, 8))
    with pytest.raises(ValueError, match="H == W"):
        get("backbone", "edm-dhariwal")(shape=(16, 16))


# --- forward and backward ------------------------------------------------------------------


SONG_CASES = {
    "ddpmpp": DDPMPP,
    "ncsnpp": NCSNPP,
    "skip-encoder": dict(encoder_type="skip"),
    "skip-decoder": dict(decoder_type="skip"),
    "fourier-skip-skip": dict(embedding_type="fourier", encoder_type="skip", decoder_type="skip",
                              resample_filter=[1, 3, 3, 1]),
}


@pytest.mark.parametrize("case", SONG_CASES)
@pytest.mark.parametrize("label_dim", [0, 4])
def test_songunet_forward_backward(case, label_dim):
    torch.manual_seed(0)
    net = song(label_dim=label_dim, augment_dim=9, dropout=0.1, **SONG_CASES[case])
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    labels = one_hot([1, 3], 4) if label_dim else None
    out = net(x, torch.tensor([-1.0, 0.5]), labels, augment_labels=torch.randn(2, 9))
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().sum().backward()
    assert x.grad.abs().sum() > 0
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert net(x, torch.zeros(2), labels).shape == x.shape  # augment_labels=None skips map_augment


@pytest.mark.parametrize("label_dim, augment_dim", [(0, 0), (5, 9)])
def test_adm_forward_backward(label_dim, augment_dim):
    torch.manual_seed(0)
    net = adm(label_dim=label_dim, augment_dim=augment_dim, dropout=0.1)
    perturb(net)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    labels = one_hot([0, 4], 5) if label_dim else None
    aug = torch.randn(2, 9) if augment_dim else None
    out = net(x, torch.tensor([-1.0, 0.5]), labels, augment_labels=aug)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    out.square().sum().backward()
    assert x.grad.abs().sum() > 0
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_backbones_inside_edm_precond():
    torch.manual_seed(0)
    for net in [song(label_dim=3, **NCSNPP), adm(label_dim=3)]:
        perturb(net)
        denoiser = EDMPrecond(net)
        x, sigma = torch.randn(3, 3, 16, 16), torch.tensor([0.01, 1.0, 50.0])
        out = denoiser(x, sigma, class_labels=torch.tensor([0, 1, 2]))
        assert out.shape == x.shape and torch.isfinite(out).all()
        assert denoiser(x, 2.0).shape == x.shape  # unconditional (zero labels), scalar sigma


def test_adm_use_fp16_on_cpu_runs_float32():
    torch.manual_seed(0)
    net, half = adm(label_dim=3), adm(label_dim=3, use_fp16=True, fp16_dtype="bfloat16")
    perturb(net)
    half.load_state_dict(net.state_dict())
    x, noise, labels = torch.randn(2, 3, 16, 16), torch.randn(2), one_hot([0, 2], 3)
    assert half.body_dtype(x) == torch.float32
    assert torch.equal(half(x, noise, labels), net(x, noise, labels))


def test_adm_low_precision_body_keeps_fp32_weights(monkeypatch):
    """The CUDA fp16 path, exercised on CPU in bfloat16: weights stay fp32, the output is float32."""
    torch.manual_seed(0)
    net = adm(label_dim=3, use_fp16=True, fp16_dtype="bfloat16")
    perturb(net)
    x, noise, labels = torch.randn(2, 3, 16, 16), torch.randn(2), one_hot([0, 2], 3)
    with torch.no_grad():
        full = net(x, noise, labels)
        monkeypatch.setattr(net, "body_dtype", lambda x: torch.bfloat16)
        dtypes = []
        net.enc["8x8_block0"].qkv.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
        low = net(x, noise, labels)
    assert dtypes == [torch.bfloat16] and low.dtype == torch.float32
    assert {p.dtype for p in net.parameters()} == {torch.float32}
    assert (low - full).abs().max() < 0.05 * full.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fp16_dtype", ["float16", "bfloat16"])
def test_adm_fp16_on_cuda(fp16_dtype):
    torch.manual_seed(0)
    net = adm(label_dim=3, use_fp16=True, fp16_dtype=fp16_dtype)
    perturb(net)
    reference = adm(label_dim=3)
    reference.load_state_dict(net.state_dict())
    net, reference = net.cuda(), reference.cuda()
    x, noise, labels = torch.randn(2, 3, 16, 16).cuda(), torch.randn(2).cuda(), one_hot([0, 2], 3).cuda()
    out = net(x, noise, labels)
    assert out.dtype == torch.float32 and net.body_dtype(x) == getattr(torch, fp16_dtype)
    want = reference(x, noise, labels)
    assert (out - want).abs().max() < 0.05 * want.abs().max()
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.parameters())


# --- registry ------------------------------------------------------------------------------


def test_registry_finds_both_backbones():
    assert get("backbone", "edm-songunet") is plugin.edm_songunet
    assert get("backbone", "edm-dhariwal") is plugin.edm_dhariwal
    net = get("backbone", "edm-songunet")(shape=(1, 8, 8), label_dim=2, model_channels=16, channel_mult=[1, 2],
                                          num_blocks=1, attn_resolutions=[4])
    assert isinstance(net, SongUNet) and net.label_dim == 2
    assert net(torch.randn(2, 1, 8, 8), torch.zeros(2), one_hot([0, 1], 2)).shape == (2, 1, 8, 8)
    net = get("backbone", "edm-dhariwal")(shape=(1, 8, 8), model_channels=64, channel_mult=[1, 1], num_blocks=1,
                                          attn_resolutions=[4])
    assert isinstance(net, DhariwalUNet)
    assert net(torch.randn(2, 1, 8, 8), torch.zeros(2)).shape == (2, 1, 8, 8)


@pytest.mark.parametrize("name, cls", [("edm-songunet", SongUNet), ("edm-dhariwal", DhariwalUNet)])
def test_factory_options_mirror_the_official_constructor(name, cls):
    factory = inspect.signature(get("backbone", name)).parameters
    assert list(factory)[:2] == ["shape", "label_dim"]
    for option in list(factory.values())[1:]:
        assert option.default is not inspect.Parameter.empty, option.name
        assert option.annotation is not inspect.Parameter.empty, option.name
    constructor = inspect.signature(cls).parameters
    assert list(constructor)[:3] == ["img_resolution", "in_channels", "out_channels"]
    assert list(factory)[1:] == list(constructor)[3:]
    for key in list(factory)[1:]:
        assert factory[key].default == constructor[key].default, key


def test_importing_the_edm_package_does_not_import_torch():
    code = "import sys, dpdm.nets.edm, dpdm.nets.plugin; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# --- full size (slow) ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cifar10-32x32-uncond-vp", "imagenet-64x64-cond-adm"])
def test_full_size_forward_backward_on_cpu(name):
    torch.manual_seed(0)
    ref = load_config(name)
    backbone = build_official(ref["constructor_kwargs"])
    denoiser = EDMPrecond(backbone)
    res, channels = ref["constructor_kwargs"]["img_resolution"], ref["constructor_kwargs"]["img_channels"]
    x = torch.randn(1, channels, res, res)
    labels = torch.tensor([7]) if backbone.label_dim else None
    out = denoiser(x, torch.tensor([2.5]), class_labels=labels)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().sum().backward()
    unused = {name for name, p in backbone.named_parameters() if p.grad is None}
    assert unused == ({"map_augment.weight"} if backbone.augment_dim else set())  # no augment labels at sampling
    assert all(torch.isfinite(p.grad).all() for p in backbone.parameters() if p.grad is not None)
