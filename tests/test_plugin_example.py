"""examples/dpdm-plugin-example: a real third-party plugin, outside the dpdm namespace.

The fast tests register the example's plugin module directly (no install) and check its components:
the ``acme-mlp`` backbone through the registry, and the ``acme-midpoint`` sampler's NFE, dtype and
second-order convergence against a closed-form Gaussian denoiser. The install test builds the example
with pip into this environment (non-editable, so it is a real distribution found through its entry
point), checks ``dpdm plugins --json`` and a tiny ``dpdm run`` in fresh interpreters, and uninstalls it.
Installing takes about a second (hatchling, no build isolation), so it is not marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpdm.core import plugin_manager
from dpdm.core.plugins.registry import entry, get

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "dpdm-plugin-example"
RECIPE = EXAMPLE / "recipe.yaml"
DIST = "dpdm-plugin-example"
PLUGIN_NAME = "acme-example-under-test"


def _dist_version() -> str:
    """The version in the example's pyproject.toml (what ``dpdm plugins`` must report once installed)."""
    match = re.search(r'^version = "([^"]+)"$', (EXAMPLE / "pyproject.toml").read_text(), re.MULTILINE)
    assert match
    return match.group(1)


# --- fast: register the plugin module object directly -------------------------------------------------------------


@pytest.fixture
def acme():
    """The example's ``acme_dpdm.plugin`` module, imported from its source tree and registered by hand."""
    src = str(EXAMPLE / "src")
    sys.path.insert(0, src)
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "acme_dpdm" or k.startswith("acme_dpdm.")}
    pm = plugin_manager()
    try:
        import acme_dpdm.plugin as module

        assert Path(module.__file__).is_relative_to(EXAMPLE / "src")
        pm.register(module, name=PLUGIN_NAME)
        try:
            yield module
        finally:
            pm.unregister(name=PLUGIN_NAME)
    finally:
        sys.path.remove(src)
        for k in [k for k in sys.modules if k == "acme_dpdm" or k.startswith("acme_dpdm.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_components_are_registered(acme):
    assert get("backbone", "acme-mlp") is acme.acme_mlp
    assert get("sampler", "acme-midpoint") is acme.sample_midpoint
    assert entry("sampler", "acme-midpoint").plugin == PLUGIN_NAME
    assert [entry("sampler", "acme-midpoint").meta["nfe"](n) for n in (1, 2, 5)] == [1, 3, 9]  # like Heun


@pytest.mark.parametrize("shape,label_dim", [((2,), 0), ((1, 8, 8), 0), ((3,), 4)])
def test_backbone_shapes_and_gradients(acme, shape, label_dim):
    torch.manual_seed(0)
    net = get("backbone", "acme-mlp")(shape=shape, label_dim=label_dim, width=16, depth=2)
    x = torch.randn(5, *shape)
    labels = torch.nn.functional.one_hot(torch.arange(5) % label_dim, label_dim).float() if label_dim else None
    out = net(x, torch.randn(5), class_labels=labels)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.count_nonzero(out) == 0  # zero-initialised output layer: F = 0 at the start
    out.square().sum().backward()
    assert net.linear_out.weight.grad is not None
    # a single (scalar) noise label broadcasts over the batch
    assert net(x, torch.tensor(0.3)).shape == x.shape
    with pytest.raises(ValueError, match="expected items of shape"):
        net(torch.randn(5, 7), torch.randn(5))


SIGMA_DATA = 0.5


def gaussian_denoiser(calls=None):
    """The exact denoiser of data ~ N(0, σ_d² I): D(x, σ) = x·σ_d² / (σ_d² + σ²)."""

    def denoiser(x, sigma, class_labels=None):
        if calls is not None:
            calls.append(float(sigma))
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return (x.double() * SIGMA_DATA**2 / (SIGMA_DATA**2 + sigma**2))

    return denoiser


def _schedule(n, sigma_max=10.0, sigma_min=0.05):
    """``n`` geometric positive sigmas followed by 0 (so the last of the ``n`` steps is the Euler step to 0)."""
    positive = torch.logspace(math.log10(sigma_max), math.log10(sigma_min), n, dtype=torch.float64)
    return torch.cat([positive, torch.zeros(1, dtype=torch.float64)])


def _error(sampler, n):
    """Max error vs the exact probability-flow ODE solution at σ_min followed by the same final Euler step."""
    sigmas = _schedule(n)
    sigma_max, sigma_min = float(sigmas[0]), float(sigmas[-2])
    x0 = torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None] * sigma_max
    out = sampler(gaussian_denoiser(), x0.clone(), sigmas)
    exact_at_min = x0 * math.sqrt(SIGMA_DATA**2 + sigma_min**2) / math.sqrt(SIGMA_DATA**2 + sigma_max**2)
    exact = gaussian_denoiser()(exact_at_min, sigma_min)  # the final step to 0 is D(x, σ_min) for every sampler
    return float((out - exact).abs().max())


def mixture_denoiser(x, sigma, class_labels=None):
    """The exact denoiser of data ~ ½N(−μ, s²) + ½N(μ, s²) (closed form: posterior-weighted Gaussian means)."""
    mu, s = 1.0, SIGMA_DATA
    x, sigma = x.double(), torch.as_tensor(sigma, dtype=torch.float64)
    v = s**2 + sigma**2
    w = torch.softmax(torch.stack([-(x - mu) ** 2, -(x + mu) ** 2]) / (2 * v), dim=0)
    means = torch.stack([(x * s**2 + mu * sigma**2) / v, (x * s**2 - mu * sigma**2) / v])
    return (w * means).sum(0)


def test_midpoint_is_second_order(acme):
    """Halving the step quarters the error (the ODE solved to 1e-12 by scipy is the reference)."""
    from scipy.integrate import solve_ivp

    sigmas = _schedule(2)
    sigma_max, sigma_min = float(sigmas[0]), float(sigmas[-2])
    x0 = torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None] * sigma_max

    def slope(sigma, y):
        y = torch.from_numpy(y)
        return ((y - mixture_denoiser(y, sigma)) / sigma).numpy()

    sol = solve_ivp(slope, (sigma_max, sigma_min), x0[:, 0].numpy(), method="DOP853", rtol=1e-12, atol=1e-12)
    exact = mixture_denoiser(torch.from_numpy(sol.y[:, -1])[:, None], sigma_min)  # + the final Euler step to 0

    def error(sampler, n):
        return float((sampler(mixture_denoiser, x0.clone(), _schedule(n)) - exact).abs().max())

    errors = {n: error(acme.sample_midpoint, n) for n in (65, 129, 257)}
    ratios = [errors[65] / errors[129], errors[129] / errors[257]]
    assert 3.3 < ratios[0] < 4.5 and 3.6 < ratios[1] < 4.4, (errors, ratios)  # → 4: second order
    # the check tells orders apart: Euler only halves the error
    euler = get("sampler", "euler")
    assert 1.7 < error(euler, 129) / error(euler, 257) < 2.3


