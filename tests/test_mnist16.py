"""The MNIST 16×16 evidence run (recipes/mnist16.yaml, docs/results.md) and what it added to a run: MNIST resized as
``dpdm data prepare --resolution`` resizes, baselines distilled from the same teacher (Diff-Instruct), the cross-use
of Figure 6 in the report, the estimator's noise beside every claim, and the paper's Table 1 ratios.

The slow test runs the recipe itself with every phase shortened, on the real MNIST copy in ``../shared/data/mnist``
when it is there, else on IDX files it writes."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dpdm.core.config.recipe import load_recipe
from dpdm.core.errors import ConfigError
from dpdm.core.eval.report import PAPER_RECOVERY, checks, cross_order
from dpdm.data import mnist as mn

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "mnist16.yaml"
REAL_MNIST = ROOT.parent / "shared" / "data" / "mnist"


def write_idx(folder: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """The four official IDX files (gz) with random 28×28 items and labels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for base, arr in zip(mn.FILES[split], (images, labels)):
            magic = 0x803 if arr.ndim == 3 else 0x801
            blob = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
            (folder / f"{base}.gz").write_bytes(gzip.compress(blob))
    return folder


# ---- MNIST at 16×16 --------------------------------------------------------------------------------------------

def test_mnist_resolution_is_data_prepares_lanczos(tmp_path):
    from PIL import Image

    folder = write_idx(tmp_path / "mnist", 6, 3)
    full = mn.mnist("train", path=str(folder))
    small = mn.mnist("train", path=str(folder), resolution=16)
    assert small.shape == (1, 16, 16) and len(small) == 6 and small.data.dtype == torch.uint8
    for i in range(6):
        want = np.asarray(Image.fromarray(full.data[i, 0].numpy(), "L").resize((16, 16), Image.Resampling.LANCZOS))
        assert np.array_equal(small.data[i, 0].numpy(), want)
    assert torch.equal(mn.mnist("test", path=str(folder), resolution=28).data, mn.mnist("test", path=str(folder)).data)
    assert mn.mnist("test", path=str(folder), resolution=8).shape == (1, 8, 8)


@pytest.mark.parametrize("options, message", [
    ({"resolution": 12}, "resolution must be a power of two of at least 8"),
    ({"resolution": 4}, "resolution must be a power of two of at least 8"),
    ({"resolution": 16, "pad_to_32": True}, "give resolution or pad_to_32, not both"),
])
def test_mnist_resolution_errors_reach_the_recipe_check(tmp_path, options, message):
    from dpdm.core.pipeline.run import preflight

    folder = write_idx(tmp_path / "mnist", 4, 4)
    with pytest.raises(ValueError, match=message):
        mn.mnist("train", path=str(folder), **options)
    data = "{" + ", ".join([f"name: mnist, path: {folder}, labels: false"]
                           + [f"{k}: {str(v).lower()}" for k, v in options.items()]) + "}"
    recipe = load_recipe(str(RECIPE), [f"data={data}"])
    with pytest.raises(ConfigError) as info:
        preflight(recipe)
    assert any(p.startswith("recipe.data") and message in p for p in info.value.problems)


def test_mnist16_recipe_is_what_the_results_page_says(tmp_path):
    from dpdm.core.io.checkpoint import build_denoiser
    from dpdm.core.pipeline.run import preflight

    recipe = load_recipe(str(RECIPE), [f"data.path={write_idx(tmp_path / 'mnist', 4, 4)}"])
    plan = preflight(recipe)
    spec = plan.spec
    assert spec["shape"] == [1, 16, 16] or tuple(spec["shape"]) == (1, 16, 16)
    params = sum(p.numel() for p in build_denoiser(spec).parameters())
    assert 0.70e6 < params < 0.74e6  # the 0.72M-parameter SongUNet of the issue
    assert recipe.model.backbone.name == "edm-songunet" and recipe.teacher.checkpoint is None
    assert recipe.train.divergence.name == "smoothed-kl" and recipe.train.order == "fake-first"
    assert recipe.eval.metric.name == "fd-mnist" and recipe.eval.recovery_protocol == "paper"
    assert [f"{s:g}" for s in recipe.eval.recovery_sigmas] == list(PAPER_RECOVERY)  # Table 1's 11 σ
    assert recipe.eval.cross_nfe == 7 and recipe.eval.noise_seeds == 2
    nfe = set(recipe.eval.teacher_nfe)
    assert {1, 35} <= nfe and all(3 * k in nfe for k in (2, 3, 4, 5))  # the ≤ 3K comparisons have their points
    assert {2, 3, 4, 5} <= set(recipe.eval.student_steps)
    di = recipe.baselines["diff-instruct"]
    assert di.train.divergence.name == "ikl" and di.steps == [1]


