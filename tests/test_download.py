"""``dpdm.data.download``: official files fetched with md5 verification, served here by a local HTTP server.

No internet here, so the tests serve files from 127.0.0.1: the real MNIST copy in ``../shared/data/mnist``
(three of its files are the originals, whose md5 must verify; its train-images file was recompressed,
so its md5 must be refused) and small files they write, with handlers that cut a transfer short or 404.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from pathlib import Path

import fsspec
import pytest
from typer.testing import CliRunner

from dpdm.cli.main import app
from dpdm.core.errors import DpdmError
from dpdm.data import download as dl
from dpdm.data.mnist import read_idx

SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
WIDE = {"COLUMNS": "1000"}  # rich wraps at the terminal width; keep printed paths and errors on one line


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; ``short/NAME`` claims more bytes than it sends; counts GET requests."""

    requests: list[str] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        type(self).requests.append(self.path)
        if self.path.startswith("/short/"):
            body = b"x" * 100
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def serve():
    """``serve(folder) -> base URL`` of a threaded HTTP server on 127.0.0.1 for ``folder``."""
    servers = []

    def start(folder: Path) -> str:
        handler = type("Handler", (_Handler,), {"requests": []})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        start.handler = handler
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _files(folder: Path, contents: dict[str, bytes]) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    return {name: hashlib.md5(data).hexdigest() for name, data in contents.items()}


def _fake_dataset(monkeypatch, base: str, md5s: dict[str, str], name: str = "cifar10"):
    monkeypatch.setitem(dl.DATASETS, name, tuple(dl.Remote(base, f, m) for f, m in md5s.items()))


def test_official_sources_are_https_or_known_mirrors_with_md5():
    assert dl.DATASETS["cifar10"][0].url == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert dl.DATASETS["cifar10"][0].md5 == "c58f30108f718f92721af3b95e74349a"
    for name in ("mnist", "fashion-mnist"):
        names = {r.name for r in dl.DATASETS[name]}
        assert names == {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"}
        assert all(len(r.md5) == 32 for r in dl.DATASETS[name])
    assert dl.data_path("cifar10", "/d") == "/d/cifar-10-python.tar.gz"
    assert dl.data_path("mnist", "/d") == "/d"


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="needs ../shared/data/mnist")
def test_real_mnist_files_verify_and_a_recompressed_file_is_refused(serve, tmp_path, monkeypatch):
    base = serve(SHARED_MNIST)
    originals = tuple(r for r in dl.DATASETS["mnist"] if r.name != "train-images-idx3-ubyte.gz")
    monkeypatch.setitem(dl.DATASETS, "mnist", originals)
    written = dl.download("mnist", str(tmp_path / "mnist"), mirror=base)
    assert sorted(Path(p).name for p in written) == sorted(r.name for r in originals)
    images, labels = read_idx(str(tmp_path / "mnist"), "test")
    assert images.shape == (10000, 1, 28, 28) and labels.shape == (10000,)

    # The shared train-images file was recompressed: its md5 is not the published one.
    monkeypatch.setitem(dl.DATASETS, "mnist", (dl.Remote(base, "train-images-idx3-ubyte.gz",
                                                         "f68b3c2dcbeaaa9fbdd348bbdeb94873"),))
    with pytest.raises(DpdmError, match=r"train-images-idx3-ubyte\.gz' has md5 [0-9a-f]{32}, not the published "
                                        r"f68b3c2dcbeaaa9fbdd348bbdeb94873"):
        dl.download("mnist", str(tmp_path / "mnist"), mirror=base)
    left = sorted(p.name for p in (tmp_path / "mnist").iterdir())
    assert left == sorted(r.name for r in originals)  # no partial, no unverified file


def test_download_writes_verified_files_and_skips_them_next_time(serve, tmp_path, monkeypatch):
    md5s = _files(tmp_path / "srv", {"a.bin": b"alpha" * 1000, "b.bin": b"beta"})
    base = serve(tmp_path / "srv")
    _fake_dataset(monkeypatch, base, md5s)
    out = tmp_path / "out"
    written = dl.download("cifar10", str(out))
    assert [Path(p).name for p in written] == ["a.bin", "b.bin"]
    assert (out / "a.bin").read_bytes() == b"alpha" * 1000
    assert len(serve.handler.requests) == 2
    dl.download("cifar10", str(out))
    assert len(serve.handler.requests) == 2  # verified files are not fetched again
    (out / "b.bin").write_bytes(b"bent")  # a damaged local copy is fetched again
    dl.download("cifar10", str(out))
    assert (out / "b.bin").read_bytes() == b"beta" and len(serve.handler.requests) == 3


