"""Exact resume (issue #6): a run killed with SIGKILL at a random step and resumed with ``--resume`` ends
with the same parameters, to the bit on CPU, as an uninterrupted run with the same seed.

Both runs are real ``dpdm run`` processes (``python -m dpdm.cli``) with identical environments; the
interrupted one is killed as soon as the snapshot of a randomly drawn step is complete (so the kill
usually lands while the next snapshot is being written), then resumed in the same directory. The
random step is printed in the failure message. The 2-process variant runs under torchrun (gloo); its
uninterrupted reference is launched with ``dpdm run --nproc 2`` instead, which must be the same run.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from dpdm.cli.main import app

TOY2D = str(Path(__file__).resolve().parent.parent / "recipes" / "toy2d.yaml")
TEACHER_STEPS, STUDENT_STEPS = 30, 40
RECIPE = [
    f"teacher.train.steps={TEACHER_STEPS}", f"train.steps={STUDENT_STEPS}", "train.fake_updates=2",
    "teacher.train.batch_size=64", "train.batch_size=64", "train.ema_halflife_nimg=500",
    "model.backbone.hidden=32", "model.backbone.depth=1", "engine.checkpoint.every=1", "engine.checkpoint.keep_last=2",
    "engine.log_every=5", "eval.num_samples=200", "eval.recovery_num=200", "eval.teacher_nfe=[1,2]",
    "eval.student_steps=[1,2]", "eval.one_step_sigma_max=[80.0]", "eval.teacher_samplers=[euler]",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200"}


def _command(out: Path, *extra: str, nproc: int = 1, launcher: str = "torchrun", recipe=RECIPE) -> list[str]:
    """``python -m dpdm.cli run ...``; for several processes under ``torchrun`` or through ``dpdm run --nproc``."""
    sets = [part for o in recipe for part in ("--set", o)]
    launch = [sys.executable, "-m", "dpdm.cli"]
    if nproc > 1 and launcher == "torchrun":
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                  "-m", "dpdm.cli"]
    elif nproc > 1:
        extra = (*extra, "--nproc", str(nproc))
    return [*launch, "run", TOY2D, *sets, "--out", str(out), *extra]


def _run(out: Path, *extra: str, nproc: int = 1, cwd: Path, launcher: str = "torchrun",
         recipe=RECIPE) -> subprocess.CompletedProcess:
    proc = subprocess.run(_command(out, *extra, nproc=nproc, launcher=launcher, recipe=recipe), cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _kill_at(out: Path, phase: str, step: int, *, nproc: int = 1, cwd: Path, recipe=RECIPE) -> None:
    """Start the run and SIGKILL it (with every process it started) once ``phase``'s snapshot of ``step`` is
    complete."""
    marker = out / "checkpoints" / "train" / phase / f"ckpt-{step:09d}" / "COMPLETE"
    proc = subprocess.Popen(_command(out, nproc=nproc, recipe=recipe), cwd=cwd, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    try:
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the run ended (exit {proc.returncode}) before {phase} step {step} was saved: "
                                     f"{proc.stderr.read().decode()[-2000:]}")
            if time.time() > deadline:
                raise AssertionError(f"{phase} step {step} was not saved within 300 s")
            time.sleep(0.002)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "report.json").exists()


def _weights(out: Path) -> dict:
    return {name: load_file(str(out / "checkpoints" / f"{name}.safetensors"))
            for name in ("teacher", "student", "fake")}


def _assert_bit_identical(got: dict, want: dict, where: str) -> None:
    for name, tensors in want.items():
        assert sorted(got[name]) == sorted(tensors)
        for key, t in tensors.items():
            assert got[name][key].dtype == t.dtype and got[name][key].equal(t), f"{where}: {name}.{key} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted single-process run (shared by the tests that interrupt one and compare)."""
    where = tmp_path_factory.mktemp("reference")
    _run(where / "run", cwd=where, launcher="--nproc")
    return where / "run"