def test_the_committed_results_are_the_committed_runs_report():
    """docs/results/mnist16 holds one run's report: its checks are what ``report.checks`` computes from its own
    numbers, report.md is rendered from it, its config is the recipe's, and the README's headline row shows its
    numbers (so a re-run that changes a number cannot leave the published pages behind)."""
    from dpdm.core.eval.report import markdown
    from dpdm.core.config.structure import unstructure

    docs = ROOT / "docs" / "results" / "mnist16"
    report = json.loads((docs / "report.json").read_text())
    assert checks(report) == report["checks"]
    assert (docs / "report.md").read_text() == markdown(report)
    recipe = load_recipe(str(ROOT / "recipes" / "mnist16.yaml"))
    run = load_recipe(str(docs / "config.yaml"), [f"data.path={recipe.data.options['path']}"])
    assert unstructure(run) == unstructure(recipe) and report["train_steps"] == recipe.train.steps
    s, u = report["sweep"]["student"]["dpdm"], report["sweep"]["undistilled"]["dpdm"]
    row = f"| 4 | {s['4']:.3g} | {u['4']:.3g} |"
    assert row in (ROOT / "README.md").read_text()
    assert f"{s['4']:.4g}" in (ROOT / "docs" / "results.md").read_text()


# ---- the report's new parts ------------------------------------------------------------------------------------

def _report(**extra):
    report = {"sweep": {"student": {"dpdm": {"2": 10.0, "4": 6.0}},
                        "undistilled": {"dpdm": {"2": 30.0, "4": 6.5}},
                        "teacher": {"heun": {"3": 20.0, "5": 9.0, "35": 4.0}, "euler": {"6": 12.0, "12": 5.5}}},
              "recovery": {"1": {"student": 2.0, "teacher": 8.0}, "10": {"student": 50.0, "teacher": 50.4}},
              "train_steps": 10}
    report.update(extra)
    return report


def test_paper_ratios_and_gap_to_the_teachers_best():
    c = checks(_report())
    assert c["recovery_paper_ratio"] == {"1": pytest.approx(7.11 / 28.46), "10": pytest.approx(192.47 / 229.71)}
    assert c["recovery_ratio"]["1"] == pytest.approx(0.25)
    gap = c["gap_to_best_teacher"]
    assert (gap["4"]["teacher_sampler"], gap["4"]["teacher_nfe"], gap["4"]["ratio"]) == ("heun", 35, 1.5)
    assert gap["2"]["ratio"] == 2.5
    assert c["noise"] is None and c["student_vs_best_teacher"]["2"]["beyond_noise"] is None
    assert "cross_use" not in c and c["summary"]["inside_noise"] == []


def test_claims_inside_the_estimators_noise_are_named():
    """Each comparison's noise is the largest of the real halves' spread and the two compared points' own spreads
    over the evaluation seeds (a metric's noise grows with its value)."""
    seeds = {"student": {"dpdm": {"2": [10.0, 10.6], "4": [6.0, 6.3]}},
             "undistilled": {"dpdm": {"2": [30.0, 36.0]}},
             "teacher": {"heun": {"5": [9.0, 9.2]}, "euler": {"12": [5.5, 5.0]}}}
    noise = {"real": {"num": 100, "a": 1.0, "b": 1.4, "mean": 1.2, "spread": 0.4}, "seeds": [0, 1], "sweep": seeds,
             "seed_spread": 6.0}
    c = checks(_report(noise=noise))
    assert c["noise"] == pytest.approx(0.4)  # the real halves' spread
    b = c["student_vs_best_teacher"]
    # K = 2: 10 vs heun (5): 9; noise max(0.4, 0.6, 0.2) = 0.6: a real loss
    assert b["2"]["margin"] == -1.0 and b["2"]["noise"] == pytest.approx(0.6) and b["2"]["beyond_noise"] is True
    # K = 4: 6 vs euler (12): 5.5; noise max(0.4, 0.3, 0.5) = 0.5: inside
    assert b["4"]["margin"] == pytest.approx(-0.5) and b["4"]["noise"] == pytest.approx(0.5)
    assert b["4"]["beyond_noise"] is False
    u = c["student_vs_undistilled"]
    assert u["2"]["noise"] == pytest.approx(6.0) and u["2"]["beyond_noise"] is True  # 20 apart, spread 6
    assert u["4"]["noise"] == pytest.approx(0.4) and u["4"]["beyond_noise"] is True  # 0.5 apart, real spread 0.4
    assert c["recovery_margin"]["10"]["beyond_noise"] is False and c["recovery_margin"]["1"]["beyond_noise"] is True
    assert c["summary"]["inside_noise"] == ["NFE 4 vs the best teacher", "recovery at σ = 10"]
    assert "inside the estimator's noise" in c["summary"]["verdict"] and "recovery at σ = 10" in c["summary"]["verdict"]


