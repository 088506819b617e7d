"""The run's figures, read off the matplotlib objects before saving (``eval.figures``): the NFE curve draws values at
or below the estimator's noise floor on a labelled floor line (no plunge), every figure has a title and its metric's
direction, a model/sampler has one colour in every figure, the teacher's sample figure shows its best NFE, and the
recovery panel shows the clean items once."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("matplotlib", reason="the figures need the [plots] extra")

from dpdm.core.eval import figures
from dpdm.core.pipeline import evaluation
from matplotlib.colors import to_hex

SWEEP = {"student": {"dpdm": {"1": 0.05, "2": 0.01, "4": -0.0004}},
         "undistilled": {"dpdm": {"1": 0.9, "2": 0.5, "4": 0.2}},
         "teacher": {"heun": {"3": 0.3, "7": 0.02, "15": 0.0009, "35": 0.001}, "euler": {"2": 0.4, "8": 0.05}},
         "sid": {"dpdm": {"1": 0.07}}}
FLOOR = {"a": 0.0002, "b": -0.0003, "mean": -0.00005, "spread": 0.0005, "num": 1000}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    figures._plt().close("all")


def lines_by_label(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_values_at_or_below_the_noise_floor_sit_on_a_labelled_floor_line():
    fig = figures.nfe_curve(SWEEP, "energy", floor=FLOOR)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    level = 0.0005  # max(a, b, |a - b|): what two real sets differ by
    lines = lines_by_label(ax)
    floor_line = next(line for label, line in lines.items() if "noise floor" in label)
    assert set(floor_line.get_ydata()) == {level}
    assert "1000 items" in floor_line.get_label()
    student = lines["student dpdm"]
    assert list(student.get_ydata()) == [0.05, 0.01, level]  # the negative value is drawn on the floor, not below
    drawn = [y for line in ax.get_lines() for y in line.get_ydata()]
    assert min(drawn) >= level and 1e-12 not in drawn
    assert ax.get_ylim()[0] > 0 and ax.get_ylim()[0] >= level / 10  # no axis reaching down to 1e-12
    hollow = [line for line in ax.get_lines() if to_hex(line.get_markerfacecolor()) == "#ffffff"]
    assert [list(line.get_xdata()) for line in hollow] == [[4]]  # the one point below the floor, marked as such


def test_without_a_floor_non_positive_values_sit_on_a_line_below_the_smallest_positive_one():
    fig = figures.nfe_curve(SWEEP, "energy")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    lines = lines_by_label(ax)
    floor_label = next(label for label in lines if label.startswith("≤ 0"))
    assert lines["student dpdm"].get_ydata()[-1] == pytest.approx(0.0009 / 10)
    assert "no noise floor measured" in floor_label
    positive = {k: v for k, v in SWEEP.items() if k != "student"}
    labels = lines_by_label(figures.nfe_curve(positive, "fid").axes[0])
    assert not any("floor" in label or "≤ 0" in label for label in labels)


def test_every_figure_has_a_title_and_the_metric_direction():
    curve = figures.nfe_curve(SWEEP, "fid", floor=FLOOR).axes[0]
    assert curve.get_title() == "fid vs NFE"
    assert curve.get_ylabel() == "fid ↓ (lower is better)"
    assert "NFE" in curve.get_xlabel()
    panels = figures.grid({"": {"NFE 1": ("NFE 1", torch.randn(50, 2))}}, "vector")
    assert panels._suptitle.get_text() == "samples"
    assert panels.axes[0].get_title() == "NFE 1" and panels.axes[0].get_xlabel() == "x₁"


def test_a_model_and_sampler_have_one_colour_in_every_figure():
    curve = lines_by_label(figures.nfe_curve(SWEEP, "energy", floor=FLOOR).axes[0])
    line = {key: to_hex(curve[key].get_color()) for key in
            ("student dpdm", "undistilled teacher dpdm (student's schedule)", "teacher heun", "teacher euler",
             "sid dpdm")}
    assert len(set(line.values())) == len(line)  # five models/samplers, five colours
    x = torch.randn(20, 2)
    cross = figures.grid({m: {c: (f"{m} {c}", x, figures.colour(m, c)) for c in ("dpdm", "heun")}
                          for m in ("student", "teacher")}, "vector")
    scatter = {ax.get_title(): to_hex(ax.collections[0].get_facecolor()[0]) for ax in cross.axes}
    assert scatter["student dpdm"] == scatter["student heun"] == line["student dpdm"]
    assert scatter["teacher heun"] == line["teacher heun"]
    assert scatter["teacher dpdm"] == line["undistilled teacher dpdm (student's schedule)"]
    ex = {0.5: {"noisy": x, "teacher": x, "student": x}}
    rec = {ax.get_title().split("\n")[0]: to_hex(ax.collections[0].get_facecolor()[0])
           for ax in figures.recovery(x, ex, "vector").axes if ax.collections}
    assert rec["student d(x, σ) (DPDM)"] == line["student dpdm"]
    assert rec["clean training items x₀"] == to_hex(figures.colour("data"))


def recovery_examples(sigmas, shape):
    return {s: {k: torch.rand(*shape) * 2 - 1 for k in ("noisy", "teacher", "student")} for s in sigmas}


@pytest.mark.parametrize("kind,shape", [("image", (8, 1, 8, 8)), ("vector", (40, 2))])
def test_the_recovery_panel_shows_the_clean_items_once_then_a_row_per_sigma(kind, shape):
    sigmas = [0.1, 1.0, 5.0]
    fig = figures.recovery(torch.rand(*shape) * 2 - 1, recovery_examples(sigmas, shape), kind, title="Recovery")
    grid = fig.axes[0].get_gridspec()
    assert (grid.nrows, grid.ncols) == (1 + len(sigmas), 3)
    shown = [ax for ax in fig.axes if ax.axison]
    assert len(shown) == 1 + 3 * len(sigmas)  # clean once, then noisy / teacher / student per σ
    assert [ax.get_title() for ax in shown[:1]] == ["clean training items x₀"]
    assert fig._suptitle.get_text() == "Recovery"
    text = " ".join(ax.get_title() + " " + ax.get_ylabel() for ax in shown)
    for sigma in ("0.1", "1", "5"):
        assert f"σ = {sigma}" in text
    for head in figures.RECOVERY_HEADS.values():
        assert head in text


def test_the_teachers_sample_figure_shows_its_best_nfe(monkeypatch, tmp_path):
    drawn = {}
    monkeypatch.setattr(figures, "samples_figure", lambda panels, kind, path, title="", colours=None, **kw:
                        drawn.__setitem__(path.name, (panels, title, colours)))
    for name in ("curve_figure", "recovery_figure", "panel_grid"):
        monkeypatch.setattr(figures, name, lambda *a, **kw: None)
    x = torch.randn(10, 2)
    cfg = SimpleNamespace(figure_samples=4, num_samples=10, student_sampler=SimpleNamespace(name="dpdm"))
    t_samples = {"heun": {n: x for n in (3, 7, 15, 35)}, "euler": {n: x for n in (2, 8)}}
    evaluation._figures(tmp_path, "vector", cfg, {1: x, 2: x, 4: x}, t_samples, {1: x, 2: x, 4: x},
                        {"best_sigma_max": 2.5, "samples": x}, x, x, {}, SWEEP, "energy", None, title="toy")
    panels, title, colours = drawn["samples_teacher_heun.png"]
    assert "NFE 15 (best)" in panels and "NFE 35" in panels  # 15 scored best, though 35 is the largest
    assert "best: NFE 15" in title
    assert colours["NFE 15 (best)"] == figures.colour("teacher", "heun") and colours["data"] == figures.colour("data")
    assert "NFE 8 (best)" in drawn["samples_teacher_euler.png"][0]
    assert set(drawn["samples_student.png"][2].values()) == {figures.colour("data"), figures.colour("student")}


def test_without_matplotlib_the_run_skips_its_figures(monkeypatch, tmp_path, caplog):
    real = evaluation.importlib.util.find_spec
    monkeypatch.setattr(evaluation.importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib"
                        else real(name, *a))
    monkeypatch.setattr(figures, "_plt", lambda: pytest.fail("drew a figure without matplotlib"))
    x = torch.randn(10, 2)
    cfg = SimpleNamespace(figure_samples=4, num_samples=10, student_sampler=SimpleNamespace(name="dpdm"))
    with caplog.at_level(logging.WARNING, logger="dpdm"):
        evaluation._figures(tmp_path, "vector", cfg, {1: x}, {}, {1: x}, {"best_sigma_max": 2.5, "samples": x}, x, x,
                            {}, SWEEP, "energy", None)
    assert "matplotlib is not installed" in caplog.text
    assert list(tmp_path.iterdir()) == []