def test_midpoint_converges_on_a_gaussian(acme):
    """On a single Gaussian (closed-form ODE solution) the error falls at least as fast as second order;
    the midpoint rule's h² term cancels for this linear ODE, so the ratio is about 8 there."""
    errors = {n: _error(acme.sample_midpoint, n) for n in (33, 65, 129)}
    assert errors[129] < 1e-5
    assert errors[33] / errors[65] > 3.5 and errors[65] / errors[129] > 3.5, errors


def test_midpoint_nfe_dtype_and_callback(acme):
    calls, steps = [], []
    sigmas = _schedule(6)
    x = torch.randn(4, 2, dtype=torch.float32) * 10
    out = acme.sample_midpoint(gaussian_denoiser(calls), x, sigmas, callback=steps.append)
    assert len(calls) == entry("sampler", "acme-midpoint").meta["nfe"](6) == 11
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert [s["i"] for s in steps] == list(range(6))
    assert torch.is_grad_enabled()  # grad mode is restored after the sampler's no_grad block
    # deterministic and pure: the input is not modified
    x_before = x.clone()
    again = acme.sample_midpoint(gaussian_denoiser(), x, sigmas)
    assert torch.equal(x, x_before) and torch.equal(out, again)


# --- installed: a real distribution found through its entry point --------------------------------------------------


def _pip(*args):
    return subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check"],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def installed():
    if importlib.util.find_spec("hatchling") is None:
        pytest.skip("hatchling is needed to build the example without build isolation "
                    "(it is in requirements-dev.txt)")
    if _pip("show", DIST).returncode == 0:
        pytest.skip(f"{DIST} is already installed in this environment; not touching it")
    plugin_manager()  # load this process's entry points before the install, so the plugin never leaks in here
    result = _pip("install", "--no-build-isolation", "--no-deps", "--no-index", "--quiet", str(EXAMPLE))
    assert result.returncode == 0, result.stdout + result.stderr
    try:
        yield
    finally:
        result = _pip("uninstall", "-y", DIST)
        assert result.returncode == 0, result.stdout + result.stderr


def _dpdm(*args, cwd):
    """``dpdm`` in a fresh interpreter (entry points are read at start-up)."""
    env = {**os.environ, "COLUMNS": "1000", "OMP_NUM_THREADS": "1"}
    script = Path(sys.executable).with_name("dpdm")  # the console script of this environment
    command = [str(script)] if script.exists() else [sys.executable, "-m", "dpdm.cli"]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env)


def test_installed_plugin_is_listed(installed, tmp_path):
    result = _dpdm("plugins", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    version = _dist_version()
    expected = {"distribution": DIST, "version": version, "plugin": "acme"}
    assert {e["name"]: e for e in data["backbone"]}["acme-mlp"] == {"name": "acme-mlp", **expected}
    assert {e["name"]: e for e in data["sampler"]}["acme-midpoint"] == {"name": "acme-midpoint", **expected}


def test_installed_plugin_runs_the_recipe(installed, tmp_path):
    out = tmp_path / "run"
    result = _dpdm("run", RECIPE, "--out", out, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    teacher = report["sweep"]["teacher"]
    assert list(teacher) == ["heun", "acme-midpoint"]
    assert list(teacher["acme-midpoint"]) == ["1", "3", "5"]  # NFE 2N-1: every odd NFE is reachable
    assert all(math.isfinite(v) for v in teacher["acme-midpoint"].values())
    config = (out / "config.yaml").read_text()
    assert "name: acme-mlp" in config and "name: acme-midpoint" in config


def test_recipe_opens_with_its_run_comment():
    assert RECIPE.read_text().startswith("# Run:")
