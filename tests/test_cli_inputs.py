"""Bad input to the ``dpdm`` commands is refused before any work, with one message naming the option or key: an
unwritable destination (every command that writes, through ``storage.check_destination``), a count, seed or noise
level out of range, a figure name matplotlib would not write as given, a metric that does not apply to the data,
and recipe values that pass the types but mean nothing (``sigma_data: -1``, a ``name`` with ``/``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_rundir import TINY, TOY2D, invoke, sets  # the tiny toy2d run those tests use

torch.set_num_threads(1)



def user_error(result) -> str:
    """The one-line stderr of a command that failed cleanly: exit 1, no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output and result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    return result.stderr.removeprefix("error: ").rstrip("\n")


def usage_error(result, option: str) -> str:
    """A value typer refuses (exit 2), naming ``option``."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    text = " ".join(result.output.replace("│", " ").split())
    assert f"Invalid value for '{option}'" in text, text
    return text


def files(folder: Path) -> set:
    return {p.relative_to(folder) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("toy-run")
    result = invoke("run", TOY2D, *sets(TINY), "--out", work / "run")
    assert result.exit_code == 0, (result.output, result.exception)
    return work / "run"


@pytest.fixture
def blocked(tmp_path, monkeypatch) -> Path:
    """A working folder holding the regular file ``afile``: any path below it cannot be written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    return tmp_path


def _never(what):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} ran before the destination was checked")
    return fail


# --- 1. destinations: checked first, one message, nothing written -------------------------------------------------


def test_run_checks_out_before_building_anything(blocked, monkeypatch):
    from dpdm.core.pipeline import preflight

    monkeypatch.setattr(preflight, "preflight", _never("preflight"))
    assert user_error(invoke("run", TOY2D, "--out", "afile/run")) == (
        f"cannot write the run directory afile/run: {blocked}/afile is a file, not a folder")
    assert user_error(invoke("run", TOY2D, "--out", "foo://bucket/run")) == (
        "cannot write the run directory foo://bucket/run: Protocol not known: foo")
    assert files(blocked) == {Path("afile")}


def test_run_checks_the_default_runs_folder(blocked, monkeypatch):
    from dpdm.core.pipeline import preflight

    (blocked / "runs").write_text("")  # runs/ is a file: no run can go there
    monkeypatch.setattr(preflight, "preflight", _never("preflight"))
    assert user_error(invoke("run", TOY2D)) == f"cannot write the run directory runs: {blocked}/runs is a file, not a folder"


def test_sample_checks_out_before_loading_the_run(toy_run, blocked, monkeypatch):
    from dpdm.core.pipeline import run

    monkeypatch.setattr(run, "load_run", _never("load_run"))
    assert user_error(invoke("sample", "--run", toy_run, "--out", "afile/x.png")) == (
        f"cannot write --out afile/x.png: {blocked}/afile is a file, not a folder")
    assert files(blocked) == {Path("afile")}


def test_recover_checks_out_and_figure_before_loading_the_run(toy_run, blocked, monkeypatch):
    from dpdm.core.pipeline import run

    monkeypatch.setattr(run, "load_run", _never("load_run"))
    assert user_error(invoke("recover", "--run", toy_run, "--sigma", "1", "--out", "afile/r.json")) == (
        f"cannot write --out afile/r.json: {blocked}/afile is a file, not a folder")
    assert user_error(invoke("recover", "--run", toy_run, "--sigma", "1", "--figure", "afile/r.png")) == (
        f"cannot write --figure afile/r.png: {blocked}/afile is a file, not a folder")
    assert files(blocked) == {Path("afile")}


def test_eval_sweep_checks_out_before_computing_any_point(toy_run, blocked, monkeypatch):
    from dpdm.core.eval import protocols
    from dpdm.core.io import checkpoint

    monkeypatch.setattr(protocols, "nfe_sweep", _never("nfe_sweep"))
    monkeypatch.setattr(checkpoint, "load_checkpoint", _never("load_checkpoint"))
    assert user_error(invoke("eval", "sweep", "--run", toy_run, "--out", "afile/sweep")) == (
        f"cannot write --out afile/sweep: {blocked}/afile is a file, not a folder")
    assert user_error(invoke("eval", "cross", "--run", toy_run, "--out", "afile/cross")) == (
        f"cannot write --out afile/cross: {blocked}/afile is a file, not a folder")
    assert files(blocked) == {Path("afile")}


