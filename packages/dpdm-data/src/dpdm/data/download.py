"""Downloading the official dataset files, checked against their published md5 sums (``dpdm data download``).

``download(name, dest)`` fetches every file of dataset ``name`` (``DATASETS``: ``cifar10``, ``mnist``,
``fashion-mnist``) into the folder ``dest`` (a local path or any fsspec URL) and returns the written paths;
``data.path`` of a recipe is then the archive (CIFAR-10) or the folder (MNIST, Fashion-MNIST).

For each file:

- a file already in ``dest`` with the right md5 is kept (downloading twice costs nothing);
- otherwise it is streamed to a temporary file (``dpdm.core.io.storage.AtomicPath``: a hidden sibling on a local
  disk, a local file uploaded once verified elsewhere) while its md5 is computed; a cut-short transfer (fewer
  bytes than ``Content-Length``), a network error or an md5 that differs from the published one removes the
  partial file and raises one ``DpdmError`` naming the URL (and both sums), so nothing that looks complete is
  ever left behind; only a verified file takes its final name.

``mirror`` replaces each file's base URL (the part before its file name) for users behind a mirror or
with a local copy: an http(s) URL, a local folder or any fsspec URL. http(s) goes through the standard
library (fsspec's http filesystem needs aiohttp); everything else through fsspec.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import posixpath
import urllib.error
from dataclasses import dataclass

import fsspec

from dpdm.core.io.cache import open_url
from dpdm.core.io.storage import AtomicPath
from dpdm.core.errors import DpdmError, did_you_mean

from . import cifar10, mnist

CHUNK = 1 << 20


@dataclass(frozen=True)
class Remote:
    """One official file: where it lives and its published md5."""

    base: str  # URL of the folder holding it, ending in "/"
    name: str  # file name
    md5: str

    @property
    def url(self) -> str:
        return self.base + self.name


FASHION_MNIST_MD5 = {  # the sums published with Fashion-MNIST (and checked by common loaders)
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}

DATASETS: dict[str, tuple[Remote, ...]] = {
    "cifar10": (Remote(cifar10.URL.rsplit("/", 1)[0] + "/", cifar10.URL.rsplit("/", 1)[1], cifar10.MD5),),
    "mnist": tuple(Remote(mnist.MNIST_URL, f, md5) for f, md5 in mnist.MNIST_MD5.items()),
    "fashion-mnist": tuple(Remote(mnist.FASHION_MNIST_URL, f, md5) for f, md5 in FASHION_MNIST_MD5.items()),
}


def data_path(name: str, dest: str) -> str:
    """What a recipe's ``data.path`` should be after ``download(name, dest)``."""
    return _join(dest, DATASETS[name][0].name) if name == "cifar10" else dest


def download(name: str, dest: str, *, mirror: str | None = None, progress=None) -> list[str]:
    """Fetch dataset ``name`` into the folder ``dest`` and verify every file's md5; see the module docstring.

    ``progress`` is a ``dpdm.core.progress.Progress`` (a byte-count bar per file) or None.
    """
    if name not in DATASETS:
        raise DpdmError(f"cannot download unknown dataset {name!r}; downloadable: {', '.join(DATASETS)}."
                        f"{did_you_mean(name, DATASETS)}")
    try:
        fs, root = fsspec.core.url_to_fs(dest)
        fs.makedirs(root, exist_ok=True)
    except Exception as exc:  # unknown protocol, unreachable storage, permissions, ...
        raise DpdmError(f"cannot write to {dest!r}: {exc}; give a writable folder") from None
    written = []
    for remote in DATASETS[name]:
        url = _join(mirror, remote.name) if mirror else remote.url
        target = _join(root, remote.name)
        shown = _join(dest, remote.name)  # as the user spelled the folder
        if fs.exists(target) and _md5_of(fs, target) == remote.md5:
            written.append(shown)
            continue
        _fetch(url, shown, remote.md5, progress)
        written.append(shown)
    return written


def _join(base: str, name: str) -> str:
    return posixpath.join(base, name) if not base.endswith("/") else base + name


def _md5_of(fs, path: str) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with fs.open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _open_source(url: str):
    """``(file object, size or None)`` for ``url``; errors name it."""
    hints = dict(http_hint="check the URL or --mirror",
                 network_hint="check the network or --mirror, or download the file yourself")
    if url.startswith(("http://", "https://")):
        return open_url(url, **hints)
    try:
        fs, path = fsspec.core.url_to_fs(url)
        return fs.open(path, "rb"), fs.size(path)
    except (OSError, ValueError) as exc:
        raise DpdmError(f"cannot download {url!r}: {exc}; {hints['network_hint']}") from None


def _fetch(url: str, dest: str, md5: str, progress) -> None:
    """Stream ``url`` into ``dest`` (a path or URL) through a temporary file (``storage.AtomicPath``), checking its
    length and md5 before it takes the final name."""
    source, size = _open_source(url)
    digest, got = hashlib.md5(usedforsecurity=False), 0
    bar = progress.task(f"download {posixpath.basename(dest)}", size or 0) if progress else contextlib.nullcontext()
    try:
        with source, AtomicPath(dest) as tmp:
            with open(tmp, "wb") as out, bar as task:
                while chunk := source.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    got += len(chunk)
                    if task is not None:
                        task.advance(len(chunk))
            if size is not None and got != size:
                raise DpdmError(f"download of {url!r} was cut short ({got} of {size} bytes); nothing was kept, try "
                                "again")
            if digest.hexdigest() != md5:
                raise DpdmError(f"{url!r} has md5 {digest.hexdigest()}, not the published {md5}: the download is "
                                "damaged or the file has changed; nothing was kept, try again or use another --mirror")
    except (OSError, urllib.error.URLError, http.client.HTTPException) as exc:
        raise DpdmError(f"cannot download {url!r} to {dest!r}: {getattr(exc, 'reason', None) or exc}; check the "
                        "network and the folder") from None
