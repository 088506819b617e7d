"""A ``dpdm data prepare`` stopped while it writes (SIGTERM, SIGINT, SIGKILL) leaves no worker process running, and no
temporary ZIP once the next prepare to the same destination has run (the killed process's is removed by its pid)."""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpdm.core.io.storage import remove_stale
from dpdm.data.prepare import prepare as run_prepare

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

IMAGES = 400  # enough that two workers take a few seconds at 512 x 512 -> 64 x 64


def children(pid: int) -> set[int]:
    """Every live process whose parent is ``pid`` (from /proc/*/stat; zombies are dead)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == str(pid) and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("photos")
    ramp = np.linspace(0, 255, 512, dtype=np.uint8)
    blob = io.BytesIO()
    Image.fromarray(np.stack([np.add.outer(ramp, ramp // 2)] * 3, -1)).save(blob, format="jpeg", quality=90)
    for i in range(IMAGES):
        (src / f"{i:04d}.jpg").write_bytes(blob.getvalue())
    return src


def prepare(src: Path, dst: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "dpdm.cli", "data", "prepare", str(src), str(dst), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".d.zip.tmp-"))


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGKILL, -9)])
def test_a_stopped_prepare_leaves_no_workers_and_no_temporary_file(photos, tmp_path, sig, status, caplog):
    dst = tmp_path / "d.zip"
    proc = prepare(photos, dst, "--resolution", "64", "--transform", "center-crop", "--workers", "2")
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 30
        while not (len(children(proc.pid)) >= 2 and temporaries(tmp_path)):  # workers started, the ZIP begun
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        time.sleep(0.5)  # mid-conversion
        workers = children(proc.pid)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=30)  # (orphaned workers would hold its pipes open: a timeout)
        deadline = time.monotonic() + 5
        while any(alive(p) for p in workers) and time.monotonic() < deadline:  # SIGKILL: they see the parent gone
            time.sleep(0.1)
        assert not [p for p in workers if alive(p)]
    finally:  # whatever failed, leave nothing running
        for p in [proc.pid, *workers]:
            if alive(p):
                os.kill(p, signal.SIGKILL)
    assert proc.returncode == status, stderr
    assert "Traceback" not in stderr, stderr
    assert not dst.exists()
    left = temporaries(tmp_path)
    if sig != signal.SIGKILL:
        assert left == []  # removed on the way out
    else:
        assert len(left) == 1 and left[0].startswith(f".d.zip.tmp-{proc.pid}-")  # the killed process's
        with caplog.at_level(logging.INFO, logger="dpdm.core.io.storage"):
            run_prepare(str(photos), str(dst), resolution=64, transform="center-crop", workers=1, max_images=2)
        assert f"removed {tmp_path / left[0]}, left by a process that was killed while writing {dst}" in caplog.text
        assert dst.exists() and temporaries(tmp_path) == []


def test_remove_stale_keeps_live_and_foreign_temporaries(tmp_path):
    from dpdm.core.io.storage import _HOST, _sibling

    dst = str(tmp_path / "d.zip")
    mine = Path(_sibling(dst))  # this process's: alive
    mine.write_bytes(b"x")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = tmp_path / f".d.zip.tmp-{int(dead.stdout)}-{_HOST}-0123abcd"
    other_host = tmp_path / f".d.zip.tmp-{int(dead.stdout)}-not-{_HOST}-0123abcd"
    old_style = tmp_path / ".d.zip.tmp-0123abcd"
    other_file = tmp_path / f".e.zip.tmp-{int(dead.stdout)}-{_HOST}-0123abcd"
    for p in (gone, other_host, old_style, other_file):
        p.write_bytes(b"x")
    assert remove_stale(dst) == [str(gone)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (mine, other_host, old_style,
                                                                                 other_file))
