"""Locating a dataset's ``data.path`` on any fsspec storage, with one clear error for storage
that cannot be reached (unknown protocol, missing backend or bucket, network failure).

Remote paths take their credentials and endpoint from the environment (``dpdm.core.io.storage``):
e.g. ``AWS_ENDPOINT_URL=http://127.0.0.1:9000`` for an S3-compatible server. ``simplecache::`` or
``filecache::`` in front of a URL keeps a local copy of the file (fsspec URL chaining).
"""

from __future__ import annotations

import fsspec

from dpdm.core.io import storage
from dpdm.core.errors import DpdmError


def locate(name: str, path: str):
    """``(fs, local_path, is_dir, exists)`` for ``path``; a ``DpdmError`` naming dataset ``name`` and
    the path if the storage cannot be asked or the path's bucket does not exist."""
    try:
        fs, local = fsspec.core.url_to_fs(path)
        is_dir = fs.isdir(local)
        exists = is_dir or fs.exists(local)
        bucket = None if exists else storage.missing_bucket(fs, local)
    except Exception as exc:  # unknown protocol, unreachable storage, missing fsspec backend, ...
        fix = "" if isinstance(exc, ImportError) else storage.hint(path)  # "Install s3fs to access S3" says it all
        raise DpdmError(f"{name}: cannot open {path!r}: {storage.first_line(exc)}{fix}") from None
    if bucket is not None:
        raise DpdmError(f"{name}: cannot open {path!r}: the bucket {bucket!r} does not exist (or these credentials "
                        f"cannot see it){storage.hint(path)}")
    return fs, local, is_dir, exists
