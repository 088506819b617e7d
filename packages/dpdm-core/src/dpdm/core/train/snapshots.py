"""Training snapshots: everything a run needs to resume, one folder per step, through fsspec.

``Snapshots(root)`` keeps ``root/ckpt-{step:09d}/`` folders holding

    weights.safetensors  every saved model's tensors, prefixed by its name (``student.``, ``ema.``, ``fake.``,
                         ``model.``), with the models' network specs as JSON in the metadata
    state.pt             optimizers, loss scalers, counters, the configuration hash: tensors and plain values
                         only, so ``torch.load(weights_only=True)`` reads it
    rank-{r:05d}.pt      per rank: its random generators and its data loader state (same rule)
    COMPLETE             JSON: step, world size, every file with its size; written last

A folder is a checkpoint only if its ``COMPLETE`` marker is valid, and the marker is written by rank 0 after
every rank has finished its files (a barrier). On local filesystems all files (marker included) are first
written into a hidden ``.ckpt-{step:09d}.partial`` folder, which is then renamed into place in one
``rename``; on object stores (``s3://``, ``gs://``, ...) and ``memory://`` the files go straight to their
place and the marker-last rule alone is what makes the checkpoint appear complete or not at all. Deleting
goes the other way: the marker first. With several nodes the root must be storage every node sees (a shared
filesystem or an object store).

Retention (``keep_last``, ``keep_every``): after each save the newest ``keep_last`` complete checkpoints are
kept, plus every one whose step is a multiple of ``keep_every``; older ones, incomplete folders (a crash
mid-save) and stale ``.partial`` folders are deleted.
"""

from __future__ import annotations

import io
import json
import re
import time
from dataclasses import dataclass

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from ..io import storage
from ..io.checkpoint import StorageError, safetensors_metadata
from ..io.storage import write_atomic
from .distributed import Dist
from ..errors import DpdmError

FORMAT = "dpdm-snapshot/1"
MARKER = "COMPLETE"
WEIGHTS = "weights.safetensors"
STATE = "state.pt"
NAME = re.compile(r"^ckpt-(\d{9})$")
PARTIAL = re.compile(r"^\.ckpt-(\d{9})\.partial$")


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def _agree(dist: Dist, failure: str | None) -> None:
    """Raise the storage failure every rank has heard of (after the collective that carried it)."""
    if failure:
        raise StorageError(failure)


def _to_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes, name: str):
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, a truncated zip, a refused global
        raise DpdmError(f"cannot read snapshot file {name!r}: {storage.first_line(exc)}") from None


def weights_bytes(modules: dict[str, nn.Module], specs: dict | None = None) -> bytes:
    """One safetensors file of all ``modules``' state dicts, keys prefixed ``{name}.``, with ``specs`` in the
    metadata."""
    tensors = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().to("cpu").contiguous()
    meta = {"format": FORMAT, "models": json.dumps(sorted(modules)), "specs": json.dumps(specs or {})}
    return st_save(tensors, metadata=meta)


@dataclass
class Snapshot:
    """A loaded snapshot: ``weights`` by model name (state dicts), their ``specs``, the shared ``state`` and this
    rank's ``rank_state``, and the ``marker``."""

    url: str
    step: int
    weights: dict[str, dict[str, torch.Tensor]]
    specs: dict
    state: dict
    rank_state: dict
    marker: dict

    def load_modules(self, modules: dict[str, nn.Module]) -> None:
        """Load every module of ``modules`` from its weights, exactly: the same models, all keys, no others."""
        missing, extra = sorted(set(modules) - set(self.weights)), sorted(set(self.weights) - set(modules))
        if missing or extra:
            problem = (f"no weights for {', '.join(missing)}" if missing
                       else f"weights for {', '.join(extra)}, which this job does not train")
            raise DpdmError(f"snapshot {self.url!r} has {problem} (it has {', '.join(sorted(self.weights))}); "
                            "was the EMA switched on or off since it was saved?")
        for name, module in modules.items():
            try:
                module.load_state_dict(self.weights[name])
            except RuntimeError as exc:
                raise DpdmError(f"snapshot {self.url!r}: the {name} weights do not fit this network "
                                f"({storage.first_line(exc)})") from None


