"""The run directory (``pipeline/rundir.py``, ``pipeline/runlock.py``): one type owns the layout; ``dpdm run`` holds
a lock for the run's lifetime (a second writer is refused, naming the holder; the lock goes when the process goes,
SIGTERM included); an existing run is never written before the decision to refuse; any fsspec URL with exclusive
create works end to end (``memory://`` here, in one process), and other URLs are refused with a message."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
import torch
from dpdm.cli.main import app
from dpdm.core.config.recipe import load_recipe
from dpdm.core.errors import DpdmError
from dpdm.core.pipeline.run import load_run
from dpdm.core.pipeline.rundir import RunDir, check_writable, resolve_run
from dpdm.core.pipeline.runlock import RunBusyError, RunLock
from dpdm.core.train.signals import Interrupted, stop_on_signals
from fsspec.implementations.memory import MemoryFileSystem
from typer.testing import CliRunner

torch.set_num_threads(1)

TOY2D = str(Path(__file__).resolve().parent.parent / "recipes" / "toy2d.yaml")
TINY = [
    "teacher.train.steps=3", "train.steps=2", "train.fake_updates=1", "eval.num_samples=50", "eval.recovery_num=50",
    "eval.teacher_nfe=[1]", "eval.student_steps=[1]", "eval.one_step_sigma_max=[80.0]", "eval.recovery_sigmas=[1.0]",
    "eval.teacher_samplers=[euler]", "model.backbone.hidden=8", "model.backbone.depth=1",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
HOLD = ("import sys; from dpdm.core.pipeline.runlock import RunLock; lock = RunLock(sys.argv[1]); lock.acquire(); "
        "print('held', flush=True); sys.stdin.read()")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "1000"})


def sets(overrides):
    return [part for o in overrides for part in ("--set", o)]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes and modification time."""
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def holder(tmp_path):
    """``hold(url)``: another process takes the lock at ``url`` and keeps it until the test ends; returns it."""
    procs = []

    def hold(url: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, env=ENV)
        assert proc.stdout.readline().strip() == "held"
        procs.append(proc)
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (local), made once."""
    out = tmp_path_factory.mktemp("rundir") / "run"
    result = invoke("run", TOY2D, *sets(TINY), "--out", out)
    assert result.exit_code == 0, (result.output, result.exception)
    return out


# --- layout ------------------------------------------------------------------------------------------------------


def test_the_layout_of_a_local_run(tmp_path):
    run = RunDir(tmp_path / "run")
    base = tmp_path / "run"
    assert run.is_local and str(run) == str(base)
    assert run.config == str(base / "config.yaml")
    assert run.checkpoint("student") == str(base / "checkpoints" / "student.safetensors")
    assert run.snapshots == str(base / "checkpoints" / "train")
    assert run.eval_dir == base / "eval"
    assert run.local == base
    assert (run.figures, run.progress_figures) == (base / "figures", base / "figures" / "progress")
    assert (run.metrics_log, run.tensorboard) == (base / "metrics.jsonl", base / "tensorboard")
    assert (run.report_json, run.report_md) == (base / "report.json", base / "report.md")
    assert run.final(run.figures / "a.png") == str(base / "figures" / "a.png")
    assert RunDir(f"file://{base}") == run == RunDir(base / "." / "")


def test_the_layout_of_a_url_run_stages_path_writers_locally():
    run = RunDir("memory://bucket/layout/")
    assert not run.is_local and run.url == "memory://bucket/layout"
    assert run.config == "memory://bucket/layout/config.yaml"
    assert run.checkpoint("teacher") == "memory://bucket/layout/checkpoints/teacher.safetensors"
    assert run.snapshots == "memory://bucket/layout/checkpoints/train"
    stage = run.local
    assert stage.is_dir() and "memory:" not in str(stage)
    run.figures.mkdir(parents=True)
    (run.figures / "a.png").write_bytes(b"png")
    assert run.final(run.figures / "a.png") == "memory://bucket/layout/figures/a.png"
    run.publish()
    assert not stage.exists()
    assert fsspec.filesystem("memory").cat_file("/bucket/layout/figures/a.png") == b"png"


# --- the lock ----------------------------------------------------------------------------------------------------


def test_a_second_claimer_is_refused_naming_the_holder(tmp_path, holder):
    url = str(tmp_path / "run" / ".lock")
    proc = holder(url)
    with pytest.raises(RunBusyError, match=rf"in use by another dpdm run \(pid {proc.pid} on "
                                           rf"{socket.gethostname()}, since \d{{4}}-\d\d-\d\d"):
        RunLock(url).acquire()
    with pytest.raises(RunBusyError):
        RunLock(url).check()  # the check before any write refuses too


def test_the_lock_goes_with_its_process_even_killed(tmp_path, holder):
    url = str(tmp_path / "run" / ".lock")
    proc = holder(url)
    proc.kill()
    proc.wait()
    with RunLock(url) as lock:  # the kernel released the flock; the file it left names the dead holder
        assert lock.notes and f"pid {proc.pid}" in lock.notes[0] and "ended without releasing it" in lock.notes[0]
    assert not Path(url).exists()  # a clean release removes the file
    with RunLock(url) as again:
        assert again.notes == []


def test_a_stale_url_lock_of_a_dead_process_on_this_host_is_taken_over():
    url = "memory://locks/stale/.lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/locks/stale/.lock", f'{{"host": "{socket.gethostname()}", "pid": {dead.pid}, '
                                        f'"started": "then", "token": "old"}}'.encode())
    with RunLock(url) as lock:
        assert f"pid {dead.pid}" in lock.notes[0] and "no longer running" in lock.notes[0]
        with pytest.raises(RunBusyError, match=rf"pid {os.getpid()} on"):
            RunLock(url).acquire()  # a live holder: refused
    assert not fs.exists("/locks/stale/.lock")


def test_a_url_lock_held_from_another_host_names_the_object_to_delete():
    fsspec.filesystem("memory").pipe_file("/locks/far/.lock", b'{"host": "elsewhere", "pid": 1, "started": "then"}')
    with pytest.raises(RunBusyError, match=r"pid 1 on elsewhere, since then\); if that run is gone, delete "
                                           r"memory://locks/far/.lock"):
        RunLock("memory://locks/far/.lock").acquire()


class NoLockFileSystem(MemoryFileSystem):
    protocol = "nolock"


def test_urls_that_cannot_be_locked_or_written_are_refused(tmp_path):
    fsspec.register_implementation("nolock", NoLockFileSystem, clobber=True)
    with pytest.raises(DpdmError, match=r"nolock://b/run as a run directory: nolock:// storage has no exclusive "
                                        r"create"):
        check_writable("nolock://b/run")
    with pytest.raises(DpdmError, match=r"foo://b/run: Protocol not known: foo"):
        RunDir("foo://b/run")
    (tmp_path / "file").write_text("")
    with pytest.raises(DpdmError, match=rf"cannot write the run directory {tmp_path}/file/run: {tmp_path}/file is a "
                                        rf"file, not a folder"):
        check_writable(str(tmp_path / "file" / "run"))
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(DpdmError, match=rf"cannot write the run directory {ro}/a/run: {ro} is not writable"):
            check_writable(str(ro / "a" / "run"))


def test_the_cli_refuses_an_unsupported_url_before_writing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fsspec.register_implementation("nolock", NoLockFileSystem, clobber=True)
    result = invoke("run", TOY2D, *sets(TINY), "--out", "nolock://bucket/run")
    assert result.exit_code == 1 and "no exclusive create" in result.stderr
    assert list(tmp_path.iterdir()) == []  # no local folder named "nolock:"


def test_a_signal_outside_training_stops_at_once_through_finally_blocks(tmp_path):
    url = str(tmp_path / ".lock")
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as exc, stop_on_signals(), RunLock(url):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at the next bytecode
    assert exc.value.status == 143 and str(exc.value) == "stopped by SIGTERM"
    assert not Path(url).exists()  # released on the way out
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_sigterm_during_dpdm_run_exits_143_and_releases_the_lock(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "dpdm.cli", "run", TOY2D, *sets(TINY[2:]),
                             "--set", "teacher.train.steps=1000000", "--out", str(out)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "config.yaml").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert (out / ".lock").exists(), proc.stderr.read() if proc.poll() is not None else "no lock after 120 s"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert not (out / ".lock").exists()
    with RunLock(str(out / ".lock")) as lock:
        assert lock.notes == []


def _workers_of(marker: str) -> list[int]:
    """The pids of live processes whose environment holds ``marker`` (the workers ``--nproc`` started: their
    arguments travel in DPDM_ARGV)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _launch_training_with_two_ranks(out: Path) -> subprocess.Popen:
    """``dpdm run --nproc 2`` of a teacher phase that would never end, once it has begun writing ``out``."""
    proc = subprocess.Popen([sys.executable, "-m", "dpdm.cli", "run", TOY2D, *sets(TINY[2:]),
                             "--set", "teacher.train.steps=1000000", "--out", str(out), "--nproc", "2"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    return proc


@pytest.mark.slow
def test_sigterm_to_an_nproc_launch_stops_every_worker(tmp_path):
    out = tmp_path / "ddp-run"
    proc = _launch_training_with_two_ranks(out)
    workers = _workers_of(str(out))
    assert len(workers) >= 2, proc.stderr.read() if proc.poll() is not None else "no workers"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    deadline = time.time() + 60
    while _workers_of(str(out)) and time.time() < deadline:
        time.sleep(0.2)
    assert _workers_of(str(out)) == []  # no orphans
    assert not (out / ".lock").exists()


def _descendants(root: int) -> set[int]:
    """The pids of the live processes whose ancestry leads to ``root`` (through /proc's parent links)."""
    parents = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit():
                stat = (proc / "stat").read_text()
                parents[int(proc.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_sigkill_of_the_nproc_launcher_leaves_no_orphans(tmp_path):
    """Killing ``dpdm run --nproc 2`` outright: torchrun gets SIGTERM (its parent-death signal) and stops its workers,
    which would get SIGKILL should the agent die; within seconds nothing the launcher started is alive."""
    out = tmp_path / "ddp-run"
    proc = _launch_training_with_two_ranks(out)
    started = _descendants(proc.pid)
    assert len(_workers_of(str(out))) >= 3, proc.stderr.read() if proc.poll() is not None else "no workers"
    assert len(started) >= 3  # torchrun and its two workers
    proc.kill()
    proc.wait()
    deadline = time.time() + 20
    while any(_alive(pid) for pid in started) and time.time() < deadline:
        time.sleep(0.1)
    assert [pid for pid in started if _alive(pid)] == [] and _workers_of(str(out)) == []
    assert not (out / ".lock").exists()  # rank 0 stopped gracefully (its agent's SIGTERM) and released the lock


# --- no clobbering -----------------------------------------------------------------------------------------------


def test_another_recipe_is_refused_and_nothing_is_written(finished):
    before = snapshot(finished)
    result = invoke("run", TOY2D, *sets(TINY + ["train.lr=3e-4"]), "--out", finished)
    assert result.exit_code == 1 and "Traceback" not in result.output
    message = " ".join(result.stderr.split())
    assert f"{finished} holds a run of another recipe (it differs in recipe.train.lr); nothing was written" in message
    assert "--resume latest" in message and "new --out" in message
    assert snapshot(finished) == before  # config.yaml byte-identical, nothing added or touched


def test_the_same_recipe_without_resume_is_refused_before_writing(finished):
    before = snapshot(finished)
    result = invoke("run", TOY2D, *sets(TINY + ["eval.num_samples=40"]), "--out", finished)
    assert result.exit_code == 1 and "already holds training checkpoints" in result.stderr
    assert snapshot(finished) == before


def test_a_busy_run_is_refused_naming_the_holder(finished, holder):
    proc = holder(str(finished / ".lock"))
    before = snapshot(finished)
    result = invoke("run", TOY2D, *sets(TINY), "--out", finished, "--resume", "latest")
    assert result.exit_code == 1
    assert f"is in use by another dpdm run (pid {proc.pid} on {socket.gethostname()}" in " ".join(result.stderr.split())
    assert snapshot(finished) == before


def test_the_same_recipe_resumes(finished):
    result = invoke("run", TOY2D, *sets(TINY), "--out", finished, "--resume", "latest")
    assert result.exit_code == 0, result.output
    assert "teacher: resumed from" in result.stderr and "student: resumed from" in result.stderr
    assert not (finished / ".lock").exists()


def test_a_resume_without_a_snapshot_says_the_phase_starts_over(finished, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "checkpoints" / "train" / "student")  # killed before the student's first snapshot
    result = invoke("run", TOY2D, *sets(TINY), "--out", run, "--resume", "latest")
    assert result.exit_code == 0, result.output
    log = " ".join(result.stderr.split())
    assert "teacher: resumed from" in log
    assert "student: --resume found no training snapshot under" in log and "starts from step 0" in log


# --- fsspec URLs ---------------------------------------------------------------------------------------------------


def test_a_memory_url_run_round_trip(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = "memory://bucket/round-trip"
    result = invoke("run", TOY2D, *sets(TINY), "--out", url)
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"done: {url}/report.json" in result.stderr and "Sampling quality vs NFE" in result.stdout
    fs = fsspec.filesystem("memory")
    files = {p.removeprefix("/bucket/round-trip/") for p in fs.find("/bucket/round-trip")}
    assert {"config.yaml", "report.json", "report.md", "metrics.jsonl", "checkpoints/teacher.safetensors",
            "checkpoints/student.safetensors", "checkpoints/fake.safetensors", "figures/samples_student.png"} <= files
    assert any(f.startswith("checkpoints/train/teacher/ckpt-") for f in files)
    assert ".lock" not in files
    assert list(tmp_path.iterdir()) == []  # nothing local: no folder named "memory:"
    run = resolve_run(url)
    recipe, _teacher, student = load_run(run)
    assert recipe == load_recipe(TOY2D, TINY)
    assert student(torch.zeros(3, 2), torch.ones(3)).shape == (3, 2)
    rec = invoke("recover", "--run", url, "--sigma", "1", "--num", "20")
    assert rec.exit_code == 0, rec.output
    assert fs.exists("/bucket/round-trip/eval/recover.json") and fs.exists("/bucket/round-trip/figures/recover.png")
    again = invoke("run", TOY2D, *sets(TINY), "--out", url, "--resume", "latest")
    assert again.exit_code == 0, again.output
    assert "student: resumed from" in again.stderr
    other = invoke("run", TOY2D, *sets(TINY + ["seed=1"]), "--out", url)
    assert other.exit_code == 1 and "holds a run of another recipe (it differs in recipe.seed)" in other.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_missing_url_run_is_reported():
    with pytest.raises(DpdmError, match=r"run directory 'memory://nowhere/run' not found"):
        resolve_run("memory://nowhere/run")


@pytest.mark.parametrize("args", [["sample", "--out", "s3://bucket/x.png"],
                                  ["recover", "--figure", "memory://bucket/r.png"],
                                  ["eval", "sweep", "--out", "gs://bucket/sweep"]])
def test_options_that_write_a_local_file_refuse_urls(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(*args)
    assert result.exit_code == 2 and "a local path is expected here, not a URL" in " ".join(result.output.split())
    assert list(tmp_path.iterdir()) == []
