"""A diverged model is refused, not sampled into an empty figure: a checkpoint with NaN/Inf weights at load (every
route: ``dpdm sample``, ``recover``, ``eval``, a recipe's ``teacher.checkpoint``), and non-finite samples of
``dpdm sample``; nothing is written."""

from __future__ import annotations

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


def test_dpdm_sample_refuses_finite_weights_whose_samples_overflow(run_dir, tmp_path):
    poison(run_dir, "student", 1e30)  # finite, but the outputs overflow to Inf/NaN
    out = tmp_path / "samples.png"
    result = sample(run_dir, out)
    assert result.exit_code == 1 and "Traceback" not in result.output
    message = " ".join(result.stderr.split())
    assert f"the student of {run_dir} ({run_dir / 'checkpoints' / 'student.safetensors'}) gave non-finite samples" \
        in message and "nothing was written" in message
    assert not out.exists()
