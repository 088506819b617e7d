"""``dpdm.core.io.storage``: files appear complete or not at all, on local disks and fsspec storage."""

from __future__ import annotations

import os
import uuid

import fsspec
import pytest

from dpdm.core.errors import DpdmError
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


# --- destinations: refused before any work, nothing written ---------------------------------------------------------


def _tree(folder) -> list:
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


def test_a_destination_below_a_file_is_refused_naming_the_file(tmp_path):
    (tmp_path / "afile").write_text("")
    for url, folder in ((tmp_path / "afile" / "x.png", False), (tmp_path / "afile" / "a" / "b", True)):
        with pytest.raises(DpdmError) as info:
            storage.check_destination(str(url), folder=folder, what="--out ")
        assert str(info.value) == f"cannot write --out {url}: {tmp_path / 'afile'} is a file, not a folder"
    assert _tree(tmp_path) == [tmp_path.joinpath("afile").relative_to(tmp_path)]


def test_a_file_where_a_folder_is_wanted_and_the_reverse(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(DpdmError, match=rf"^cannot write {tmp_path}/f: {tmp_path}/f is a file, not a folder$"):
        storage.check_destination(str(tmp_path / "f"), folder=True)
    with pytest.raises(DpdmError, match=rf"^cannot write {tmp_path}: {tmp_path} is a folder, not a file$"):
        storage.check_destination(str(tmp_path))


def test_an_unknown_protocol_is_refused():
    with pytest.raises(DpdmError, match=r"^cannot write foo://b/x.png: Protocol not known: foo$"):
        storage.check_destination("foo://b/x.png")


def test_writable_destinations_pass_and_nothing_is_created(tmp_path):
    storage.check_destination(str(tmp_path / "new" / "deeper" / "x.json"))
    storage.check_destination(str(tmp_path / "new" / "run"), folder=True)
    storage.check_destination(str(tmp_path / "x.json"))
    storage.check_destination(str(tmp_path), folder=True)
    storage.check_destination(f"memory://check-{uuid.uuid4().hex[:8]}/x.json")
    assert _tree(tmp_path) == []


def test_a_folder_without_write_permission_is_refused(tmp_path, monkeypatch):
    """As root, chmod does not deny; the permission answer is then simulated."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real(p, mode))
    with pytest.raises(DpdmError, match=rf"^cannot write {locked}/a/x.png: {locked} is not writable "
                                                r"\(permission denied\)$"):
        storage.check_destination(str(locked / "a" / "x.png"))
    assert list(locked.iterdir()) == []
    locked.chmod(0o700)


def test_a_read_only_file_system_is_refused(tmp_path, monkeypatch):
    real = os.statvfs

    class ReadOnly:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", lambda p: ReadOnly() if str(p) == str(tmp_path) else real(p))
    with pytest.raises(DpdmError, match=rf"{tmp_path} is on a read-only file system$"):
        storage.check_destination(str(tmp_path / "x.json"))
