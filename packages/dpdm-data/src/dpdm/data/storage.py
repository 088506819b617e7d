"""Locating a dataset's ``data.path`` on any fsspec storage, with one clear error for storage
that cannot be reached (unknown protocol, missing backend, network failure)."""

from __future__ import annotations

import fsspec

from dpdm.core.errors import DpdmError


def locate(name: str, path: str):
    """``(fs, local_path, is_dir, exists)`` for ``path``; a ``DpdmError`` naming dataset ``name`` and
    the path if the storage cannot be asked."""
    try:
        fs, local = fsspec.core.url_to_fs(path)
        is_dir = fs.isdir(local)
        exists = is_dir or fs.exists(local)
    except Exception as exc:  # unknown protocol, unreachable storage, missing fsspec backend, ...
        raise DpdmError(f"{name}: cannot open {path!r}: {exc}") from None
    return fs, local, is_dir, exists
