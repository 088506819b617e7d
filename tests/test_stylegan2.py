"""Tests of the ``stylegan2`` backbone (``dpdm.nets.stylegan2``): a StyleGAN2 generator with an x_t encoder."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

import dpdm.core
from dpdm.core.train.distill import DPDM
from dpdm.core.divergences import SmoothedKL
from dpdm.core.losses import EDMLoss
from dpdm.core.precond import EDMPrecond
from dpdm.core.sigmas import SigmaDist
from dpdm.nets.stylegan2 import StyleGAN2Denoiser, modulated_conv2d

torch.set_num_threads(1)

LABEL_DIM = 3
TINY = {"channels": 8, "channel_max": 16, "w_dim": 16, "mapping_layers": 2}


def tiny(shape=(1, 16, 16), label_dim=0, **options):
    return dpdm.core.get("backbone", "stylegan2")(shape, label_dim=label_dim, **{**TINY, **options})


def one_hot(indices, label_dim=LABEL_DIM):
    return F.one_hot(torch.as_tensor(indices), label_dim).float()


def perturb_zero_parameters(net: torch.nn.Module, scale: float = 0.1) -> None:
    """Give random values to zero-initialised parameters (noise strengths, biases)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(scale * torch.randn(p.shape, generator=gen))


def test_registry_lookup_and_plugin_signature():
    factory = dpdm.core.get("backbone", "stylegan2")
    net = factory((1, 8, 8), **TINY)
    assert isinstance(net, StyleGAN2Denoiser)
    assert net.noise_mode == "const" and net.resolutions == [4, 8]


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 8, 8), (1, 32, 32), (3, 32, 32), (3, 64, 64)])
@pytest.mark.parametrize("label_dim", [0, LABEL_DIM])
def test_output_shape_matches_input(shape, label_dim):
    torch.manual_seed(0)
    net = tiny(shape, label_dim=label_dim, channels=4, channel_max=8)
    x = torch.randn(2, *shape)
    labels = one_hot([0, 2]) if label_dim else None
    out = net(x, torch.tensor([-1.0, 0.5]), class_labels=labels)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("shape", [(1, 16, 8), (1, 12, 12), (1, 2, 2), (16, 16), (1, 6, 6)])
def test_bad_sizes_raise(shape):
    with pytest.raises(ValueError):
        tiny(shape)


def test_bad_noise_mode_raises():
    with pytest.raises(ValueError, match="noise_mode"):
        tiny(noise_mode="sometimes")


def test_demodulation_gives_unit_std():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 40, 40, generator=gen)
    weight = torch.randn(24, 32, 3, 3, generator=gen)
    styles = torch.rand(2, 32, generator=gen) * 2 + 0.1  # arbitrary per-sample scales
    out = modulated_conv2d(x, weight, styles, demodulate=True, padding=1)[:, :, 1:-1, 1:-1]  # interior
    std = out.std(dim=(2, 3))  # (B, Cout)
    assert torch.allclose(std, torch.ones_like(std), atol=0.1)


@pytest.mark.parametrize("demodulate", [True, False])
def test_grouped_modulated_conv_equals_per_sample_conv(demodulate):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 7, 7, generator=gen, dtype=torch.float64)
    weight = torch.randn(6, 5, 3, 3, generator=gen, dtype=torch.float64)
    styles = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    out = modulated_conv2d(x, weight, styles, demodulate=demodulate, padding=1)
    for b in range(2):
        wb = weight * styles[b].reshape(1, -1, 1, 1)
        if demodulate:
            wb = wb / (wb.square().sum(dim=(1, 2, 3), keepdim=True) + 1e-8).sqrt()
        ref = F.conv2d(x[b : b + 1], wb, padding=1)
        torch.testing.assert_close(out[b : b + 1], ref)


def test_sigma_class_and_x_change_the_output():
    torch.manual_seed(0)
    net = tiny(label_dim=LABEL_DIM).eval()
    x = torch.randn(2, 1, 16, 16)
    sigma = torch.tensor([0.0, 0.3])
    labels = one_hot([0, 1])
    out = net(x, sigma, labels)
    assert not torch.allclose(net(x, sigma + 0.5, labels), out)
    assert not torch.allclose(net(x, sigma, one_hot([2, 2])), out)
    assert not torch.allclose(net(x, sigma, None), net(x, sigma, labels))
    x2 = x.clone()
    x2[:, :, 3, 5] += 1.0
    assert not torch.allclose(net(x2, sigma, labels), out)


def test_deterministic_in_eval_and_random_noise_in_train():
    torch.manual_seed(0)
    net = tiny()
    perturb_zero_parameters(net)  # nonzero noise strengths
    x, sigma = torch.randn(2, 1, 16, 16), torch.tensor([-0.5, 0.2])
    net.eval()
    assert torch.equal(net(x, sigma), net(x, sigma))
    net.noise_mode = "none"
    assert torch.equal(net(x, sigma), net(x, sigma))
    net.noise_mode = "random"
    net.train()
    assert not torch.allclose(net(x, sigma), net(x, sigma))
    net.noise_mode = "none"
    assert torch.equal(net(x, sigma), net(x, sigma))


def test_output_starts_near_zero():
    torch.manual_seed(0)
    net = tiny().eval()
    out = net(torch.randn(4, 1, 16, 16), torch.zeros(4))
    assert 0 < out.abs().max() < 0.3


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = tiny((3, 16, 16), label_dim=LABEL_DIM)
    perturb_zero_parameters(net)
    out = net(torch.randn(2, 3, 16, 16), torch.tensor([-1.0, 0.3]), one_hot([0, 2]))
    out.square().sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


def test_adam_steps_reduce_the_edm_loss():
    torch.manual_seed(0)
    denoiser = EDMPrecond(tiny((1, 8, 8)), sigma_data=0.5)
    y = 0.5 * torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 2.0, 4.0])
    loss_fn = EDMLoss()
    opt = torch.optim.Adam(denoiser.parameters(), lr=1e-2)

    def loss():
        torch.manual_seed(3)  # same noise every time
        return loss_fn(denoiser, y, sigma=sigma).mean()

    denoiser.eval()
    with torch.no_grad():
        before = float(loss())
    for _ in range(20):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        after = float(loss())
    assert after < 0.9 * before


def test_short_dpdm_run_with_stylegan2_student():
    torch.manual_seed(0)
    teacher = EDMPrecond(dpdm.core.get("backbone", "unet-small")((1, 8, 8), channels=8, channel_mult=(1,),
                                                                 num_blocks=1, emb_dim=16))
    before_teacher = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = EDMPrecond(tiny((1, 8, 8)))
    before_student = [p.detach().clone() for p in student.parameters()]
    algo = DPDM(teacher, SmoothedKL(SigmaDist("log-uniform", min=0.01, max=10.0)), EDMLoss(), lr=1e-3,
                student=student, fake=copy.deepcopy(teacher))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        stats = algo.step(lambda: (0.5 * torch.randn(4, 1, 8, 8, generator=g), None), generator=g)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before_teacher[k])
    assert any(not torch.equal(a, b) for a, b in zip(student.parameters(), before_student))
