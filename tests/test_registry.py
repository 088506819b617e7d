"""Component registries: plugins registered at run time, duplicate and unknown names, the built-ins' sources,
and the promise that importing dpdm.core (and running ``dpdm --help``) does not import torch."""

from __future__ import annotations

import importlib.metadata
import math
import os
import subprocess
import sys

import pytest

import dpdm.core
from dpdm.core import DpdmError, DuplicateComponentError, UnknownComponentError, get, hookimpl, names, plugin_manager
from dpdm.core.plugins import registry

KINDS = ["backbone", "preconditioning", "schedule", "sampler", "divergence", "dataset", "metric"]
PLUGIN = "test-registry-plugin"


def _component(kind):
    def component(*args, **kwargs):
        return kind, args, kwargs

    component.nfe = lambda n: n  # samplers carry nfe(); harmless elsewhere
    component.__name__ = f"test_{kind}"
    return component


COMPONENTS = {kind: _component(kind) for kind in KINDS}


class RegistryPlugin:
    """One test component of every kind, each named ``test-<kind>``."""

    @hookimpl
    def register_backbones(register):
        register("test-backbone", COMPONENTS["backbone"])

    @hookimpl
    def register_preconditionings(register):
        register("test-preconditioning", COMPONENTS["preconditioning"])

    @hookimpl
    def register_schedules(register):
        register("test-schedule", COMPONENTS["schedule"])

    @hookimpl
    def register_samplers(register):
        register("test-sampler", COMPONENTS["sampler"])

    @hookimpl
    def register_divergences(register):
        register("test-divergence", COMPONENTS["divergence"])

    @hookimpl
    def register_datasets(register):
        register("test-dataset", COMPONENTS["dataset"])

    @hookimpl
    def register_metrics(register):
        register("test-metric", COMPONENTS["metric"])


class DuplicateHeun:
    @hookimpl
    def register_samplers(register):
        register("heun", COMPONENTS["sampler"])


@pytest.fixture
def registered():
    pm = plugin_manager()
    pm.register(RegistryPlugin, name=PLUGIN)
    try:
        yield
    finally:
        pm.unregister(name=PLUGIN)


@pytest.fixture
def duplicate():
    pm = plugin_manager()
    pm.register(DuplicateHeun, name="test-duplicate-heun")
    try:
        yield
    finally:
        pm.unregister(name="test-duplicate-heun")


# --- plugins registered at run time -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_registered_plugin_appears_by_name(registered, kind):
    name = f"test-{kind}"
    assert get(kind, name) is COMPONENTS[kind]
    assert name in names(kind)
    e = registry.entry(kind, name)
    assert (e.kind, e.name, e.plugin, e.distribution, e.version) == (kind, name, PLUGIN, None, None)
    assert e.source == f"an unregistered distribution (plugin {PLUGIN})"
    # the other kinds did not get it
    for other in KINDS:
        if other != kind:
            assert name not in names(other)


def test_unregistering_removes_components():
    pm = plugin_manager()
    pm.register(RegistryPlugin, name=PLUGIN)
    try:
        assert get("metric", "test-metric") is COMPONENTS["metric"]
    finally:
        pm.unregister(name=PLUGIN)
    assert "test-metric" not in names("metric")
    with pytest.raises(UnknownComponentError):
        get("metric", "test-metric")


class InstancePlugin:
    def __init__(self, obj):
        self.obj = obj

    @hookimpl
    def register_metrics(self, register):
        register("test-instance-metric", self.obj)


def test_fresh_plugin_objects_are_never_served_from_a_stale_cache():
    """Plugin objects registered one after another (often at a reused address) each get their own entry."""
    pm = plugin_manager()
    for _ in range(10):
        marker = object()
        plugin = InstancePlugin(marker)
        pm.register(plugin, name="test-instance-plugin")
        try:
            assert get("metric", "test-instance-metric") is marker
        finally:
            pm.unregister(name="test-instance-plugin")
        del plugin
    assert "test-instance-metric" not in names("metric")


# --- duplicates ---------------------------------------------------------------------------------------------


def test_duplicate_name_names_both_sources(duplicate):
    core = importlib.metadata.version("dpdm-core")
    with pytest.raises(DuplicateComponentError) as info:
        get("sampler", "heun")
    assert str(info.value) == (
        f"sampler 'heun' is registered twice: by dpdm-core {core} (plugin core) and by an unregistered "
        "distribution (plugin test-duplicate-heun). Uninstall one of the packages or rename the component in one "
        "plugin."
    )
    assert isinstance(info.value, DpdmError)
    with pytest.raises(DuplicateComponentError):  # every lookup fails, not just the first
        get("metric", "energy")


def test_registry_recovers_after_duplicate_is_removed():
    pm = plugin_manager()
    pm.register(DuplicateHeun, name="test-duplicate-heun")
    try:
        with pytest.raises(DuplicateComponentError):
            names("sampler")
    finally:
        pm.unregister(name="test-duplicate-heun")
    from dpdm.core.samplers import sample_heun

    assert get("sampler", "heun") is sample_heun


# --- unknown names and kinds --------------------------------------------------------------------------------


def test_unknown_name_message():
    with pytest.raises(UnknownComponentError) as info:
        get("sampler", "heum")
    err = info.value
    assert isinstance(err, KeyError) and isinstance(err, DpdmError)
    assert (err.kind, err.name) == ("sampler", "heum")
    assert err.available == ["dpdm", "dpmpp-2m", "euler", "euler-stochastic", "heun"]
    assert str(err) == (
        "unknown sampler 'heum'. Did you mean 'heun'? Registered samplers: dpdm, dpmpp-2m, euler, "
        "euler-stochastic, heun. Run `dpdm plugins` to see every component and the package that provides it."
    )