def test_eval_ref_and_data_prepare_check_their_destination_first(blocked):
    assert user_error(invoke("eval", "ref", "nowhere.zip", "afile/ref.npz", "--metric", "fd-mnist")) == (
        f"cannot write afile/ref.npz: {blocked}/afile is a file, not a folder")
    assert user_error(invoke("eval", "ref", "nowhere.zip", "foo://b/ref.npz", "--metric", "fd-mnist")) == (
        "cannot write foo://b/ref.npz: Protocol not known: foo")
    # the source does not exist either: the destination is what is checked first
    assert user_error(invoke("data", "prepare", "nowhere", "afile/x.zip")) == (
        f"cannot write afile/x.zip: {blocked}/afile is a file, not a folder")
    assert user_error(invoke("data", "prepare", "nowhere", "foo://b/x.zip")) == (
        "cannot write foo://b/x.zip: Protocol not known: foo")
    assert files(blocked) == {Path("afile")}


# --- 2. engine.checkpoint.dir ------------------------------------------------------------------------------------


def test_an_unwritable_checkpoint_dir_is_a_recipe_problem(blocked):
    result = invoke("run", TOY2D, "--dry-run", "--set", "engine.checkpoint.dir=afile/ckpt")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.splitlines()[1:] == [
        f"  - recipe.engine.checkpoint.dir: cannot write afile/ckpt: {blocked}/afile is a file, not a folder"]


# --- 3. numeric options and file names of sample / recover / eval -------------------------------------------------


@pytest.mark.parametrize("value", ["-5", "0"])
def test_sample_num_must_be_positive(toy_run, tmp_path, value):
    usage_error(invoke("sample", "--run", toy_run, "--num", value, "--out", tmp_path / "s.png"), "--num")
    assert files(tmp_path) == set()


@pytest.mark.parametrize("name, message", [
    ("x.txt", "'.txt' is not a figure format; use one of .png, .jpg, .jpeg, .pdf, .svg (e.g. {d}/x.png)"),
    ("xnoext", ("the name needs an extension, the figure's format; use one of .png, .jpg, .jpeg, .pdf, .svg "
                "(e.g. {d}/xnoext.png)")),
])
def test_sample_out_needs_a_figure_extension(toy_run, tmp_path, name, message):
    out = tmp_path / name
    assert user_error(invoke("sample", "--run", toy_run, "--out", out)) == f"--out {out}: " + message.format(d=tmp_path)
    assert files(tmp_path) == set()


