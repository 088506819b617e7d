"""The local cache: downloaded checkpoints and converted EDM snapshots.

It lives in ``$DPDM_CACHE``, or ``~/.cache/dpdm``:

    downloads/<sha256(url)[:16]>-<file name>   http(s) files, fetched once (URLs are taken as immutable)
    edm-import/<key>.safetensors              official EDM snapshots converted to dpdm checkpoints

http(s) downloads use the standard library (fsspec's http filesystem needs aiohttp, which dpdm-core
does not depend on); every other URL (local paths, ``memory://``, ``s3://``...) is read through fsspec.
Files are written under a temporary name and renamed into place when complete (``storage.AtomicPath``).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import fsspec

from ..errors import DpdmError
from .storage import AtomicPath

TIMEOUT_S = 60.0  # per network operation, not for the whole download


def cache_dir() -> Path:
    """``$DPDM_CACHE`` or ``~/.cache/dpdm``."""
    return Path(os.environ.get("DPDM_CACHE") or Path.home() / ".cache" / "dpdm")


def is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def download_path(url: str) -> Path:
    """Where the cached copy of an http(s) ``url`` lives (whether or not it was downloaded yet)."""
    name = os.path.basename(urllib.parse.urlparse(url).path) or "download"
    return cache_dir() / "downloads" / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"


def needs_download(url: str) -> bool:
    """Whether reading ``url`` would download it now (an http(s) URL not in the cache yet)."""
    return is_http(url) and not download_path(url).is_file()


def local_copy(url: str) -> str:
    """``url`` itself, or for http(s) URLs the path of a cached copy (downloaded on first use)."""
    if not is_http(url):
        return url
    path = download_path(url)
    if path.is_file():
        return str(path)
    network_hint = ("check the URL and the network, or download the file yourself and give its local path "
                    f"(downloads are cached in {cache_dir()})")
    try:
        with AtomicPath(str(path)) as tmp:
            response, expected = open_url(url, http_hint="check the URL", network_hint=network_hint)
            with response, open(tmp, "wb") as f:
                shutil.copyfileobj(response, f, 1 << 20)
                got = f.tell()
            if expected is not None and got != expected:
                raise DpdmError(f"download of {url!r} was cut short ({got} of {expected} bytes); try again")
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:  # while reading the response
        raise DpdmError(f"cannot download {url!r}: {getattr(exc, 'reason', None) or exc}; {network_hint}") from None
    return str(path)


def open_url(url: str, *, http_hint: str, network_hint: str):
    """``(response, Content-Length or None)`` of an http(s) ``url`` (standard library, ``TIMEOUT_S`` per network
    operation); an HTTP error or an unreachable host is one ``DpdmError`` naming the URL and the hint."""
    try:
        response = urllib.request.urlopen(url, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        raise DpdmError(f"cannot download {url!r}: HTTP {exc.code} {exc.reason}; {http_hint}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        raise DpdmError(f"cannot download {url!r}: {getattr(exc, 'reason', None) or exc}; {network_hint}") from None
    size = response.headers.get("Content-Length")
    return response, int(size) if size is not None else None


def import_cache_path(url: str, local: str, version: str) -> Path:
    """Where the conversion of the file at ``local`` (named ``url`` by the user) is cached.

    The key hashes the canonical URL, the file's size and modification time, and ``version`` (the
    converter's), so a changed file or converter is imported anew.
    """
    fs, path = fsspec.core.url_to_fs(local)
    info = fs.info(path)
    stamp = info.get("mtime") or info.get("LastModified") or info.get("created") or info.get("ETag")
    canonical = url if is_http(url) else fs.unstrip_protocol(path)
    key = json.dumps([canonical, info.get("size"), str(stamp), version])
    return cache_dir() / "edm-import" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"
