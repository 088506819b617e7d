"""``dpdm.core.io.storage``: files appear complete or not at all, on local disks and fsspec storage."""

from __future__ import annotations

import os
import uuid

import fsspec
import pytest

from dpdm.core.io import storage
from dpdm.core.io.storage import AtomicPath, write_atomic


class Cut(RuntimeError):
    pass


@pytest.fixture(params=["local", "memory"])
def folder(request, tmp_path):
    """``(url of an empty folder, its fsspec filesystem, its path there)``."""
    if request.param == "local":
        yield str(tmp_path / "out"), fsspec.filesystem("file"), str(tmp_path / "out")
        return
    path = f"/test-storage-{uuid.uuid4().hex[:8]}"
    yield f"memory://{path}", fsspec.filesystem("memory"), path
    fsspec.filesystem("memory").rm(path, recursive=True)


def listing(fs, path: str) -> list[str]:
    """Every file and folder below ``path``, relative to it."""
    root = fs._strip_protocol(path).rstrip("/")
    return sorted(p[len(root) + 1:] for p in fs.find(path, withdirs=True) if p.rstrip("/") != root)


def test_write_atomic_creates_the_folders_and_replaces_an_existing_file(folder):
    url, fs, path = folder
    write_atomic(f"{url}/sub/a.bin", b"first")
    assert fs.cat_file(f"{path}/sub/a.bin") == b"first"
    write_atomic(f"{url}/sub/a.bin", b"second")
    assert fs.cat_file(f"{path}/sub/a.bin") == b"second"
    assert listing(fs, path) == ["sub", "sub/a.bin"]  # no temporary file left beside it


def test_write_atomic_that_fails_at_the_rename_leaves_the_old_file_and_no_temporary(folder, monkeypatch):
    url, fs, path = folder
    write_atomic(f"{url}/a.bin", b"old")

    def broken(*args, **kwargs):
        raise PermissionError("read-only file system")

    if fs.protocol == "memory":
        monkeypatch.setattr(fs, "mv", broken)
    else:
        monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(PermissionError, match="read-only file system"):
        write_atomic(f"{url}/a.bin", b"new")
    with pytest.raises(PermissionError):
        write_atomic(f"{url}/b.bin", b"new")
    monkeypatch.undo()
    assert listing(fs, path) == ["a.bin"] and fs.cat_file(f"{path}/a.bin") == b"old"


def test_atomic_path_failing_mid_write_leaves_neither_file_nor_temporary(folder):
    url, fs, path = folder
    write_atomic(f"{url}/keep.bin", b"kept")
    with pytest.raises(Cut):
        with AtomicPath(f"{url}/a.bin") as tmp, open(tmp, "wb") as f:
            f.write(b"half of it")
            raise Cut("the connection dropped")
    assert not os.path.exists(tmp)
    assert listing(fs, path) == ["keep.bin"]


def test_atomic_path_publishes_on_success_and_replaces(folder):
    url, fs, path = folder
    write_atomic(f"{url}/a.bin", b"old")
    with AtomicPath(f"{url}/a.bin") as tmp:
        assert not os.path.exists(tmp)  # the writer creates it (with the umask's permissions)
        with open(tmp, "wb") as f:
            for chunk in (b"str", b"eam", b"ed"):
                f.write(chunk)
    assert not os.path.exists(tmp)
    assert fs.cat_file(f"{path}/a.bin") == b"streamed" and listing(fs, path) == ["a.bin"]


def test_atomic_path_commit_and_discard_by_hand(folder):
    url, fs, path = folder
    staged = AtomicPath(f"{url}/a.bin")
    with open(staged.path, "xb") as f:
        f.write(b"abandoned")
    staged.discard()
    assert not os.path.exists(staged.path) and listing(fs, path) == []
    staged = AtomicPath(f"{url}/a.bin")
    with open(staged.path, "xb") as f:
        f.write(b"done")
    staged.commit()
    assert fs.cat_file(f"{path}/a.bin") == b"done" and listing(fs, path) == ["a.bin"]


def test_local_files_get_the_umask_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    write_atomic(str(tmp_path / "a.bin"), b"x")
    with AtomicPath(str(tmp_path / "b.bin")) as tmp, open(tmp, "wb") as f:
        f.write(b"y")
    for name in ("a.bin", "b.bin"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_first_line():
    assert storage.first_line(ValueError("one\ntwo")) == "one"
    assert storage.first_line(ValueError("  \n")) == "ValueError"
