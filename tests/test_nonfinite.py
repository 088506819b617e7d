"""A diverged model is refused, not sampled into an empty figure: a checkpoint with NaN/Inf weights at load (every
route: ``dpdm sample``, ``recover``, ``eval``, a recipe's ``teacher.checkpoint``), and non-finite samples of
``dpdm sample``; nothing is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dpdm.cli.main import app
from dpdm.core.config.recipe import load_recipe
from dpdm.core.config.structure import dump_yaml
from dpdm.core.errors import DpdmError
from dpdm.core.io.checkpoint import build_denoiser, load_denoiser, save_denoiser
from dpdm.core.pipeline.preflight import preflight

TOY2D = str(Path(__file__).resolve().parent.parent / "recipes" / "toy2d.yaml")
TINY = ["model.backbone.hidden=8", "model.backbone.depth=1"]


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run directory by hand (no training): the tiny recipe's config, a finite teacher and a finite student."""
    recipe = load_recipe(TOY2D, TINY)
    spec = preflight(recipe).spec
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(recipe))
    torch.manual_seed(0)
    for role in ("teacher", "student"):
        save_denoiser(str(run / "checkpoints" / f"{role}.safetensors"), build_denoiser(spec), spec, {"role": role})
    return run


def poison(run: Path, role: str, value: float) -> str:
    """Overwrite one weight tensor of ``role``'s checkpoint with ``value``; returns the checkpoint's path."""
    url = str(run / "checkpoints" / f"{role}.safetensors")
    model = load_denoiser(url)
    spec = preflight(load_recipe(TOY2D, TINY)).spec
    with torch.no_grad():
        next(model.parameters()).fill_(value)
    save_denoiser(url, model, spec, {"role": role})
    return url


def sample(run: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["sample", "--run", str(run), "--out", str(out), "--num", "16", *extra],
                              env={"COLUMNS": "1000"})


def test_a_checkpoint_with_nan_weights_is_refused_at_load(run_dir):
    url = poison(run_dir, "student", float("nan"))
    with pytest.raises(DpdmError) as info:
        load_denoiser(url)
    assert str(info.value).startswith(f"checkpoint {url!r} holds non-finite weights (NaN/Inf in 1 of ")
    assert "the model diverged in training; use an earlier checkpoint" in str(info.value)


def test_dpdm_sample_refuses_a_nan_checkpoint_and_writes_nothing(run_dir, tmp_path):
    url = poison(run_dir, "student", float("inf"))
    out = tmp_path / "figs" / "samples.png"
    result = sample(run_dir, out)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"error: checkpoint {url!r} holds non-finite weights" in result.stderr
    assert not out.exists() and not out.parent.exists()


def test_a_nan_student_does_not_stop_sampling_the_teacher(run_dir, tmp_path):
    poison(run_dir, "student", float("nan"))
    out = tmp_path / "teacher.png"
    result = sample(run_dir, out, "--model", "teacher", "--sampler", "euler", "--steps", "2")
    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(b"\x89PNG")


def test_dpdm_sample_refuses_finite_weights_whose_samples_overflow(run_dir, tmp_path):
    poison(run_dir, "student", 1e30)  # finite, but the outputs overflow to Inf/NaN
    out = tmp_path / "samples.png"
    result = sample(run_dir, out)
    assert result.exit_code == 1 and "Traceback" not in result.output
    message = " ".join(result.stderr.split())
    assert f"the student of {run_dir} ({run_dir / 'checkpoints' / 'student.safetensors'}) gave non-finite samples" \
        in message and "nothing was written" in message
    assert not out.exists()


# --- the report warns when the samples are non-finite or absurd ----------------------------------------------------

REAL = {"num": 4000, "a": -6.2e-05, "b": 1.5e-04, "mean": 4.6e-05, "spread": 2.1e-04}  # a normal toy2d run's


def hand_report(student: dict, teacher: dict) -> dict:
    return {"metric": "energy", "recipe": "hand-made", "sweep": {"student": {"dpdm": student}, "teacher": teacher},
            "one_step": {"validation": {}, "best_sigma_max": 1.0, "value": student["1"]},
            "recovery": {"1": {"noisy": 0.13, "teacher": 0.16, "student": 0.008}}, "noise": {"real": REAL}}


