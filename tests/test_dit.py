"""Tests of the ``dit`` backbone (pixel-space DiT, Peebles & Xie 2022)."""

from __future__ import annotations

import math

import pytest
import torch

from dpdm.core import get
from dpdm.core.losses import EDMLoss
from dpdm.core.precond import EDMPrecond
from dpdm.nets import plugin
from dpdm.nets.dit import DiT, make_dit, sincos_2d

torch.set_num_threads(1)

TINY = dict(hidden=32, depth=2, num_heads=4)


def tiny(shape=(3, 16, 16), label_dim=0, **kwargs) -> DiT:
    torch.manual_seed(0)
    return make_dit(shape, label_dim=label_dim, **{**TINY, **kwargs})


def perturb(net: DiT) -> DiT:
    """Give every all-zero parameter (adaLN-Zero, final layer, biases) random values."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return net


def one_hot(idx, label_dim):
    return torch.nn.functional.one_hot(torch.as_tensor(idx), label_dim).float()


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("resolution,patch_size", [(32, 2), (64, 4)])
@pytest.mark.parametrize("label_dim", [0, 10])
def test_output_shape_and_zero_at_init(channels, resolution, patch_size, label_dim):
    net = tiny((channels, resolution, resolution), label_dim=label_dim, patch_size=patch_size)
    x = torch.randn(2, channels, resolution, resolution)
    labels = one_hot([1, 7], label_dim) if label_dim else None
    with torch.no_grad():
        out = net(x, torch.tensor([-0.5, 0.3]), labels)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, torch.zeros_like(x))  # adaLN-Zero + zero final layer
    with torch.no_grad():
        assert perturb(net)(x, torch.tensor([-0.5, 0.3]), labels).abs().sum() > 0


def test_class_and_noise_conditioning():
    net = perturb(tiny(label_dim=10)).eval()
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([0.1, 0.1])
    with torch.no_grad():
        a = net(x, t, one_hot([1, 1], 10))
        b = net(x, t, one_hot([2, 2], 10))
        null = net(x, t, torch.zeros(2, 10))
        none = net(x, t, None)
        a_t = net(x, t + 0.5, one_hot([1, 1], 10))
        scalar_t = net(x, torch.tensor(0.1), one_hot([1, 1], 10))
    assert not torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, null, atol=1e-5)
    assert not torch.allclose(b, null, atol=1e-5)
    assert torch.equal(null, none)  # missing labels = all-zero rows = the null class
    assert not torch.allclose(a, a_t, atol=1e-5)
    torch.testing.assert_close(a, scalar_t)
    # Non-binary rows (e.g. soft one-hots) use their argmax.
    with torch.no_grad():
        soft = net(x, t, 0.3 * one_hot([1, 1], 10) + 0.01)
    torch.testing.assert_close(soft, a)


def test_class_dropout():
    net = perturb(tiny(label_dim=10, class_dropout=1.0))
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([0.0, 0.2, -0.4])
    labels = one_hot([0, 4, 9], 10)
    with torch.no_grad():
        net.train()
        dropped = net(x, t, labels)
        net.eval()
        null = net(x, t, torch.zeros(3, 10))
        kept = net(x, t, labels)
    torch.testing.assert_close(dropped, null)
    assert not torch.allclose(kept, null, atol=1e-5)
    assert net.y_embedder.table.num_embeddings == 11


def test_gradients_reach_every_parameter():
    net = perturb(tiny(label_dim=5))
    x = torch.randn(4, 3, 16, 16)
    out = net(x, torch.randn(4), one_hot([0, 1, 2, 4], 5))
    (out**2).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradients_at_init_reach_zero_layers():
    """adaLN-Zero: at init the zero final layer still gets a gradient, so training can start."""
    net = tiny(label_dim=0)
    (net(torch.randn(2, 3, 16, 16), torch.randn(2)) * torch.randn(2, 3, 16, 16)).sum().backward()
    assert net.final_layer.linear.weight.grad.abs().sum() > 0


def test_adam_reduces_edm_loss():
    net = tiny((1, 16, 16), label_dim=2, hidden=32, depth=1)
    denoiser = EDMPrecond(net)
    loss_fn = EDMLoss()
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(8, 1, 16, 16, generator=gen) * 0.5
    labels = one_hot([0, 1] * 4, 2)
    sigma = torch.exp(torch.randn(8, generator=gen) * 1.2 - 1.2)

    def loss():
        return loss_fn(denoiser, y, labels, generator=torch.Generator().manual_seed(3), sigma=sigma).mean()

    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    with torch.no_grad():
        before = loss().item()
    for _ in range(40):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        after = loss().item()
    assert math.isfinite(after) and after < 0.8 * before


@pytest.mark.parametrize("size,hidden,depth,heads,params_m", [
    ("S", 384, 12, 6, (32.0, 34.0)),
    ("B", 768, 12, 12, (129.0, 131.5)),
    ("L", 1024, 24, 16, (456.0, 460.0)),
    ("XL", 1152, 28, 16, (673.0, 677.0)),
])
def test_presets(size, hidden, depth, heads, params_m):
    # ImageNet-like setting (1000 classes); the paper's counts are 33M, 130M, 458M, 675M for /2.
    with torch.device("meta"):
        net = make_dit((4, 32, 32), label_dim=1000, size=size, patch_size=2)
    assert (net.hidden, net.depth, net.num_heads) == (hidden, depth, heads)
    assert len(net.blocks) == depth and net.blocks[0].attn.num_heads == heads
    count = sum(p.numel() for p in net.parameters()) / 1e6
    assert params_m[0] <= count <= params_m[1], count


def test_overrides_and_factory_zero_means_preset():
    with torch.device("meta"):
        net = plugin.dit((3, 32, 32), size="B", depth=3)
        assert (net.hidden, net.depth, net.num_heads) == (768, 3, 12)
        net = plugin.dit((3, 32, 32), size="XL", hidden=64, depth=1, num_heads=2, mlp_ratio=2.0)
        assert (net.hidden, net.depth, net.num_heads) == (64, 1, 2)
        assert net.blocks[0].mlp.fc1.out_features == 128


def test_sincos_position_embedding_formula():
    dim, grid = 8, 3
    emb = sincos_2d(dim, grid)
    assert emb.shape == (grid * grid, dim)
    for i in range(grid):  # row
        for j in range(grid):  # column
            expected = []
            for pos in (j, i):  # first half: column, second half: row (as DiT)
                omegas = [1.0 / 10000 ** (k / (dim // 4)) for k in range(dim // 4)]
                expected += [math.sin(pos * w) for w in omegas] + [math.cos(pos * w) for w in omegas]
            torch.testing.assert_close(emb[i * grid + j], torch.tensor(expected, dtype=torch.float64))
    net = tiny((3, 16, 16), patch_size=4)
    assert net.pos_embed.shape == (1, 16, 32) and "pos_embed" not in net.state_dict()
    torch.testing.assert_close(net.pos_embed[0], sincos_2d(32, 4).float())


def test_invalid_shapes_raise():
    with pytest.raises(ValueError, match="divisible"):
        make_dit((3, 30, 30), patch_size=4, **TINY)
    with pytest.raises(ValueError, match="square"):
        make_dit((3, 32, 16), **TINY)
    with pytest.raises(ValueError, match="size"):
        make_dit((3, 32, 32), size="XXL")
    with pytest.raises(ValueError, match="num_heads"):
        make_dit((3, 32, 32), hidden=30, depth=1, num_heads=4)
    net = tiny()
    with pytest.raises(ValueError, match="label_dim=0"):
        net(torch.zeros(1, 3, 16, 16), torch.zeros(1), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="shape"):
        net(torch.zeros(1, 3, 32, 32), torch.zeros(1))


def test_registry_lookup():
    factory = get("backbone", "dit")
    assert factory is plugin.dit
    net = factory(shape=(1, 16, 16), label_dim=3, **TINY)
    assert isinstance(net, DiT) and net.label_dim == 3
    out = EDMPrecond(net)(torch.randn(2, 1, 16, 16), torch.tensor([0.5, 2.0]), class_labels=torch.tensor([0, 2]))
    assert out.shape == (2, 1, 16, 16)
