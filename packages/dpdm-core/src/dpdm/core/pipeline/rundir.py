"""Run directories: the one place that knows a run's layout, where it lives (a local folder or any fsspec URL), and
whether a run may write into it.

    config.yaml          the resolved recipe
    checkpoints/         teacher, student, fake score, baselines (``<role>.safetensors``: weights + network spec)
    checkpoints/train/   training snapshots per phase (teacher/, student/: ckpt-<step>/, see train/snapshots.py),
                         unless engine.checkpoint.dir puts them elsewhere
    metrics.jsonl        per-step losses, gradient norms, lr, images/s, peak memory
    tensorboard/         the same for TensorBoard, when it is installed
    figures/             samples per NFE, NFE curve, recovery panels; figures/progress/: sample grids during training
    eval/                what ``dpdm recover`` and ``dpdm eval`` write (recover.json, sweep/, cross.json, fid-*.json)
    report.json, .md     the run's numbers and checks
    .lock                held while a ``dpdm run`` writes the run (``runlock.py``)

New runs go to ``runs/<recipe-name>-<timestamp>/`` with ``runs/latest`` pointing at the newest (local roots only).

On a URL (``s3://bucket/run``, ``memory://run``), files written through fsspec go there directly (config,
checkpoints, training snapshots, JSON); writers that need a local path (figures, the metrics log, TensorBoard, the
report) write into ``local``, a staging folder, which ``publish()`` uploads file by file, each complete or not at all.
For a local run ``local`` is the run itself.
"""

from __future__ import annotations

import datetime
import os
import posixpath
import shutil
import tempfile
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem

from ..errors import DpdmError
from ..io.storage import check_destination, errors, filesystem, first_line, hint, resolve, upload_file, write_atomic
from .runlock import EXCLUSIVE_CREATE, RunLock

DEFAULT_ROOT = "runs"
CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
SNAPSHOTS = "checkpoints/train"
EVAL = "eval"
FIGURES = "figures"
PROGRESS = "figures/progress"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
LOCK = ".lock"


def _staged(part: str, doc: str) -> property:
    """A part of the run that is written through a local path: under ``RunDir.local``."""
    return property(lambda self: self.local / part, doc=doc)