def test_checksum_mismatch_removes_the_partial_file(serve, tmp_path, monkeypatch):
    _files(tmp_path / "srv", {"a.bin": b"tampered"})
    _fake_dataset(monkeypatch, serve(tmp_path / "srv"), {"a.bin": "0" * 32})
    with pytest.raises(DpdmError, match=r"a\.bin' has md5 .* not the published 0{32}.*nothing was kept"):
        dl.download("cifar10", str(tmp_path / "out"))
    assert list((tmp_path / "out").iterdir()) == []


def test_transfer_cut_short_removes_the_partial_file(serve, tmp_path, monkeypatch):
    _fake_dataset(monkeypatch, serve(tmp_path) + "short/", {"a.bin": "0" * 32})
    with pytest.raises(DpdmError, match=r"short/a\.bin"):
        dl.download("cifar10", str(tmp_path / "out"))
    assert list((tmp_path / "out").iterdir()) == []


def test_http_errors_and_unreachable_hosts_name_the_url(serve, tmp_path, monkeypatch):
    base = serve(tmp_path)
    _fake_dataset(monkeypatch, base, {"missing.bin": "0" * 32})
    with pytest.raises(DpdmError, match=r"cannot download '.*missing\.bin': HTTP 404"):
        dl.download("cifar10", str(tmp_path / "out"))
    with pytest.raises(DpdmError, match=r"cannot download 'http://127\.0\.0\.1:9/missing\.bin'"):
        dl.download("cifar10", str(tmp_path / "out"), mirror="http://127.0.0.1:9/")
    assert list((tmp_path / "out").iterdir()) == []


def test_unknown_dataset_suggests_the_closest():
    with pytest.raises(DpdmError, match=r"unknown dataset 'mnsit'; downloadable: cifar10, mnist, fashion-mnist\. "
                                        r"Did you mean 'mnist'\?"):
        dl.download("mnsit", "/tmp/never")


def test_mirror_may_be_a_local_folder_and_dest_any_fsspec_url(tmp_path, monkeypatch):
    md5s = _files(tmp_path / "copy", {"a.bin": b"from a local mirror"})
    _fake_dataset(monkeypatch, "https://example.invalid/", md5s)
    written = dl.download("cifar10", "memory://dl-test/out", mirror=str(tmp_path / "copy"))
    assert written == ["memory://dl-test/out/a.bin"]
    with fsspec.open("memory://dl-test/out/a.bin", "rb") as f:
        assert f.read() == b"from a local mirror"
    assert fsspec.filesystem("memory").ls("/dl-test/out", detail=False) == ["/dl-test/out/a.bin"]


# --- dpdm data download (the command) ---------------------------------------------------------------------------------


def _cli(*args):
    return CliRunner().invoke(app, ["data", "download", *[str(a) for a in args]], env=WIDE)


@pytest.mark.parametrize("name, files, path_is_file", [
    ("cifar10", {"cifar-10-python.tar.gz": b"an archive" * 500}, True),
    ("mnist", {"train-images-idx3-ubyte.gz": b"images" * 300, "train-labels-idx1-ubyte.gz": b"labels"}, False),
])
def test_cli_prints_the_written_files_and_the_data_path(serve, tmp_path, monkeypatch, name, files, path_is_file):
    md5s = _files(tmp_path / "srv", files)
    _fake_dataset(monkeypatch, "https://example.invalid/", md5s, name)  # --mirror replaces the official base
    base = serve(tmp_path / "srv")
    dest = tmp_path / "data"
    result = _cli(name, dest, "--mirror", base)
    assert result.exit_code == 0, (result.output, result.exception)
    data_path = dest / next(iter(files)) if path_is_file else dest
    assert result.stdout.splitlines() == [*(str(dest / f) for f in files), f"data.path: {data_path}"]
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == files
    assert sorted(serve.handler.requests) == sorted(f"/{f}" for f in files)  # fetched from the mirror


def test_cli_md5_mismatch_is_one_error_line_naming_the_url_and_keeps_nothing(serve, tmp_path, monkeypatch):
    _files(tmp_path / "srv", {"cifar-10-python.tar.gz": b"tampered"})
    _fake_dataset(monkeypatch, "https://example.invalid/", {"cifar-10-python.tar.gz": "0" * 32})
    base = serve(tmp_path / "srv")
    result = _cli("cifar10", tmp_path / "out", "--mirror", base)
    assert result.exit_code == 1, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    got = hashlib.md5(b"tampered").hexdigest()
    assert errors == [f"error: '{base}cifar-10-python.tar.gz' has md5 {got}, not the published {'0' * 32}: the "
                      f"download is damaged or the file has changed; nothing was kept, try again or use another "
                      f"--mirror"]
    assert list((tmp_path / "out").iterdir()) == []  # no partial file, no unverified file