class Snapshots:
    """Training snapshots under ``root`` (a local path or any fsspec URL), with retention.

    Args:
        root: the folder that holds the ``ckpt-*`` folders.
        keep_last: how many of the newest complete checkpoints to keep (at least 1).
        keep_every: also keep every checkpoint whose step is a multiple of this (0 or None: none).
    """

    def __init__(self, root: str, keep_last: int = 3, keep_every: int | None = None):
        if keep_last < 1:
            raise DpdmError(f"keep_last must be at least 1, got {keep_last}")
        if keep_every is not None and keep_every < 0:
            raise DpdmError(f"keep_every must be at least 1, or 0/None for none, got {keep_every}")
        self.root = str(root).rstrip("/")
        self.keep_last, self.keep_every = int(keep_last), int(keep_every or 0) or None
        try:
            fs, self._path = fsspec.core.url_to_fs(self.root)
        except Exception as exc:  # an unknown protocol, a backend that is not installed
            raise StorageError(f"cannot use snapshot folder {self.root!r}: {storage.first_line(exc)}") from None
        self.fs = storage.target(fs)
        self._rename = isinstance(self.fs, LocalFileSystem)  # local: write aside, then one rename

    def url(self, step: int) -> str:
        return f"{self.root}/ckpt-{step:09d}"

    def _p(self, name: str) -> str:
        return f"{self._path}/{name}"

    def _url_of(self, path_name: str) -> str:
        return f"{self.root}/{path_name}"

    # --- saving ----------------------------------------------------------------------------------------------

    def save(self, step: int, *, modules: dict[str, nn.Module], state: dict, rank_state: dict,
             specs: dict | None = None, dist: Dist | None = None) -> str:
        """Save one snapshot (a collective: every rank calls it with its own ``rank_state``); returns its URL.

        Rank 0 writes the weights, ``state`` and, after all ranks are done, the marker; then prunes.
        """
        dist = dist or Dist()
        name = f"ckpt-{step:09d}"
        target = f".{name}.partial" if self._rename else name
        # every phase ends in a collective that carries rank failures, so that no rank waits forever
        _agree(dist, dist.broadcast_object(self._attempt(self._clear, target) if dist.is_main else None))
        files: dict[str, int] = {}

        def write_files():
            if dist.is_main:
                files[WEIGHTS] = self._write(target, WEIGHTS, weights_bytes(modules, specs))
                files[STATE] = self._write(target, STATE, _to_bytes(state))
            files[rank_file(dist.rank)] = self._write(target, rank_file(dist.rank), _to_bytes(rank_state))

        gathered = dist.all_gather_object((files, self._attempt(write_files)))
        _agree(dist, next((failure for _, failure in gathered if failure), None))

        def finish():
            listed = {k: v for f, _ in gathered for k, v in f.items()}
            marker = {"format": FORMAT, "step": int(step), "world_size": dist.world_size,
                      "files": dict(sorted(listed.items())), "time": time.time()}
            self._write(target, MARKER, json.dumps(marker, indent=1).encode())
            if self._rename:
                self._publish(target, name)
            self.prune()

        _agree(dist, dist.broadcast_object(self._attempt(finish) if dist.is_main else None))
        return self.url(step)

    def _attempt(self, fn, *args) -> str | None:
        """Run ``fn``; the message of a storage failure, or None when it worked."""
        try:
            self._guard(fn, *args)
        except StorageError as exc:
            return str(exc)
        return None

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except storage.errors() as exc:
            raise StorageError(f"cannot write snapshot under {self.root!r}: {storage.first_line(exc)}"
                               f"{storage.hint(self.root)}") from None

    def _write(self, folder: str, name: str, data: bytes) -> int:
        write_atomic(self._url_of(f"{folder}/{name}"), data)
        return len(data)

    def _clear(self, folder: str) -> None:
        """Remove ``folder`` (marker first) so a save starts from nothing."""
        self._delete(folder)
        if not storage.is_object_store(self.fs):
            self.fs.makedirs(self._p(folder), exist_ok=True)

    def _publish(self, partial: str, name: str) -> None:
        """Rename the finished ``partial`` folder to ``name`` (replacing an older save of the same step)."""
        self._delete(name)
        self.fs.mv(self._p(partial), self._p(name), recursive=True)

    def _delete(self, folder: str) -> None:
        """Delete ``folder``: the marker first, so it never looks complete while half-deleted."""
        path = self._p(folder)
        if self.fs.exists(f"{path}/{MARKER}"):
            self.fs.rm(f"{path}/{MARKER}")
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    # --- listing and retention -------------------------------------------------------------------------------

    def _entries(self) -> list[str]:
        """Names of everything directly under ``root`` (empty if it does not exist)."""
        self.fs.invalidate_cache(self._path)
        try:
            listed = self.fs.ls(self._path, detail=False)
        except FileNotFoundError:
            return []
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in listed]

    def _marker(self, name: str) -> dict | None:
        """The valid marker of folder ``name``, or None (missing, unreadable, or files missing or truncated)."""
        path = self._p(name)
        self.fs.invalidate_cache(path)
        try:
            marker = json.loads(self.fs.cat_file(f"{path}/{MARKER}"))
            if marker.get("format") != FORMAT or marker.get("step") != int(NAME.match(name).group(1)):
                return None
            sizes = {p.rstrip("/").rsplit("/", 1)[-1]: info.get("size")
                     for p, info in ((i["name"], i) for i in self.fs.ls(path, detail=True))}
        except (FileNotFoundError, ValueError, KeyError, AttributeError, TypeError):
            return None
        files = marker.get("files")
        if not isinstance(files, dict) or any(sizes.get(f) != n for f, n in files.items()):
            return None
        return marker

    def complete(self) -> list[tuple[int, str]]:
        """``[(step, url), ...]`` of the complete checkpoints, oldest first."""
        found = []
        for name in self._entries():
            m = NAME.match(name)
            if m and self._marker(name) is not None:
                found.append((int(m.group(1)), self._url_of(name)))
        return sorted(found)

    def latest(self) -> str | None:
        """The URL of the newest complete checkpoint, or None."""
        done = self.complete()
        return done[-1][1] if done else None

    def prune(self) -> list[str]:
        """Apply the retention policy; returns the URLs deleted."""
        entries = self._entries()
        complete = sorted(int(NAME.match(n).group(1)) for n in entries if NAME.match(n) and self._marker(n))
        keep = set(complete[-self.keep_last:])
        if self.keep_every:
            keep |= {s for s in complete if s % self.keep_every == 0}
        doomed = [n for n in entries if (NAME.match(n) and int(NAME.match(n).group(1)) not in keep) or PARTIAL.match(n)]
        for name in doomed:
            self._guard(self._delete, name)
        return [self._url_of(n) for n in doomed]

    # --- loading ---------------------------------------------------------------------------------------------

    def load(self, url: str | None = None, rank: int = 0, world_size: int = 1) -> Snapshot:
        """``load_snapshot`` of ``url`` (default: the newest complete checkpoint)."""
        url = url or self.latest()
        if url is None:
            raise DpdmError(f"no complete snapshot under {self.root!r}")
        return load_snapshot(url, rank=rank, world_size=world_size)