class RunDir:
    """A run directory at ``where`` (a path or fsspec URL): the paths of its parts, reading and writing them, and
    ``claim`` (the lock and the no-clobber check of ``dpdm run``)."""

    def __init__(self, where: str | os.PathLike):
        text = os.fspath(where)
        fs = filesystem(text)[0]
        self.is_local = isinstance(fs, LocalFileSystem)
        self.url = str(Path(text.removeprefix("file://"))) if self.is_local else text.rstrip("/")
        self.lock: RunLock | None = None
        self._stage: Path | None = None

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RunDir({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RunDir) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> str:
        return str(Path(self.url).resolve()) if self.is_local else self.url

    # --- where things are: URLs (for fsspec writers and readers) -------------------------------------------------

    def file(self, *parts: str) -> str:
        """The path or URL of ``parts`` inside the run."""
        return str(Path(self.url, *parts)) if self.is_local else posixpath.join(self.url, *parts)

    @property
    def config(self) -> str:
        return self.file(CONFIG)

    def checkpoint(self, role: str) -> str:
        """``checkpoints/<role>.safetensors``: ``teacher``, ``student``, ``fake`` or a baseline's name."""
        return self.file(CHECKPOINTS, f"{role}.safetensors")

    @property
    def snapshots(self) -> str:
        """The root of the training snapshots (one folder per phase), when ``engine.checkpoint.dir`` is not set."""
        return self.file(SNAPSHOTS)

    # --- where path writers write: local paths (the run itself, or the staging folder of a URL run) -------------

    @property
    def local(self) -> Path:
        """The run itself for a local run; for a URL, a staging folder on this machine that ``publish()`` uploads."""
        if self.is_local:
            return Path(self.url)
        if self._stage is None:
            self._stage = Path(tempfile.mkdtemp(prefix="dpdm-run-"))
        self._stage.mkdir(exist_ok=True)  # again after a publish
        return self._stage

    eval_dir = _staged(EVAL, "What ``dpdm recover`` and ``dpdm eval`` write.")
    figures = _staged(FIGURES, "The run's figures (``pipeline.evaluation``).")
    progress_figures = _staged(PROGRESS, "Sample grids drawn during training (``eval.hooks.SampleGrid``).")
    metrics_log = _staged(METRICS, "The training records (``train.tracking.Tracker``, JSONL).")
    tensorboard = _staged(TENSORBOARD, "The same records for TensorBoard.")
    report_json = _staged(REPORT_JSON, "The run's numbers (``eval.report``).")
    report_md = _staged(REPORT_MD, "The same, with the claims' verdict, as Markdown.")

    def final(self, path: str | os.PathLike) -> str:
        """Where ``path`` ends up: for a file staged under ``local``, its URL in the run; else ``path`` itself."""
        if self._stage is None:
            return str(path)
        try:
            parts = Path(path).relative_to(self._stage).parts
        except ValueError:
            return str(path)
        return self.file(*parts)

    def publish(self) -> None:
        """Upload what was staged for a URL run (each file complete or not at all) and empty the staging folder; a
        no-op for a local run."""
        stage = self._stage
        if stage is None or not stage.exists():
            return
        try:
            for path in sorted(p for p in stage.rglob("*") if p.is_file()):
                upload_file(str(path), self.file(*path.relative_to(stage).parts))
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def discard(self) -> None:
        """Remove the staging folder without uploading it."""
        if self._stage is not None:
            shutil.rmtree(self._stage, ignore_errors=True)

    # --- reading and writing ------------------------------------------------------------------------------------

    def exists(self, *parts: str) -> bool:
        fs, path = resolve(self.file(*parts))
        return fs.exists(path)

    def read_text(self, *parts: str) -> str:
        fs, path = resolve(self.file(*parts))
        return fs.cat_file(path).decode()

    def write_text(self, text: str, *parts: str) -> None:
        """``parts`` of the run (a file), written complete or not at all."""
        write_atomic(self.file(*parts), text.encode())

    def recipe(self):
        """The run's resolved recipe (``config.yaml``)."""
        from ..config.recipe import load_recipe

        return load_recipe(self.config)

    # --- claiming a run for ``dpdm run`` -------------------------------------------------------------------------

    def claim(self, recipe, *, resume: bool = False) -> RunLock:
        """Lock the run for this process (released by ``release()`` or when the process ends) and check that
        ``recipe`` may write into it; refuse with a ``DpdmError`` before writing anything when it may not.

        Refused: storage that cannot be written or locked; a run another live process holds (``RunBusyError``,
        naming it); a run of another recipe (the training settings differ); without ``resume``, a run that already
        holds training snapshots; with ``resume``, a run of another recipe. The checks run again once the lock is
        held, for a claimer that wrote in between."""
        check_writable(self.url)
        lock = RunLock(self.file(LOCK))
        lock.check()
        self._check_reuse(recipe, resume)
        lock.acquire()
        try:
            self._check_reuse(recipe, resume)
        except BaseException:
            lock.release()
            raise
        self.lock = lock
        return lock

    def release(self) -> None:
        """Give up the lock ``claim`` took (idempotent)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _check_reuse(self, recipe, resume: bool) -> None:
        from ..config.identity import config_changes, training_config

        if not self.exists(CONFIG):
            if resume:
                raise DpdmError(f"{str(self)!r} is not a dpdm run directory (no {CONFIG} in it)")
            return
        changed = config_changes(training_config(self.recipe()), training_config(recipe))
        if changed and resume:
            raise DpdmError(f"cannot resume {self}: the recipe differs from the one it was started with in "
                            f"{', '.join(changed)}; resume with the same recipe and --set overrides, or start a new "
                            f"run")
        if changed:
            raise DpdmError(f"{self} holds a run of another recipe (it differs in {', '.join(changed)}); nothing was "
                            f"written to it. Give a new --out, or continue that run with the recipe it was started "
                            f"with and --resume latest")
        if not resume and self._has_snapshots():
            raise DpdmError(f"{self} already holds training checkpoints ({self.snapshots}); continue that run with "
                            f"--resume, or give another --out")

    def _has_snapshots(self) -> bool:
        fs, path = resolve(self.snapshots)
        return fs.exists(path) and bool(fs.find(path))


def check_writable(url: str) -> None:
    """Refuse (``DpdmError``) a run location that cannot be written or locked: what ``check_destination`` refuses
    (a local folder that cannot be written, a missing bucket, storage that cannot be reached), and a URL on storage
    without exclusive create (``runlock.py``)."""
    check_destination(url, folder=True, what="the run directory ")
    if isinstance(filesystem(url)[0], LocalFileSystem):
        return
    scheme = url.split("://", 1)[0].split("::")[-1].lower()
    if scheme not in EXCLUSIVE_CREATE:
        raise DpdmError(f"cannot use {url} as a run directory: {scheme}:// storage has no exclusive create, so "
                        f"the run could not be locked against a second writer; give a local path, or an s3:// or "
                        f"memory:// URL")


def new_run_dir(name: str, root: str | os.PathLike = DEFAULT_ROOT) -> Path:
    """Create a fresh ``root/<name>-<YYYYmmdd-HHMMSS>`` (a suffix keeps names unique)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path, k = root / f"{name}-{stamp}", 1
    while path.exists():
        k += 1
        path = root / f"{name}-{stamp}-{k}"
    path.mkdir()
    return path


def update_latest(run_dir: str | os.PathLike | RunDir) -> None:
    """Point ``<parent>/latest`` at ``run_dir`` (a relative symlink, replaced atomically); local runs only."""
    run_dir = Path(str(run_dir)).resolve()
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, link)


def resolve_run(run: str | os.PathLike | RunDir | None, root: str | os.PathLike = DEFAULT_ROOT, *,
                given_by: str = "--run DIR") -> RunDir:
    """The run to use: ``run`` (a path or URL) if given, else ``root/latest``; clear errors if absent.
    ``given_by``: how the caller's command names a run, for the message when there is none."""
    if run is None:
        latest = Path(root) / "latest"
        if not latest.exists():
            raise DpdmError(f"no run given and {latest} does not exist; run a recipe first "
                            f"(`dpdm run recipes/toy2d.yaml`) or pass {given_by}")
        return RunDir(latest.resolve())
    found = run if isinstance(run, RunDir) else RunDir(run)
    if found.is_local:
        path = Path(found.url)
        if not path.is_dir():
            raise DpdmError(f"run directory {found.url!r} not found")
        found = RunDir(path.resolve())
    try:
        has_config = found.exists(CONFIG)
        missing = not has_config and not found.exists()
    except errors() as exc:
        raise DpdmError(f"cannot reach {found}: {first_line(exc)}{hint(found.url)}") from None
    if missing:
        raise DpdmError(f"run directory {found.url!r} not found")
    if not has_config:
        raise DpdmError(f"{found.url!r} is not a dpdm run directory (no {CONFIG} in it)")
    return found
