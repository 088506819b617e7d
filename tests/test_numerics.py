"""Evaluation numerics as EDM's ``generate.py`` does them: the sampler state in float64 with the network in its
own precision, the schedule clamped to the network's σ range, and uint8 images by truncation after +128."""

from __future__ import annotations

import pytest
import torch

from dpdm.core import evaluate, generation, scoring
from dpdm.core.precond import EDMPrecond, VEPrecond, VPPrecond
from dpdm.core.registry import get
from dpdm.core.samplers import SAMPLERS, noise_like

torch.set_num_threads(1)

# --- R1: float64 sampler state ---------------------------------------------------------------------------------

TINY_BACKBONES = {  # (shape, options) small enough for the CPU
    "mlp": ((2,), dict(hidden=32, depth=2, emb_dim=16)),
    "unet-small": ((1, 8, 8), dict(channels=8, emb_dim=32)),
    "dit": ((1, 8, 8), dict(hidden=32, depth=2, num_heads=4)),
    "edm-songunet": ((1, 8, 8), dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                                     dropout=0.0)),
    "edm-dhariwal": ((1, 8, 8), dict(model_channels=32, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[4],
                                     dropout=0.0)),
    "stylegan2": ((1, 16, 16), dict(channels=8, channel_max=16, w_dim=16, mapping_layers=2)),
}
PRECONDS = {"edm": EDMPrecond, "vp": VPPrecond, "ve": VEPrecond}


def perturbed(net: torch.nn.Module) -> torch.nn.Module:
    """Random values for the zero-initialised layers, so that the backbone's output is not 0."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return net.eval()


def tiny_net(backbone="unet-small", precond="edm"):
    shape, options = TINY_BACKBONES[backbone]
    torch.manual_seed(0)
    return PRECONDS[precond](perturbed(get("backbone", backbone)(shape, label_dim=0, **options))), shape


def test_noise_is_drawn_in_float32_and_cast():
    x64 = torch.zeros(3, 5, dtype=torch.float64)
    a = noise_like(x64, torch.Generator().manual_seed(4))
    b = noise_like(x64.float(), torch.Generator().manual_seed(4))
    assert a.dtype == torch.float64 and b.dtype == torch.float32
    assert torch.equal(a, b.double())  # the same numbers whatever the state's precision
    gens = generation.ItemGenerators([7, 8, 9])
    e64 = gens.randn((2, 2), dtype=torch.float64)
    e32 = generation.ItemGenerators([7, 8, 9]).randn((2, 2))
    assert e64.dtype == torch.float64 and torch.equal(e64, e32.double())
    assert torch.equal(e32[1], torch.randn((2, 2), generator=torch.Generator().manual_seed(8)))
    # through ItemGenerators too (what evaluation passes to the samplers)
    assert torch.equal(noise_like(x64, generation.ItemGenerators([1, 2, 3])),
                       generation.ItemGenerators([1, 2, 3]).randn((5,)).double())


@pytest.mark.parametrize("precond", sorted(PRECONDS))
@pytest.mark.parametrize("backbone", sorted(TINY_BACKBONES))
def test_float64_input_float64_output_network_in_float32(backbone, precond):
    net, shape = tiny_net(backbone, precond)
    seen = []
    net.model.register_forward_hook(lambda mod, args, kwargs_out=None: seen.append(args[0].dtype))
    g = torch.Generator().manual_seed(2)
    sigma = torch.tensor([0.05, 0.7, 9.0], dtype=torch.float64)
    x64 = sigma.reshape(-1, *[1] * len(shape)) * torch.randn(3, *shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        out64 = net(x64, sigma)
        out32 = net(x64.float(), sigma.float())
    assert seen == [torch.float32, torch.float32]  # the network runs in its own precision
    assert out64.dtype == torch.float64 and out32.dtype == torch.float32
    assert out64.shape == x64.shape
    # within float32 round-off of the float32 path, which is a real function of x (not a constant)
    scale = 1 + out64.abs().max()
    assert float((out64 - out32.double()).abs().max()) < 2e-5 * scale
    with torch.no_grad():
        assert float((out64 - net(x64.flip(0), sigma)).abs().max()) > 1e-3


def test_float64_skip_path_keeps_the_state_precision():
    """VE at σ = 80: D = x + σ·F; the float64 path keeps x exactly, the float32 one rounds it."""
    net, shape = tiny_net("unet-small", "ve")
    x = torch.full((1, *shape), 80.0, dtype=torch.float64) + 1e-9
    sigma = torch.tensor([80.0], dtype=torch.float64)
    with torch.no_grad():
        f = net.model((x).float(), (0.5 * sigma.float()).log()).double()
        out = net(x, sigma)
    torch.testing.assert_close(out, x + sigma * f, rtol=1e-15, atol=1e-12)


def _recording(seen, name="dpdm"):
    def sampler(denoiser, x, sigmas, **kw):
        seen.append(x.dtype)
        return SAMPLERS[name](denoiser, x, sigmas, **kw)

    return sampler


def test_generation_state_is_float64_by_default():
    net, shape = tiny_net()
    sigmas = get("schedule", "karras")(3)
    seen = []
    x = generation.generate(net, _recording(seen), sigmas, 4, shape, seed=1, batch_size=2)
    assert seen == [torch.float64, torch.float64] and x.dtype == torch.float32  # items come back float32
    seen.clear()
    evaluate.generate(net, _recording(seen), sigmas, 3, shape, seed=1)
    assert seen == [torch.float64]
    seen.clear()
    generation.generate(net, _recording(seen), sigmas, 3, shape, seed=1, dtype=torch.float32)  # still selectable
    assert seen == [torch.float32]
    seen.clear()
    value, first = scoring.score(net, _recording(seen), sigmas, lambda a, b: float(a.mean()), None, num=3,
                                 shape=shape, keep=2)
    assert seen == [torch.float64] and first.shape == (2, *shape)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_float64_state_within_round_off_of_float32(name):
    net, shape = tiny_net()
    sigmas = get("schedule", "karras")(4, sigma_max=20.0)
    kw = dict(seed=3, batch_size=4)
    x64 = generation.generate(net, SAMPLERS[name], sigmas, 4, shape, **kw)
    x32 = generation.generate(net, SAMPLERS[name], sigmas, 4, shape, dtype=torch.float32, **kw)
    other = generation.generate(net, SAMPLERS[name], sigmas, 4, shape, **{**kw, "seed": 4})
    assert float((x64 - x32).abs().max()) < 1e-4 * (1 + float(x64.abs().max()))
    assert float((x64 - other).abs().max()) > 1e-2  # the comparison can fail: another seed is far away