@pytest.mark.parametrize("values, holds", [
    ({"student+dpdm": 1.0, "student+heun": 5.0, "teacher+dpdm": 4.0, "teacher+heun": 2.0}, True),
    ({"student+dpdm": 3.0, "student+heun": 5.0, "teacher+dpdm": 4.0, "teacher+heun": 2.0}, False),
    ({"student+dpdm": 1.0, "student+heun": 1.5, "teacher+dpdm": 4.0, "teacher+heun": 2.0}, False),
])
def test_cross_use_order_is_figure_6s(values, holds):
    cells = {}
    for key, v in values.items():
        model, sampler = key.split("+")
        cells.setdefault(model, {})[sampler] = {"value": v, "nfe": 7, "steps": 7}
    order = cross_order(cells)
    assert order["paper_order_holds"] is holds and order["ranking"][0] == min(values, key=values.get)
    c = checks(_report(cross={"nfe": 7, "cells": cells}))
    assert c["cross_use"]["paper_order_holds"] is holds and c["summary"]["cross_use_paper_order"] is holds


def test_report_markdown_shows_noise_paper_ratios_gap_and_cross():
    from dpdm.core.eval.report import markdown

    cells = {"student": {"dpdm": {"value": 1.0, "nfe": 7}, "heun": {"value": 5.0, "nfe": 7}},
             "teacher": {"dpdm": {"value": 4.0, "nfe": 7}, "heun": {"value": 2.0, "nfe": 7}}}
    noise = {"real": {"num": 100, "a": 1.0, "b": 1.4, "mean": 1.2, "spread": 0.4}}
    report = _report(noise=noise, cross={"nfe": 7, "cells": cells}, metric="fd-mnist")
    report["checks"] = checks(report)
    md = markdown(report)
    assert "two disjoint sets of 100 training items give 1 and 1.4" in md
    assert "| 1 | — | 8 | 2 | 0.25 | 0.2498 | yes |" in md  # σ = 1: ratio beside the paper's 7.11 / 28.46
    assert "## Models × samplers at NFE 7" in md and "The paper's order" in md and "holds." in md
    assert "| 4 | 6 | heun (35) | 4 | 1.5 |" in md


def test_real_data_noise_scores_two_disjoint_seeded_halves():
    from dpdm.core.eval import protocols as ev
    from dpdm.core.datasets import TensorDataset, to_model
    from dpdm.core.plugins.registry import get

    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (40, 1, 4, 4), generator=g, dtype=torch.uint8)
    dataset = TensorDataset(data, None, label_dim=0, kind="image", name="t")
    energy = get("metric", "energy")()
    reference = to_model(torch.randint(0, 256, (30, 1, 4, 4), generator=g, dtype=torch.uint8))
    out = ev.real_data_noise(energy, dataset, reference, num=15, seed=3)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(ev.derive_seed(3, ev.REAL_STREAM)))
    a, b = sorted(perm[:15].tolist()), sorted(perm[15:30].tolist())
    assert not set(a) & set(b)
    assert out["a"] == pytest.approx(float(energy(to_model(data[a]), reference)))
    assert out["b"] == pytest.approx(float(energy(to_model(data[b]), reference)))
    assert out["spread"] == pytest.approx(abs(out["a"] - out["b"])) and out["num"] == 15
    assert ev.real_data_noise(energy, dataset, reference, num=15, seed=3) == out
    assert ev.real_data_noise(energy, dataset, reference, num=15, seed=4) != out
    assert ev.real_data_noise(energy, dataset, reference, num=100, seed=3)["num"] == 20  # halves of the split


