"""Run directories: ``runs/<recipe-name>-<timestamp>/`` with ``runs/latest`` pointing at the newest."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from ..errors import DpdmError

DEFAULT_ROOT = "runs"


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


def update_latest(run_dir: str | os.PathLike) -> None:
    """Point ``<parent>/latest`` at ``run_dir`` (a relative symlink, replaced atomically)."""
    run_dir = Path(run_dir).resolve()
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, link)


def resolve_run(run: str | os.PathLike | None, root: str | os.PathLike = DEFAULT_ROOT) -> Path:
    """The run directory to use: ``run`` if given, else ``root/latest``; clear errors if absent."""
    if run is None:
        latest = Path(root) / "latest"
        if not latest.exists():
            raise DpdmError(f"no run given and {latest} does not exist; run a recipe first "
                            "(`dpdm run recipes/toy2d.yaml`) or pass --run DIR")
        return latest.resolve()
    path = Path(run)
    if not path.is_dir():
        raise DpdmError(f"run directory {str(path)!r} not found")
    if not (path / "config.yaml").exists():
        raise DpdmError(f"{str(path)!r} is not a dpdm run directory (no config.yaml in it)")
    return path.resolve()
