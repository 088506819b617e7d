"""Tests of dpdm-nets: the ``mlp`` and ``unet-small`` backbones, their embeddings and their plugin."""

from __future__ import annotations

import inspect
import math
import subprocess
import sys

import pytest
import torch

from dpdm.core.losses import EDMLoss
from dpdm.core.precond import EDMPrecond
from dpdm.nets.embeddings import FourierEmbedding, PositionalEmbedding
from dpdm.nets.mlp import make_mlp
from dpdm.nets.unet import make_unet_small

LABEL_DIM = 3


def tiny_mlp(shape=(2,), label_dim=0):
    return make_mlp(shape, label_dim=label_dim, hidden=32, depth=2, emb_dim=16)


def tiny_unet(shape=(1, 8, 8), label_dim=0, **options):
    options = {"channels": 8, "emb_dim": 32, **options}
    return make_unet_small(shape, label_dim=label_dim, **options)


NETS = {
    "mlp-vector": (tiny_mlp, (2,)),
    "mlp-matrix": (tiny_mlp, (3, 4)),
    "unet-8x8": (tiny_unet, (1, 8, 8)),
    "unet-rgb-16x12": (tiny_unet, (3, 16, 12)),
}


def perturb_zero_parameters(net: torch.nn.Module, scale: float = 0.1) -> None:
    """Give random values to the zero-initialised layers, so every input reaches the output."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(scale * torch.randn(p.shape, generator=gen))


def one_hot(indices, label_dim=LABEL_DIM):
    return torch.nn.functional.one_hot(torch.as_tensor(indices), label_dim).float()


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("label_dim", [0, LABEL_DIM])
def test_output_shape_matches_input(name, label_dim):
    make, shape = NETS[name]
    net = make(shape, label_dim=label_dim)
    perturb_zero_parameters(net)
    x = torch.randn(5, *shape)
    labels = one_hot([0, 1, 2, 0, 1]) if label_dim else None
    out = net(x, torch.linspace(-2, 1.2, 5), class_labels=labels)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    if label_dim:  # zero labels stand for "unconditional", as in EDM
        assert net(x, torch.zeros(5), class_labels=None).shape == x.shape


@pytest.mark.parametrize("name", NETS)
def test_zero_initialised_output_gives_zero(name):
    make, shape = NETS[name]
    net = make(shape, label_dim=LABEL_DIM)
    x = torch.randn(4, *shape)
    assert torch.equal(net(x, torch.randn(4), one_hot([0, 1, 2, 1])), torch.zeros_like(x))
    denoiser = EDMPrecond(net, sigma_data=0.5)
    sigma = torch.tensor([0.1, 1.0, 10.0, 80.0])
    c_skip = (0.25 / (sigma**2 + 0.25)).reshape(-1, *[1] * len(shape))
    torch.testing.assert_close(denoiser(x, sigma), c_skip * x)


@pytest.mark.parametrize("name", NETS)
def test_class_and_noise_labels_change_the_output(name):
    make, shape = NETS[name]
    net = make(shape, label_dim=LABEL_DIM)
    perturb_zero_parameters(net)
    x = torch.randn(1, *shape).expand(2, *shape)
    noise = torch.tensor([-0.5, -0.5])
    by_label = net(x, noise, one_hot([0, 2]))
    assert not torch.allclose(by_label[0], by_label[1])
    by_noise = net(x, torch.tensor([-1.5, 0.8]), one_hot([1, 1]))
    assert not torch.allclose(by_noise[0], by_noise[1])


@pytest.mark.parametrize("name", NETS)
def test_gradient_reaches_every_parameter(name):
    make, shape = NETS[name]
    net = make(shape, label_dim=LABEL_DIM, **({"attn": True} if name.startswith("unet") else {}))
    perturb_zero_parameters(net)
    x = torch.randn(6, *shape)
    net(x, torch.randn(6), one_hot([0, 1, 2, 0, 1, 2])).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


@pytest.mark.parametrize("name", ["mlp-vector", "unet-8x8"])
def test_adam_steps_reduce_the_edm_loss(name):
    make, shape = NETS[name]
    torch.manual_seed(0)
    denoiser = EDMPrecond(make(shape, label_dim=0), sigma_data=0.5)
    loss_fn = EDMLoss(sigma_data=0.5)
    y = 0.5 * torch.randn(64, *shape)
    opt = torch.optim.Adam(denoiser.parameters(), lr=3e-3)

    def loss():  # same sigmas and noise each time
        return loss_fn(denoiser, y, generator=torch.Generator().manual_seed(0)).mean()

    before = loss().item()
    for _ in range(30):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.8 * before


def test_noise_labels_broadcast_from_a_scalar_and_dtype_follows_the_parameters():
    net = tiny_mlp().double()
    perturb_zero_parameters(net)
    x = torch.randn(3, 2, dtype=torch.float64)
    out = net(x, torch.tensor(0.3))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, net(x, torch.full((3,), 0.3, dtype=torch.float64)))


def test_bad_labels_and_shapes_are_rejected():
    with pytest.raises(ValueError, match="label_dim=0"):
        tiny_mlp()(torch.randn(2, 2), torch.zeros(2), one_hot([0, 1]))
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        tiny_mlp(label_dim=LABEL_DIM)(torch.randn(2, 2), torch.zeros(2), torch.ones(2, 5))
    with pytest.raises(ValueError, match="expected items of shape"):
        tiny_mlp()(torch.randn(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        make_mlp((2,), activation="swish")


def test_unet_rejects_indivisible_sizes_with_a_clear_message():
    with pytest.raises(ValueError, match=r"must be divisible by 4; got H=6, W=6"):
        tiny_unet((1, 6, 6), channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="divisible by 2"):
        tiny_unet((1, 8, 7))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        tiny_unet((8, 8))
    assert tiny_unet((1, 8, 8), channel_mult=[1, 2, 2, 2]).shape == (1, 8, 8)  # 8 -> 4 -> 2 -> 1


# A size below its least value fails with a ValueError naming the option (preflight turns it into
# "recipe.model: hidden must be at least 1, got -5"), not with torch's error about a negative dimension or no error.
SMALL = {
    "mlp": ((2,), {"hidden": 8, "depth": 1, "emb_dim": 8}),
    "unet-small": ((1, 8, 8), {"channels": 8, "emb_dim": 8, "num_blocks": 1}),
    "edm-songunet": ((1, 8, 8), {"model_channels": 16, "channel_mult": [1, 1], "num_blocks": 1,
                                 "attn_resolutions": []}),
    "edm-dhariwal": ((1, 8, 8), {"model_channels": 16, "channel_mult": [1, 1], "num_blocks": 1,
                                 "attn_resolutions": []}),
    "dit": ((1, 8, 8), {"hidden": 8, "depth": 1, "num_heads": 2}),
}


@pytest.mark.parametrize("name, option, value, message", [
    ("mlp", "hidden", -5, "hidden must be at least 1, got -5"),
    ("mlp", "hidden", 0, "hidden must be at least 1, got 0"),
    ("mlp", "depth", -1, "depth must be at least 0, got -1"),
    ("unet-small", "channels", -8, "channels must be at least 1, got -8"),
    ("unet-small", "channels", 0, "channels must be at least 1, got 0"),
    ("unet-small", "channel_mult", [1, -2], "channel_mult: every entry must be at least 1, got [1, -2]"),
    ("unet-small", "num_blocks", 0, "num_blocks must be at least 1, got 0"),
    ("edm-songunet", "model_channels", -16, "model_channels must be at least 1, got -16"),
    ("edm-songunet", "model_channels", 0, "model_channels must be at least 1, got 0"),
    ("edm-songunet", "channel_mult", [0, 1], "channel_mult: every entry must be at least 1, got [0, 1]"),
    ("edm-songunet", "channel_mult_emb", 0, "channel_mult_emb must be at least 1, got 0"),
    ("edm-songunet", "channel_mult_noise", -1, "channel_mult_noise must be at least 1, got -1"),
    ("edm-songunet", "augment_dim", -5, "augment_dim must be at least 0, got -5"),
    ("edm-songunet", "num_blocks", -1, "num_blocks must be at least 0, got -1"),
    ("edm-dhariwal", "model_channels", -16, "model_channels must be at least 1, got -16"),
    ("edm-dhariwal", "channel_mult_emb", -1, "channel_mult_emb must be at least 1, got -1"),
    ("edm-dhariwal", "augment_dim", -5, "augment_dim must be at least 0, got -5"),
    ("dit", "hidden", -8, "dit: hidden must be at least 0, got -8"),
    ("dit", "depth", -1, "dit: depth must be at least 0, got -1"),
    ("dit", "mlp_ratio", 0.0, "dit: mlp_ratio must be positive, got 0.0"),
])
def test_backbones_reject_sizes_below_their_least_value_naming_the_option(name, option, value, message):
    from dpdm.core import get

    shape, options = SMALL[name]
    get("backbone", name)(shape=shape, **options)  # the small net itself is fine
    with pytest.raises(ValueError) as info:
        get("backbone", name)(shape=shape, **{**options, option: value})
    assert str(info.value) == message


def test_backbone_size_problems_are_reported_together():
    with pytest.raises(ValueError) as info:
        tiny_unet((1, 8, 8), channels=-1, num_blocks=0)
    assert str(info.value) == "channels must be at least 1, got -1; num_blocks must be at least 1, got 0"


def test_positional_embedding_matches_edm_songunet():
    emb = PositionalEmbedding(8, endpoint=True)
    x = torch.tensor([-2.0, 0.0, 1.2])
    freqs = torch.tensor([(1 / 10000) ** (i / 3) for i in range(4)])  # endpoint=True: i / (C/2 - 1)
    expected = torch.cat([torch.outer(x, freqs).cos(), torch.outer(x, freqs).sin()], dim=1)
    torch.testing.assert_close(emb(x), expected)
    assert emb(x).shape == (3, 8)


def test_one_embedding_implementation_for_our_backbones_and_the_edm_networks():
    import dpdm.nets
    import dpdm.nets.edm

    assert dpdm.nets.PositionalEmbedding is dpdm.nets.edm.PositionalEmbedding is PositionalEmbedding
    assert dpdm.nets.FourierEmbedding is dpdm.nets.edm.FourierEmbedding is FourierEmbedding


def test_positional_embedding_frequency_dtype():
    """EDM computes the frequencies in float32 (``freq_dtype=torch.float32``); our backbones' mapping in the
    input's dtype (``None``): the same numbers for float32 input, EDM's rounded ones for float64 input."""
    x = torch.tensor([-2.0, 0.0, 1.2], dtype=torch.float64)
    for freq_dtype in (None, torch.float32):
        freqs = ((1 / 10000) ** (torch.arange(4, dtype=freq_dtype or torch.float64) / 3)).double()
        got = PositionalEmbedding(8, endpoint=True, freq_dtype=freq_dtype)(x)
        assert got.dtype == torch.float64
        assert torch.equal(got, torch.cat([torch.outer(x, freqs).cos(), torch.outer(x, freqs).sin()], 1))
    assert not torch.equal(PositionalEmbedding(8, endpoint=True, freq_dtype=None)(x),
                           PositionalEmbedding(8, endpoint=True, freq_dtype=torch.float32)(x))
    x32 = x.float()
    assert torch.equal(PositionalEmbedding(8, endpoint=True, freq_dtype=None)(x32),
                       PositionalEmbedding(8, endpoint=True, freq_dtype=torch.float32)(x32))
    assert PositionalEmbedding(8, endpoint=True)(torch.tensor([3])).dtype == torch.float32  # integer labels


def test_fourier_embedding_keeps_its_frequencies_in_the_state_dict():
    torch.manual_seed(0)
    emb = FourierEmbedding(16, scale=2.0)
    assert emb.state_dict()["freqs"].shape == (8,)
    x = torch.tensor([0.5])
    angles = 2 * math.pi * 0.5 * emb.freqs
    torch.testing.assert_close(emb(x), torch.cat([angles.cos(), angles.sin()])[None])


def test_registry_finds_both_backbones():
    from dpdm.core import get

    mlp = get("backbone", "mlp")(shape=(2,), label_dim=0, hidden=16, depth=1)
    unet = get("backbone", "unet-small")(shape=(1, 8, 8), label_dim=2, channels=8)
    assert mlp(torch.randn(2, 2), torch.zeros(2)).shape == (2, 2)
    assert unet(torch.randn(2, 1, 8, 8), torch.zeros(2), one_hot([0, 1], 2)).shape == (2, 1, 8, 8)


@pytest.mark.parametrize("name", ["mlp", "unet-small"])
def test_factory_options_are_typed_keywords_with_defaults(name):
    from dpdm.core import get

    params = inspect.signature(get("backbone", name)).parameters
    assert list(params)[:2] == ["shape", "label_dim"]
    for option in list(params.values())[1:]:
        assert option.default is not inspect.Parameter.empty, option.name
        assert option.annotation is not inspect.Parameter.empty, option.name


def test_importing_the_plugin_does_not_import_torch():
    code = "import sys, dpdm.nets, dpdm.nets.plugin; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