# ---- baselines -------------------------------------------------------------------------------------------------

TINY = ["teacher.train.steps=30", "teacher.train.batch_size=64", "train.steps=3", "train.batch_size=32",
        "train.fake_updates=1", "eval.num_samples=64", "eval.recovery_num=32", "eval.teacher_nfe=[1,3,7]",
        "eval.student_steps=[1,2]", "eval.one_step_sigma_max=[2.5]", "eval.recovery_sigmas=[1.0]",
        "model.backbone={name: mlp, hidden: 32, depth: 1, emb_dim: 16}", "eval.teacher_samplers=[heun]"]
DI = ("baselines={di: {train: {divergence: {name: ikl, generator_sigma: 2.5}, steps: 3, batch_size: 32}, "
      "steps: [1]}}")


def test_a_baseline_is_distilled_from_the_same_teacher_and_reported(tmp_path):
    from dpdm.core.io.checkpoint import load_denoiser
    from dpdm.core.pipeline.run import run

    recipe = load_recipe(str(ROOT / "recipes" / "toy2d.yaml"), TINY + [DI, "eval.cross_nfe=7", "eval.noise_seeds=2"])
    report = run(recipe, tmp_path / "run")
    assert set(report["sweep"]["di"]["dpdm"]) == {"1"} and report["sweep"]["di"]["dpdm"]["1"] > 0
    assert "baseline_di_s" in report["timings"]
    assert (tmp_path / "run" / "checkpoints" / "train" / "baseline-di").is_dir()
    model = load_denoiser(str(tmp_path / "run" / "checkpoints" / "di.safetensors"))
    assert sum(p.numel() for p in model.parameters()) > 0
    assert set(report["cross"]["cells"]) == {"student", "teacher"}
    assert report["checks"]["cross_use"]["paper_order_holds"] in (True, False)
    assert report["noise"]["seeds"] == [0, 1] and len(report["noise"]["sweep"]["student"]["dpdm"]["2"]) == 2
    assert report["noise"]["real"]["num"] == 64
    md = (tmp_path / "run" / "report.md").read_text()
    assert "| NFE | student dpdm |" in md and "di dpdm" in md
    assert (tmp_path / "run" / "figures" / "cross.png").read_bytes()[:4] == b"\x89PNG"
    # the same run resumed re-evaluates to the same numbers (the snapshots are final)
    again = run(recipe, tmp_path / "run", resume=True)
    assert again["sweep"] == report["sweep"] and again["cross"] == report["cross"] and again["noise"] == report["noise"]


def test_baselines_are_part_of_the_training_config_only_when_present():
    from dpdm.core.config.identity import config_changes, config_hash, training_config

    plain = load_recipe(str(ROOT / "recipes" / "toy2d.yaml"))
    assert "baselines" not in training_config(plain)  # older runs' snapshots keep their hash
    with_di = load_recipe(str(ROOT / "recipes" / "toy2d.yaml"), [DI])
    assert config_hash(with_di) != config_hash(plain)
    other = load_recipe(str(ROOT / "recipes" / "toy2d.yaml"), [DI.replace("steps: 3", "steps: 4", 1)])
    assert config_changes(training_config(with_di), training_config(other)) == ["recipe.baselines.di.train.steps"]


def test_bad_baselines_fail_the_recipe_check():
    from dpdm.core.config.recipe import read_recipe
    from dpdm.core.pipeline.run import preflight

    bad = "baselines={'a/b': {train: {steps: -1, batch_size: 7}, steps: []}, ok: {sigma_max: -1.0}}"
    with pytest.raises(ConfigError):  # values outside their bounds: when the recipe is read
        load_recipe(str(ROOT / "recipes" / "toy2d.yaml"), [bad, "engine.accum=2"])
    recipe, problems = read_recipe(str(ROOT / "recipes" / "toy2d.yaml"), [bad, "engine.accum=2"])
    with pytest.raises(ConfigError) as info:  # names and batch splits: when the run is planned (dpdm run: both)
        preflight(recipe)
    text = "\n".join(problems + info.value.problems)
    assert "recipe.baselines.a/b: a baseline's name names its checkpoint" in text
    assert "recipe.baselines.a/b.train.steps: must be at least 0, got -1" in text
    assert "recipe.baselines.a/b.train.batch_size: the global batch 7 must split evenly" in text
    assert "recipe.baselines.a/b.steps: a non-empty list" in text
    assert "recipe.baselines.ok.sigma_max: must be positive" in text
    with pytest.raises(ConfigError) as info:  # unknown components and keys: when the recipe is read
        load_recipe(str(ROOT / "recipes" / "toy2d.yaml"), ["baselines={x: {train: {divergence: {name: nope}}}}"])
    assert any(p.startswith("recipe.baselines.x.train.divergence") and "nope" in p for p in info.value.problems)