def write(report: dict, tmp_path: Path) -> tuple[dict, str]:
    import json

    from dpdm.core.eval.report import write_report

    write_report(report, tmp_path / "report.json", tmp_path / "report.md")
    return json.loads((tmp_path / "report.json").read_text()), (tmp_path / "report.md").read_text()


def test_a_normal_report_has_no_warnings(tmp_path):
    # the numbers of a normal toy2d run, its worst (the teacher's Heun at 3 NFE: samples far off at 2 steps) included
    data, md = write(hand_report({"1": 0.061, "2": 0.0034}, {"heun": {"3": 32.27, "35": 0.0005}}), tmp_path)
    assert data["warnings"] == [] and "Warning" not in md


def test_non_finite_and_absurd_scores_are_warned_about_at_the_top(tmp_path):
    data, md = write(hand_report({"1": 1.7e8, "2": float("nan")}, {"heun": {"3": 32.27}}), tmp_path)
    assert data["warnings"] == [
        "student dpdm at NFE 1 scores 1.7e+08, 8.1e+11x real data's 0.00021: its samples are far off the data "
        "(a diverged model?)",
        "student dpdm at NFE 2 scores nan: its samples are non-finite (NaN/Inf), the model diverged",
        "the one-step student scores 1.7e+08, 8.1e+11x real data's 0.00021: its samples are far off the data "
        "(a diverged model?)"]
    head = md.splitlines()[:5]
    assert head[0] == "# Report: hand-made" and head[2].startswith("**Warning: student dpdm at NFE 1 scores 1.7e+08")


def test_dpdm_recover_warns_when_finite_weights_give_non_finite_outputs(run_dir, tmp_path):
    poison(run_dir, "student", 1e30)  # finite weights (load accepts them), overflowing outputs
    result = CliRunner().invoke(app, ["recover", "--run", str(run_dir), "--sigma", "1", "--num", "50", "--json"],
                                env={"COLUMNS": "1000"})
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    message = " ".join(result.stderr.split())
    assert (f"warning: the student ({run_dir / 'checkpoints' / 'student.safetensors'}) gave non-finite outputs "
            "(NaN/Inf) at σ = 1: its scores there are not numbers") in message
    assert "the teacher (" not in message  # the teacher's outputs are finite: no warning about it


def test_dpdm_eval_sweep_warns_at_the_top_when_a_model_gives_non_finite_samples(run_dir, tmp_path):
    poison(run_dir, "student", 1e30)  # finite weights, overflowing samples: the scores are nan
    out = tmp_path / "sweep"
    result = CliRunner().invoke(app, ["eval", "sweep", "--run", str(run_dir), "--student-nfe", "1", "--teacher-nfe",
                                      "1", "--teacher-sampler", "euler", "--num", "50", "--out", str(out)],
                                env={"COLUMNS": "1000"})
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    data = json.loads((out / "sweep.json").read_text())
    assert data["warnings"] == ["student dpdm at NFE 1 scores nan: its samples are non-finite (NaN/Inf), the model "
                                "diverged"]
    md = (out / "sweep.md").read_text().splitlines()
    assert md[4] == "**Warning: student dpdm at NFE 1 scores nan: its samples are non-finite (NaN/Inf), the model " \
                    "diverged.**"


def test_dpdm_eval_cross_warns_when_a_model_gives_non_finite_samples(run_dir, tmp_path):
    poison(run_dir, "student", 1e30)
    out = tmp_path / "cross"
    result = CliRunner().invoke(app, ["eval", "cross", "--run", str(run_dir), "--nfe", "1", "--num", "50",
                                      "--out", str(out)], env={"COLUMNS": "1000"})
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    data = json.loads((out / "cross.json").read_text())
    assert data["warnings"] and all(w.startswith("student ") and "scores nan" in w for w in data["warnings"])
    assert len(data["warnings"]) == len(data["cells"]["student"])  # every sampler of the student, no teacher's
    assert f"warning: {data['warnings'][0]}" in " ".join(result.stderr.split())
