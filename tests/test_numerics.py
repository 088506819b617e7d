"""Evaluation numerics as EDM's ``generate.py`` does them: the sampler state in float64 with the network in its
own precision, the schedule clamped to the network's σ range, and uint8 images by truncation after +128."""

from __future__ import annotations

import pytest
import torch

from dpdm.core.eval import generation, protocols
from dpdm.core.precond import EDMPrecond, VEPrecond, VPPrecond
from dpdm.core.plugins.registry import get
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
    generation.generate(net, _recording(seen), sigmas, 3, shape, seed=1)
    assert seen == [torch.float64]
    seen.clear()
    generation.generate(net, _recording(seen), sigmas, 3, shape, seed=1, dtype=torch.float32)  # still selectable
    assert seen == [torch.float32]
    seen.clear()
    value, first = protocols.score(net, _recording(seen), sigmas, lambda a, b: float(a.mean()), None, num=3,
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


# --- R2: the schedule clamped to the network's σ range ---------------------------------------------------------

def karras_formula(n, lo, hi, rho):
    """Karras et al. 2022, Eq. 5, written out here, with σ_n = 0."""
    i = torch.arange(n, dtype=torch.float64)
    t = (hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def ve_net(**kw):
    torch.manual_seed(0)
    shape, options = TINY_BACKBONES["unet-small"]
    return VEPrecond(perturbed(get("backbone", "unet-small")(shape, **options)), **kw), shape


def test_ve_karras_schedule_is_clamped_at_both_ends():
    net, _ = ve_net()  # EDM's VE range: 0.02 … 100
    assert (net.sigma_min, net.sigma_max) == (0.02, 100.0)
    sched = generation.schedule_for(net, {"name": "karras", "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0})
    got = sched(10)
    torch.testing.assert_close(got, karras_formula(10, 0.02, 80.0, 7.0), rtol=1e-14, atol=0)
    assert float(got[-2]) == pytest.approx(0.02, rel=1e-12) and float(got[0]) == pytest.approx(80.0, rel=1e-12)
    unclamped = get("schedule", "karras")(10, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    assert float(unclamped[-2]) < 0.01  # the clamp changed something
    top = sched(6, sigma_max=500.0)
    torch.testing.assert_close(top, karras_formula(6, 0.02, 100.0, 7.0), rtol=1e-14, atol=0)
    spec = {"name": "karras", "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}
    assert torch.equal(generation.sigmas_for(net, spec, 6, sigma_max=500.0), sched(6, sigma_max=500.0))
    # one step: [σ_max, 0] with σ_max in range
    assert generation.sigmas_for(net, {"name": "dpdm"}, 1, sigma_max=500.0).tolist() == [100.0, 0.0]
    assert generation.sigmas_for(net, {"name": "dpdm"}, 1, sigma_max=0.001).tolist() == [0.02, 0.0]


def test_dpdm_schedule_clamped_only_where_its_sigma_min_is_below_the_range():
    from dpdm.core.schedules import dpdm_sigma_min

    net, _ = ve_net()
    sched = generation.schedule_for(net, {"name": "dpdm"})
    plain = get("schedule", "dpdm")
    lows = [n for n in range(2, 12) if dpdm_sigma_min(n) < 0.02]
    highs = [n for n in range(2, 12) if dpdm_sigma_min(n) >= 0.02]
    assert lows and highs
    for n in highs:
        assert torch.equal(sched(n), plain(n))
    for n in lows:
        got = sched(n)
        assert float(got[-2]) == pytest.approx(0.02, rel=1e-12) and got[0] == plain(n)[0]
        torch.testing.assert_close(got, plain(n, sigma_min=0.02), rtol=1e-14, atol=0)


def test_edm_precond_and_rangeless_denoisers_are_not_clamped():
    net, _ = tiny_net("unet-small", "edm")  # 0 … inf
    for name in ("karras", "dpdm"):
        for n in (1, 4, 9):
            assert torch.equal(generation.sigmas_for(net, {"name": name}, n), get("schedule", name)(n))

    def plugin_denoiser(x, sigma, class_labels=None):  # declares no σ range
        return x * 0

    assert torch.equal(generation.sigmas_for(plugin_denoiser, {"name": "karras"}, 5), get("schedule", "karras")(5))


def test_schedule_without_range_options_is_clamped_value_by_value():
    from dpdm.core.schedules import clamp_to_network

    net, _ = ve_net()
    fixed = lambda n: torch.tensor([150.0, 3.0, 0.01, 0.0], dtype=torch.float64)  # noqa: E731
    assert clamp_to_network(fixed, net)(3).tolist() == [100.0, 3.0, 0.02, 0.0]


def test_every_evaluation_route_samples_the_clamped_schedule(monkeypatch):
    net, shape = ve_net()
    seen = []

    def fake_generate_items(model, sampler, sigmas, indices, shape, **kw):
        seen.append(sigmas.clone())
        yield torch.as_tensor(list(indices)), torch.zeros(len(indices), *shape)

    monkeypatch.setattr(generation, "generate_items", fake_generate_items)
    metric = lambda x, ref: 0.0  # noqa: E731
    common = dict(num=2, shape=shape, label_dim=0, seed=0, device="cpu")
    spec = {"name": "karras", "sigma_min": 0.002, "sigma_max": 80.0}
    protocols.sweep_student(net, metric, None, sampler={"name": "dpdm"}, schedule=spec, steps=[2, 5], **common)
    protocols.sweep_teacher(net, metric, None, samplers=[{"name": "euler"}, {"name": "heun"}], schedule=spec,
                           nfes=[3, 5], **common)
    protocols.best_one_step(net, metric, None, None, sampler={"name": "dpdm"}, schedule=spec,
                           sigma_maxes=[0.015, 2.5, 400.0], **common)
    assert len(seen) == 2 + 4 + 4
    for sigmas in seen:
        positive = sigmas[sigmas > 0]
        assert float(positive.min()) >= 0.02 * (1 - 1e-12) and float(positive.max()) <= 100.0
    assert float(seen[0][-2]) == pytest.approx(0.02, rel=1e-12)  # sweep_student, 2 steps
    assert [float(s[0]) for s in seen[6:9]] == [0.02, 2.5, 100.0]  # one step from each candidate σ_max


def test_fid_at_steps_records_the_clamped_sigmas():
    net, shape = ve_net()
    results, _ = protocols.fid_at_steps(net, sampler={"name": "euler"}, schedule={"name": "karras"}, steps=[4],
                                      metric=lambda x, ref: float(x.abs().mean()), reference=None, num=3,
                                      shape=shape)
    sigmas = results[4]["sigmas"]
    assert sigmas[-2] == pytest.approx(0.02, rel=1e-12) and sigmas[-1] == 0.0
    assert sigmas == generation.sigmas_for(net, {"name": "karras"}, 4).tolist()
    values, _ = protocols.nfe_sweep(None, net, metric=lambda x, ref: float(x.abs().mean()), reference=None,
                                  student_sampler={"name": "dpdm"}, student_schedule={"name": "dpdm"}, student_nfe=[],
                                  teacher_samplers=[{"name": "euler"}], teacher_schedule={"name": "karras"},
                                  teacher_nfe=[4], num=3, shape=shape)
    assert values["teacher"]["euler"][4] == pytest.approx(results[4]["value"], rel=1e-12)


# --- R3: uint8 images as EDM saves them ------------------------------------------------------------------------

def edm_uint8(x: torch.Tensor) -> torch.Tensor:
    """EDM's generate.py: (images * 127.5 + 128).clip(0, 255).to(torch.uint8), on float64 images."""
    return (x.double() * 127.5 + 128).clip(0, 255).to(torch.uint8)


def test_from_model_truncates_after_plus_128_as_edm():
    from dpdm.core.datasets import from_model, to_model

    k = torch.arange(-3, 260, dtype=torch.float64)
    exact = (k - 128) / 127.5  # x·127.5 + 128 lands on an integer k (here rounding and truncation differ)
    halves = (k - 127.5) / 127.5  # … on k + 0.5
    eps = 1e-9
    x = torch.cat([exact, exact - eps, exact + eps, halves, halves - eps, halves + eps,
                   torch.tensor([-1.0, 1.0, 0.0, -1.2, 1.3, -50.0, 50.0, 1 - 1e-12, -1 + 1e-12], dtype=torch.float64)])
    got = from_model(x, "image")
    assert got.dtype == torch.uint8
    assert torch.equal(got, edm_uint8(x))
    # spelled out: -1 → 0.5 → 0; 1 → 255.5 → 255; 0 → 128; out of range clipped
    assert from_model(torch.tensor([-1.0, 1.0, 0.0, -3.0, 3.0]), "image").tolist() == [0, 0 + 255, 128, 0, 255]
    # just below an integer truncates down (rounding would give the integer)
    assert from_model(torch.tensor([(200 - 128) / 127.5 - 1e-9], dtype=torch.float64), "image").item() == 199
    # float32 input: EDM's rule on its exact value
    x32 = torch.linspace(-1.1, 1.1, 100_003)
    assert torch.equal(from_model(x32, "image"), edm_uint8(x32))
    # uint8 → model space → uint8 is the identity
    u = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(from_model(to_model(u), "image"), u)
    # and the old rule, round((x + 1)·127.5), is a different function (it differs at odd integers k)
    old = ((exact + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    assert not torch.equal(old, from_model(exact, "image"))


def test_feature_statistics_convert_the_float64_state_to_uint8():
    """FID's images are EDM's uint8 of the float64 state, not of a float32 copy (which can cross a boundary)."""
    from dpdm.core.datasets import from_model

    k = torch.arange(1, 255, dtype=torch.float64)
    target = ((k - 128) / 127.5 - 1e-12).reshape(1, 1, 1, -1)  # just below integer k: truncates to k - 1
    differs = edm_uint8(target) != edm_uint8(target.float())
    assert differs.any()  # for some pixels the float32 copy lands on the other side

    def fixed(denoiser, x, sigmas, **kw):
        return target.expand(len(x), -1, -1, -1).to(x.dtype)

    class Recorder:
        feature_dim = 2

        def __init__(self):
            self.seen = []

        def __call__(self, images):
            self.seen.append(images)
            return torch.stack([images.double().mean(dim=(1, 2, 3)), images.double().std(dim=(1, 2, 3))], 1)

    det = Recorder()
    kept = []
    protocols.sample_feature_stats(None, fixed, torch.tensor([1.0, 0.0], dtype=torch.float64), 3,
                                   tuple(target.shape[1:]), det, on_batch=lambda idx, x: kept.append(x))
    images = torch.cat(det.seen)
    assert images.dtype == torch.uint8 and torch.equal(images, edm_uint8(target).expand(3, -1, -1, -1))
    assert torch.equal(from_model(target, "image"), edm_uint8(target))
    assert kept[0].dtype == torch.float32  # grids still get float32 model-space items