def load_snapshot(url: str, rank: int = 0, world_size: int = 1) -> Snapshot:
    """Read the snapshot folder ``url`` for ``rank`` of ``world_size``: weights, shared state, that rank's state.

    A folder without a valid ``COMPLETE`` marker is refused, and so is a snapshot saved by another number of
    ranks (the data order and the per-rank random streams depend on it).
    """
    url = url.rstrip("/")
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except Exception as exc:
        raise DpdmError(f"cannot read snapshot {url!r}: {storage.first_line(exc)}") from None

    def read(name: str) -> bytes:
        try:
            return fs.cat_file(f"{path}/{name}")
        except FileNotFoundError:
            raise DpdmError(f"snapshot {url!r} has no {name}") from None
        except storage.errors() as exc:
            raise DpdmError(f"cannot read snapshot {url!r}: {storage.first_line(exc)}{storage.hint(url)}") from None

    try:
        marker = json.loads(fs.cat_file(f"{path}/{MARKER}"))
    except FileNotFoundError:
        raise DpdmError(f"{url!r} is not a complete snapshot: it has no {MARKER} marker (its save was interrupted, "
                        "or it is not a snapshot folder); resume from another one") from None
    except (ValueError, *storage.errors()) as exc:
        raise DpdmError(f"cannot read the {MARKER} marker of snapshot {url!r}: {storage.first_line(exc)}") from None
    if marker.get("format") != FORMAT:
        raise DpdmError(f"{url!r} is not a dpdm snapshot (format {marker.get('format')!r}, expected {FORMAT!r})")
    if marker["world_size"] != world_size:
        raise DpdmError(f"snapshot {url!r} was saved by {marker['world_size']} rank(s) but this run has {world_size}; "
                        f"resume with {marker['world_size']} rank(s) (torchrun --nproc-per-node/--nnodes), because "
                        "the data order and the per-rank random streams depend on the number of ranks")
    data = read(WEIGHTS)
    try:
        tensors = st_load(data)
        meta = safetensors_metadata(data)
        names, specs = json.loads(meta["models"]), json.loads(meta["specs"])
    except Exception as exc:
        raise DpdmError(f"snapshot {url!r}: {WEIGHTS} is not a valid weights file ({exc})") from None
    weights: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
    for key, value in tensors.items():
        name, _, rest = key.partition(".")
        weights[name][rest] = value
    state = _from_bytes(read(STATE), f"{url}/{STATE}")
    rank_state = _from_bytes(read(rank_file(rank)), f"{url}/{rank_file(rank)}")
    return Snapshot(url, int(marker["step"]), weights, specs, state, rank_state, marker)