def _resume_matches(tmp_path: Path, nproc: int, reference: Path | None = None, recipe=RECIPE,
                    phases=("teacher", "student")) -> None:
    rng = random.Random()
    phase = rng.choice(phases)
    step = rng.randint(1, (TEACHER_STEPS if phase == "teacher" else STUDENT_STEPS) - 1)
    where = f"killed after {phase} step {step} ({nproc} process(es))"
    interrupted = tmp_path / "interrupted"
    if reference is None:
        reference = tmp_path / "reference"
        ref_run = _run(reference, nproc=nproc, cwd=tmp_path, launcher="--nproc", recipe=recipe)  # the same run
        if nproc > 1:
            assert "launching: -m dpdm.cli.torchrun --standalone --nproc_per_node=2" in ref_run.stderr
            assert f"({nproc} processes, gloo)" in ref_run.stderr
    _kill_at(interrupted, phase, step, nproc=nproc, cwd=tmp_path, recipe=recipe)
    snaps = sorted(p.name for p in (interrupted / "checkpoints" / "train" / phase).iterdir()
                   if (p / "COMPLETE").exists())
    assert snaps and snaps[-1] >= f"ckpt-{step:09d}", (where, snaps)
    resumed = _run(interrupted, "--resume", "latest", nproc=nproc, cwd=tmp_path, recipe=recipe)
    assert f"{phase}: resumed from" in resumed.stderr, (where, resumed.stderr[-2000:])
    _assert_bit_identical(_weights(interrupted), _weights(reference), where)
    ref, got = (json.loads((d / "report.json").read_text()) for d in (reference, interrupted))
    assert got["sweep"] == ref["sweep"] and got["recovery"] == ref["recovery"], where
    assert got["world_size"] == nproc


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tmp_path, reference):
    _resume_matches(tmp_path, nproc=1, reference=reference)


@pytest.mark.slow
def test_sigkill_and_resume_under_two_process_gloo_ddp(tmp_path):
    _resume_matches(tmp_path, nproc=2)


@pytest.mark.slow
def test_sigkill_and_resume_with_the_fake_score_as_adapters(tmp_path):
    """The student phase killed at a random step with ``train.fake_lora`` (the snapshots hold the fake score's
    adapters alone; the teacher's weights come back from the teacher phase), resumed: to the bit."""
    _resume_matches(tmp_path, nproc=1, recipe=[*RECIPE, "train.fake_lora={rank: 2}"], phases=("student",))


def _invoke(*args, cwd: Path):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "1000"})
    finally:
        os.chdir(old)


def test_resume_refuses_a_changed_recipe_and_a_fresh_run_refuses_old_checkpoints(tmp_path):
    out = tmp_path / "run"
    sets = [part for o in RECIPE for part in ("--set", o)]
    tiny = [*sets, "--set", "teacher.train.steps=3", "--set", "train.steps=2"]
    first = _invoke("run", TOY2D, *tiny, "--out", out, cwd=tmp_path)
    assert first.exit_code == 0, first.output
    changed = _invoke("run", TOY2D, *tiny, "--set", "train.lr=3e-4", "--out", out, "--resume", "latest", cwd=tmp_path)
    assert changed.exit_code == 1 and "Traceback" not in changed.output
    assert f"cannot resume {out.resolve()}: the recipe differs from the one it was started with in " \
           "recipe.train.lr;" in changed.stderr
    again = _invoke("run", TOY2D, *tiny, "--out", out, cwd=tmp_path)
    assert again.exit_code == 1
    assert "already holds training checkpoints" in again.stderr and "--resume" in again.stderr
    # an eval-only change is allowed on resume; both phases are complete, so nothing is retrained
    evals = _invoke("run", TOY2D, *tiny, "--set", "eval.num_samples=100", "--out", out, "--resume", "latest",
                    cwd=tmp_path)
    assert evals.exit_code == 0, evals.output
    assert "teacher: resumed from" in evals.stderr and "student: resumed from" in evals.stderr
    missing = _invoke("run", TOY2D, *tiny, "--resume", tmp_path / "nowhere", cwd=tmp_path)
    assert missing.exit_code == 1 and "not found" in missing.stderr