def test_unknown_name_without_close_match():
    with pytest.raises(KeyError) as info:  # catchable as a KeyError
        get("metric", "zzzzzz")
    assert str(info.value) == (
        "unknown metric 'zzzzzz'. Registered metrics: energy, fd, fd-<dataset>, fid, sliced-wasserstein. "
        "Run `dpdm plugins` to see every component and the package that provides it."
    )
    assert "Did you mean" not in str(info.value)


def test_unknown_kind():
    with pytest.raises(UnknownComponentError) as info:
        get("sampeler", "heun")
    assert str(info.value) == (
        "unknown component kind 'sampeler'. Did you mean 'sampler' or 'schedule'? Registered component kinds: "
        "backbone, dataset, divergence, metric, preconditioning, sampler, schedule. "
        "Run `dpdm plugins` to see every component and the package that provides it."
    )
    with pytest.raises(UnknownComponentError):
        names("nope")
    with pytest.raises(UnknownComponentError):
        registry.entries("nope")


# --- built-ins ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, name, dist, plugin",
    [
        ("sampler", "heun", "dpdm-core", "core"),  # dpdm-core's own entry points, as any plugin's
        ("schedule", "karras", "dpdm-core", "core"),
        ("preconditioning", "edm", "dpdm-core", "core"),
        ("divergence", "smoothed-kl", "dpdm-core", "core"),
        ("metric", "energy", "dpdm-core", "core-eval"),
        ("backbone", "mlp", "dpdm-nets", "nets"),
        ("dataset", "gaussian-ring", "dpdm-data", "data"),
    ],
)
def test_builtin_sources(kind, name, dist, plugin):
    e = registry.entry(kind, name)
    version = importlib.metadata.version(dist)
    assert version  # a real version string, e.g. "0.1.0"
    assert (e.distribution, e.version, e.plugin) == (dist, version, plugin)
    assert e.source == f"{dist} {version} (plugin {plugin})"


def test_builtin_names():
    assert names("sampler") == ["dpdm", "dpmpp-2m", "euler", "euler-stochastic", "heun"]
    assert names("schedule") == ["dpdm", "karras"]
    assert names("preconditioning") == ["edm", "ve", "vp"]
    assert names("divergence") == ["ikl", "smoothed-kl"]
    assert names("metric") == ["energy", "fd", "fid", "sliced-wasserstein"]
    assert {"mlp", "unet-small"} <= set(names("backbone"))
    assert {"gaussian-ring", "digits"} <= set(names("dataset"))


def test_karras_through_get_is_edm_exactly():
    import torch

    sigma_min, sigma_max, rho, n = 0.002, 80.0, 7.0, 18
    # EDM's edm_sampler (Karras et al. 2022), float64
    step_indices = torch.arange(n, dtype=torch.float64)
    t_steps = (sigma_max ** (1 / rho)
               + step_indices / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    edm = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])

    t = get("schedule", "karras")(18, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    assert t.dtype == torch.float64 and t.shape == (19,)
    assert torch.equal(t, edm)
    assert t[0].item() == 80.0 and t[-1].item() == 0.0


def test_heun_through_get_with_closed_form_gaussian_denoiser():
    import torch

    mu, s = 0.3, 0.5  # data N(mu, s²): D(x; σ) = mu + s²/(s²+σ²)·(x − mu)

    def D(x, sigma, class_labels=None):
        return mu + s**2 / (s**2 + sigma**2) * (x - mu)

    t = get("schedule", "karras")(18, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * t[0]
    out = get("sampler", "heun")(D, x, t)
    assert out.dtype == torch.float64 and out.shape == x.shape

    # EDM's deterministic Heun loop (S_churn = 0), written out
    ref = x.clone()
    for i in range(18):
        tc, tn = t[i], t[i + 1]
        d = (ref - D(ref, tc)) / tc
        nxt = ref + (tn - tc) * d
        if i < 17:
            nxt = ref + (tn - tc) * (0.5 * d + 0.5 * (nxt - D(nxt, tn)) / tn)
        ref = nxt
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)

    # the exact PF-ODE solution x(0) = mu + (x_T − mu)·s/√(s²+σ_T²); 18 Heun steps get within 5 %
    exact = mu + (x - mu) * s / math.sqrt(s**2 + 80.0**2)
    rel = float((out - exact).norm() / exact.norm())
    assert rel < 0.05, rel
    coarse = get("sampler", "heun")(D, x, get("schedule", "karras")(4))
    assert float((coarse - exact).norm() / exact.norm()) > rel  # more steps, closer


# --- import cost --------------------------------------------------------------------------------------------


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)


def test_import_dpdm_core_does_not_import_torch():
    r = _python("import sys, dpdm.core; from dpdm.core import get, names, plugin_manager, ConfigError; "
                "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_dpdm_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from dpdm.cli.main import app\n"
        "r = CliRunner().invoke(app, ['--help'])\n"
        "assert r.exit_code == 0, (r.exit_code, r.output)\n"
        "assert 'run' in r.output and 'recover' in r.output and 'sample' in r.output and 'plugins' in r.output\n"
        "print('torch' in sys.modules)\n"
    )
    r = _python(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_dpdm_entry_point_help_runs():
    r = subprocess.run([sys.executable, "-m", "dpdm.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Data-Prediction Denoising Models" in r.stdout


def test_lazy_attributes():
    assert dpdm.core.EDMPrecond is get("preconditioning", "edm")
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        dpdm.core.Nope  # noqa: B018