def test_sample_prints_the_file_it_wrote(toy_run, tmp_path):
    out = tmp_path / "s.svg"
    result = invoke("sample", "--run", toy_run, "--num", "5", "--out", out)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {out} (5 samples") and files(tmp_path) == {Path("s.svg")}


@pytest.mark.parametrize("value", ["-3", "0"])
def test_sigma_max_must_be_positive(toy_run, tmp_path, value):
    message = f"--sigma-max: the schedule's largest noise level must be positive, got {float(value):g}"
    assert user_error(invoke("sample", "--run", toy_run, "--sigma-max", value, "--out", tmp_path / "s.png")) == message
    assert user_error(invoke("eval", "fid", "--run", toy_run, "--sigma-max", value)) == message
    assert files(tmp_path) == set()


@pytest.mark.parametrize("args", [["sample", "--out", "s.png"], ["recover", "--sigma", "1"],
                                  ["eval", "sweep"], ["eval", "cross"], ["eval", "fid"]])
def test_seeds_must_not_be_negative(toy_run, args):
    usage_error(invoke(*args, "--run", toy_run, "--seed", "-1"), "--seed")


def test_recover_num_zero_is_refused_not_the_default(toy_run, tmp_path):
    assert user_error(invoke("recover", "--run", toy_run, "--num", "0", "--out", tmp_path / "r.json")) == (
        "--num must be at least 2, got 0")
    out = tmp_path / "r.txt"
    assert user_error(invoke("recover", "--run", toy_run, "--figure", out)).startswith(
        f"--figure {out}: '.txt' is not a figure format")
    assert files(tmp_path) == set()


# --- 5. a metric that does not apply to the data --------------------------------------------------------------------


FOR_VECTORS = "not vectors like this data; metrics for vectors: energy, sliced-wasserstein"


def test_recover_with_an_image_metric_on_vectors(toy_run):
    assert user_error(invoke("recover", "--run", toy_run, "--sigma", "1", "--metric", "fd-mnist")) == (
        f"--metric fd-mnist scores images (in a detector's features), {FOR_VECTORS}")
    assert user_error(invoke("eval", "sweep", "--run", toy_run, "--detector", "inception.pkl")) == (
        f"--metric fid scores images (in a detector's features), {FOR_VECTORS}")


@pytest.mark.parametrize("metric", ["fd-mnist", "fid"])
def test_preflight_refuses_an_image_metric_on_vectors(tmp_path, monkeypatch, metric):
    monkeypatch.chdir(tmp_path)
    result = invoke("run", TOY2D, "--dry-run", "--set", f"eval.metric={metric}")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[1:] == [  # one problem: fid's missing detector is not reported as well
        f"  - recipe.eval.metric: {metric} scores images (in a detector's features), {FOR_VECTORS}"]


def test_image_metrics_apply_to_images():
    from dpdm.core.eval.metrics import data_problem

    assert data_problem("fd-mnist", "image") is None and data_problem("fid", "image") is None
    assert data_problem("energy", "vector") is None and data_problem("energy", "image") is None


# --- 4. values that pass the types but mean nothing -----------------------------------------------------------------

NAME_RULE = ("names the run folder (runs/<name>-<time>), so it must start with a letter or digit and hold only "
             "letters, digits, '.', '-' and '_'")


@pytest.mark.parametrize("override, problem", [
    ("model.precond.sigma_data=-1",
     "recipe.model: sigma_data (the standard deviation of the training data) must be positive, got -1"),
    ("model.precond.sigma_data=0",
     "recipe.model: sigma_data (the standard deviation of the training data) must be positive, got 0"),
    ("model.precond={name: edm, sigma_min: 5, sigma_max: 1}",
     "recipe.model: need 0 <= sigma_min <= sigma_max, got sigma_min=5, sigma_max=1"),
    ("model.precond={name: ve, sigma_min: -1}",
     "recipe.model: need 0 < sigma_min <= sigma_max, got sigma_min=-1, sigma_max=100.0"),
    ("model.precond={name: vp, beta_d: -1, M: 0}",
     "recipe.model: beta_d must be positive, got -1; M must be at least 1, got 0"),
    ("train.divergence={name: ikl, generator_sigma: -1}",
     "recipe.train.divergence: generator_sigma (the noise level the generator starts from) must be positive, got -1"),
    ("train.sigma.P_std=-1", "recipe.train.sigma: P_std (the standard deviation of ln σ) must be at least 0, got -1.0"),
    ("name=../elsewhere", f"recipe.name: {NAME_RULE}, got '../elsewhere'"),
    ("name=a/b", f"recipe.name: {NAME_RULE}, got 'a/b'"),
    ("seed=-1", "recipe.seed: must be at least 0, got -1"),
    ("eval.figure_samples=0", "recipe.eval.figure_samples: must be at least 1, got 0"),
    ("eval.cross_nfe=0", "recipe.eval.cross_nfe: must be at least 1, got 0"),
])
def test_nonsense_values_are_refused_naming_their_key(tmp_path, monkeypatch, override, problem):
    monkeypatch.chdir(tmp_path)
    result = invoke("run", TOY2D, "--dry-run", "--set", override)
    assert result.exit_code == 1 and result.stdout == "", result.output
    assert result.stderr == f"error: invalid recipe {TOY2D} (1 problem):\n  - {problem}\n"
    assert files(tmp_path) == set()


def test_a_name_with_a_slash_writes_nothing_outside_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    result = invoke("run", TOY2D, *sets(TINY), "--set", "name=../../escaped")
    assert result.exit_code == 1 and "recipe.name: names the run folder" in result.stderr
    assert files(tmp_path) == {Path("work")}