# --- SIGTERM / SIGINT: stop after the current step with a snapshot, say how to resume -----------------------------


def _stop_with(signum: int, command: list[str], out: Path, phase: str, cwd: Path) -> tuple[int, str]:
    """Run ``command``, send ``signum`` once ``phase`` logged a step (``engine.log_every=1``); ``(status, stderr)``."""
    proc = subprocess.Popen(command, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if metrics.exists() and any(json.loads(line)["phase"] == phase for line in metrics.read_text().splitlines()
                                    if line.endswith("}")):
            proc.send_signal(signum)
            break
        time.sleep(0.01)
    try:
        status = proc.wait(timeout=120)
    finally:
        proc.kill()
    return status, proc.stderr.read()


def _resume_line(stderr: str) -> list[str]:
    """The command after ``resume with:``, as arguments of ``python -m dpdm.cli``."""
    line = next(line for line in stderr.splitlines() if line.startswith("resume with: "))
    words = shlex.split(line.removeprefix("resume with: "))
    assert words[0] == "dpdm"
    return [sys.executable, "-m", "dpdm.cli", *words[1:]]


def test_sigterm_then_sigint_stop_after_a_step_with_a_snapshot_and_resume_bit_identically(tmp_path, reference):
    """SIGTERM (Slurm, Kubernetes) during the teacher and Ctrl-C during the student: each finishes its step, writes a
    snapshot (checkpoints are otherwise only at the end), prints the resume command, exits 143 / 130 with the lock
    released; the printed command continues the run to the same weights as an uninterrupted one."""
    _stop_and_resume(tmp_path / "interrupted", reference, tmp_path, nproc=1)


@pytest.mark.slow
def test_sigterm_to_an_nproc_launch_snapshots_on_every_rank_and_resumes_bit_identically(tmp_path):
    reference = tmp_path / "reference"
    _run(reference, nproc=2, cwd=tmp_path, launcher="--nproc")
    _stop_and_resume(tmp_path / "interrupted", reference, tmp_path, nproc=2)


def _stop_and_resume(out: Path, reference: Path, tmp_path: Path, nproc: int) -> None:
    command = _command(out, "--set", "engine.checkpoint.every=1000", "--set", "engine.log_every=1", nproc=nproc,
                       launcher="--nproc")
    for signum, phase, status_wanted in ((signal.SIGTERM, "teacher", 143), (signal.SIGINT, "student", 130)):
        status, stderr = _stop_with(signum, command, out, phase, tmp_path)
        assert status == status_wanted, stderr[-3000:]
        stop = next(line for line in stderr.splitlines() if line.startswith("stopped by"))
        name = signal.Signals(signum).name
        assert stop.startswith(f"stopped by {name} after {phase} step "), stderr[-3000:]
        step = int(stop.split(" step ")[1].split(";")[0])
        snapshot = out / "checkpoints" / "train" / phase / f"ckpt-{step:09d}"
        assert stop.endswith(f"; training snapshot: {snapshot}") and (snapshot / "COMPLETE").exists()
        assert 0 < step < (TEACHER_STEPS if phase == "teacher" else STUDENT_STEPS)
        assert "Traceback" not in stderr and not (out / ".lock").exists() and not (out / "report.json").exists()
        if nproc > 1:  # every rank wrote its part of the snapshot
            assert sorted(p.name for p in snapshot.glob("rank-*")) == ["rank-00000.pt", "rank-00001.pt"]
            assert stderr.count("stopped by") == 1  # rank 0 speaks
        command = _resume_line(stderr)
        assert command[-2:] == ["--resume", str(out)] and "--out" not in command
        assert (command[-4:-2] == ["--nproc", str(nproc)]) == (nproc > 1)
    finished = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "teacher: resumed from" in finished.stderr and "student: resumed from" in finished.stderr
    _assert_bit_identical(_weights(out), _weights(reference), f"stopped by SIGTERM, then SIGINT ({nproc} processes)")