# ---- the recipe end to end, shortened ----------------------------------------------------------------------------

SHORT = ["teacher.train.steps=40", "train.steps=6", "baselines.diff-instruct.train.steps=4", "eval.num_samples=100",
         "eval.recovery_num=100", "eval.teacher_nfe=[1,2,3,6,7,35]", "eval.student_steps=[1,2]",
         "eval.one_step_sigma_max=[80.0,2.5]", "eval.teacher_samplers=[heun,euler]", "engine.sample_every=20",
         "engine.checkpoint.every=20", "eval.figure_samples=16"]


@pytest.mark.slow
def test_mnist16_recipe_end_to_end_shortened(tmp_path, monkeypatch):
    """The recipe's every phase, shortened: the report holds every table docs/results.md shows, the figures are
    written, and a killed-and-resumed run (here: resumed after it finished) evaluates to the same numbers."""
    from dpdm.core.pipeline.run import run

    monkeypatch.setenv("DPDM_CACHE", str(tmp_path / "cache"))
    data = REAL_MNIST if REAL_MNIST.is_dir() else write_idx(tmp_path / "mnist", 600, 300)
    recipe = load_recipe(str(RECIPE), SHORT + [f"data.path={data}"])
    out = tmp_path / "run"
    report = run(recipe, out)
    saved = json.loads((out / "report.json").read_text())
    assert saved["sweep"] == report["sweep"] and saved["metric"] == "fd-mnist"
    assert set(report["sweep"]) == {"student", "undistilled", "teacher", "diff-instruct"}
    assert set(report["sweep"]["teacher"]["heun"]) == {"1", "3", "7", "35"}
    assert list(report["recovery"]) == list(PAPER_RECOVERY) and report["recovery_protocol"] == "paper"
    assert set(report["checks"]["recovery_paper_ratio"]) == set(PAPER_RECOVERY)
    assert {c for row in report["cross"]["cells"].values() for c in row} == {"dpdm", "heun"}
    assert report["noise"]["seeds"] == [0, 1] and report["noise"]["real"]["num"] == 100
    assert 0 < report["detector_test_accuracy"] <= 1
    for key in ("student_beats_best_teacher", "recovery_student_better_everywhere", "student_beats_undistilled",
                "cross_use_paper_order", "verdict"):
        assert key in report["checks"]["summary"]
    figures = {p.name for p in (out / "figures").glob("*.png")}
    assert {"samples_student.png", "samples_teacher_heun.png", "samples_undistilled.png", "nfe_curve.png",
            "recovery.png", "cross.png"} <= figures
    assert list((out / "figures" / "progress").glob("*.png"))
    again = run(recipe, out, resume=True)
    for key in ("sweep", "recovery", "cross", "noise", "one_step"):
        assert again[key] == report[key], key


def test_eval_batch_size_and_noise_seeds_are_checked_before_any_work():
    import attrs

    from dpdm.core.pipeline.run import preflight

    with pytest.raises(ConfigError) as info:  # when the recipe is read
        load_recipe(str(ROOT / "recipes" / "toy2d.yaml"), ["eval.batch_size=0", "eval.noise_seeds=0"])
    assert "recipe.eval.batch_size: must be at least 1, got 0" in info.value.problems
    assert "recipe.eval.noise_seeds: must be at least 1, got 0" in info.value.problems
    recipe = load_recipe(str(ROOT / "recipes" / "toy2d.yaml"))
    recipe = attrs.evolve(recipe, eval=attrs.evolve(recipe.eval, batch_size=0, noise_seeds=0))
    with pytest.raises(ConfigError) as info:  # a recipe built in code: before the run
        preflight(recipe)
    assert "recipe.eval.batch_size: must be at least 1, got 0" in info.value.problems
    assert "recipe.eval.noise_seeds: must be at least 1, got 0" in info.value.problems
