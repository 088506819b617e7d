"""One path from a recipe to an object: registered metadata (``nfe``, ``note``, the ``fd`` family), ``build``,
the recipe's sampler options reaching the sampler on every route (in-run evaluation, training grids, ``dpdm eval``,
``dpdm sample``), the run's device reaching every metric that declares one, and a ``dpdm run`` that builds each
dataset split and the metric once (``preflight`` returns a ``Plan`` that the run consumes)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dpdm.cli.main import app
from dpdm.core import UnknownComponentError, get, hookimpl, plugin_manager
from dpdm.core.eval.metrics import energy_distance, make_metric
from dpdm.core.eval.report import metric_note
from dpdm.core.plugins.registry import build, entry
from dpdm.core.samplers import sample_dpdm

torch.set_num_threads(1)

TOY2D = str(Path(__file__).resolve().parent.parent / "recipes" / "toy2d.yaml")
TINY = [
    "teacher.train.steps=20", "train.steps=6", "train.fake_updates=1", "eval.num_samples=200",
    "eval.recovery_num=200", "eval.teacher_nfe=[1,2]", "eval.student_steps=[1,2]", "eval.one_step_sigma_max=[80.0]",
    "model.backbone.hidden=16", "model.backbone.depth=1", "engine.sample_every=5",
]
ROUTES = {  # the module whose frame is on the stack when a sampler is called, per route
    "dpdm.core.eval.hooks": "training grid",
    "dpdm.core.pipeline.evaluation": "in-run evaluation",
    "dpdm.cli.evaluation": "dpdm eval",
    "dpdm.cli.sample": "dpdm sample",
}
CALLS: list[tuple[str, str]] = []  # (route, tag) of every probe-sampler call
BUILT: Counter = Counter()  # constructions of the counting dataset (by split) and metric
DEVICES: list = []


def _route() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module in ROUTES:
            return ROUTES[module]
        frame = frame.f_back
    return "other"


def sample_probe(denoiser, x, sigmas, *, generator=None, callback=None, class_labels=None, tag: str = "unset"):
    """Algorithm 2 (``sample_dpdm``), recording which route called it with which ``tag`` option."""
    CALLS.append((_route(), tag))
    return sample_dpdm(denoiser, x, sigmas, generator=generator, callback=callback, class_labels=class_labels)


def counted_ring(split: str = "train", **options):
    BUILT[f"dataset:{split}"] += 1
    return get("dataset", "gaussian-ring")(split=split, **options)


def counted_energy(*, device: str = "cpu"):
    BUILT["metric"] += 1
    DEVICES.append(device)
    return energy_distance


class Probes:
    @hookimpl
    def register_samplers(register):
        register("probe", sample_probe, nfe=lambda steps: steps)

    @hookimpl
    def register_datasets(register):
        register("counted-ring", counted_ring)

    @hookimpl
    def register_metrics(register):
        register("counted-energy", counted_energy, note="energy distance, counted; lower is better")


@pytest.fixture(scope="module")
def probes():
    pm = plugin_manager()
    plugin = Probes
    pm.register(plugin, name="test-one-path")
    yield
    pm.unregister(plugin)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "1000"})


def test_sampler_metadata_and_build_binds_the_options(probes):
    heun = build("sampler", "heun", {"S_churn": 0.0})
    assert heun.nfe(4) == 7 and heun.name == "heun" and heun.keywords == {"S_churn": 0.0}
    assert entry("sampler", "probe").meta["nfe"](3) == 3
    schedule = build("schedule", "karras", {"rho": 3.0})
    assert torch.equal(schedule(4), get("schedule", "karras")(4, rho=3.0))
    assert torch.equal(schedule(4, rho=7.0), get("schedule", "karras")(4))  # a call's keyword wins


def test_a_sampler_without_nfe_is_refused_at_registration():
    class NoNfe:
        @hookimpl
        def register_samplers(register):
            register("no-nfe", lambda denoiser, x, sigmas, **kw: x)

    pm = plugin_manager()
    plugin = NoNfe
    pm.register(plugin, name="test-no-nfe")
    try:
        with pytest.raises(ValueError, match=r"sampler 'no-nfe' from test-no-nfe needs nfe="):
            entry("sampler", "heun")
    finally:
        pm.unregister(plugin)


def test_the_fd_family_is_registered_not_special_cased():
    member = entry("metric", "fd-mnist")
    assert member.meta["family_of"] == "fd" and member.meta["family_option"] == ("dataset", "mnist")
    assert member.obj.keywords == {"dataset": "mnist"}
    assert "trained on mnist" in metric_note("fd-mnist")
    with pytest.raises(UnknownComponentError) as info:
        entry("metric", "fd-mnsit")
    assert str(info.value).startswith("metric 'fd-mnsit' is fd-{dataset} with dataset 'mnsit', but: unknown dataset "
                                      "'mnsit'. Did you mean 'mnist'? Registered datasets: ")
    with pytest.raises(UnknownComponentError, match=r"Registered metrics: .*fd-<dataset>"):
        entry("metric", "fdx")


def test_metric_notes_come_from_registration(probes):
    assert metric_note("energy").startswith("squared energy distance")
    assert metric_note("counted-energy") == "energy distance, counted; lower is better"
    assert metric_note("no-such-metric") == "a metric no installed plugin registers"


def test_the_run_device_reaches_every_metric_that_declares_one(probes):
    DEVICES.clear()
    make_metric("counted-energy", {}, device=torch.device("cpu"))
    make_metric("counted-energy", {"device": "meta"}, device=torch.device("cpu"))  # the options win
    assert DEVICES == ["cpu", "meta"]
    make_metric("energy", {}, device=torch.device("cpu"))  # declares no device: not handed one (no TypeError)


@pytest.fixture(scope="module")
def probe_run(probes, tmp_path_factory):
    """A tiny ``dpdm run`` whose student sampler, first teacher sampler, data and metric are the probes."""
    work = tmp_path_factory.mktemp("one-path")
    CALLS.clear()
    BUILT.clear()
    DEVICES.clear()
    sets = TINY + ["eval.student_sampler={name: probe, tag: student}",
                   "eval.teacher_samplers=[{name: probe, tag: teacher}, {name: euler}]",
                   "data.name=counted-ring", "eval.metric={name: counted-energy}"]
    result = invoke("run", TOY2D, *[p for s in sets for p in ("--set", s)], "--out", work / "run")
    assert result.exit_code == 0, (result.output, result.exception)
    return {"run": work / "run", "calls": list(CALLS), "built": Counter(BUILT), "devices": list(DEVICES)}


def test_a_run_builds_each_dataset_split_and_the_metric_once(probe_run):
    assert probe_run["built"] == Counter({"dataset:train": 1, "dataset:test": 1, "metric": 1})
    assert probe_run["devices"] == ["cpu"]


def test_sampler_options_reach_the_call_in_training_grids_and_in_run_evaluation(probe_run):
    calls = Counter(probe_run["calls"])
    assert calls[("training grid", "teacher")] >= 1  # the teacher's grid: its first sampler, not a hard-coded heun
    assert calls[("training grid", "student")] >= 1
    assert calls[("in-run evaluation", "student")] >= 1
    assert calls[("in-run evaluation", "teacher")] >= 1
    assert not [c for c in calls if c[1] == "unset"]
    grids = sorted(p.name for p in (probe_run["run"] / "figures" / "progress").iterdir())
    assert any(g.startswith("teacher-") for g in grids) and any(g.startswith("student-") for g in grids)


def test_sampler_options_reach_the_call_in_dpdm_eval_and_dpdm_sample(probe_run, tmp_path):
    run = probe_run["run"]
    CALLS.clear()
    result = invoke("eval", "sweep", "--run", run, "--num", 20, "--student-nfe", "1", "--teacher-nfe", "1",
                    "--teacher-sampler", "probe", "--out", tmp_path / "sweep")
    assert result.exit_code == 0, (result.output, result.exception)
    assert ("dpdm eval", "student") in CALLS and ("dpdm eval", "teacher") in CALLS
    CALLS.clear()
    result = invoke("sample", "--run", run, "--num", 4, "--steps", 2, "--out", tmp_path / "s.png")
    assert result.exit_code == 0, (result.output, result.exception)
    assert CALLS == [("dpdm sample", "student")]
