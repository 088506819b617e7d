"""Resumable data loading: an endless stream of batches that resumes at the exact next batch.

``Loader(dataset, batch_size)`` iterates a map-style dataset (the contract of ``dpdm.core.datasets``:
items ``(x, label)``) as an endless stream of batches ``(x, labels)``: ``x`` ``(B, *dataset.shape)`` in
the dataset's dtype, ``labels`` int64 ``(B,)``. Underneath are torchdata's ``StatefulDataLoader`` and
torch's ``DistributedSampler`` (also for a single process: one code path). When an epoch ends the loader
moves on by itself: ``epoch += 1``, ``sampler.set_epoch(epoch)``, and the next epoch begins.

**State.** ``state_dict()`` holds plain Python values only, so it round-trips through ``torch.save`` and
``torch.load(weights_only=True)``:

- ``epoch``, ``step`` (batches yielded since the first epoch) and ``epoch_step`` (batches yielded in this
  epoch);
- the settings that fix the order of the batches, checked on restore: ``batch_size`` (per rank),
  ``world_size``, ``rank``, ``seed``, ``dataset_len``, ``shuffle``, ``drop_last``, and ``num_workers``;
- ``loader``: the ``StatefulDataLoader``'s own state, ``{}`` at the start of an epoch (before the first batch,
  or right after the last batch of an epoch, because the loader steps into the next epoch as soon as
  the last batch is out). Mid-epoch it records how many indices the batch sampler has drawn; on
  restore torchdata replays the sampler's iterator past them (``DistributedSampler`` is not stateful,
  so torchdata's batch sampler skips that many indices of a fresh iterator) and, with workers, the
  worker base seed and which worker is next.

**Why the epoch is set before restoring.** The sampler's order is a permutation drawn from
``sampler seed + epoch`` when its iterator starts, and the restore replays that iterator. Restoring
under the wrong epoch would skip the right number of indices of the wrong permutation: batches of the
right size and no error, but not the batches the interrupted run would have seen. ``load_state_dict``
therefore sets the epoch first, then hands the loader state to the ``StatefulDataLoader``.

**Seeds.** ``seed`` fixes everything; nothing reads torch's global generator.

- The permutation of epoch ``e`` is drawn by ``DistributedSampler`` from ``s + e``, where ``s`` is hashed
  from ``seed`` alone, so every rank draws the same permutation and each takes its own slice of it. The
  hash keeps runs with neighbouring seeds apart (the sampler's plain ``seed + epoch`` would give seed 1
  the orders of seed 0 shifted by one epoch).
- Workers: the ``StatefulDataLoader``'s generator is reseeded at the start of each epoch from
  ``(seed, rank, epoch)``; it draws the workers' base seed, from which torch seeds each worker (torch,
  numpy and ``random`` at ``base + worker id``). Worker seeds thus differ between ranks and epochs but
  are the same in every run, and after a resume. The ``worker_init_fn`` then reseeds numpy and
  ``random`` in each worker from ``(seed, rank, worker id, torch's worker seed)``.

Resume is exact for the batches. Randomness drawn inside workers (random augmentations; dpdm's datasets
draw none) is reproduced too when the state was taken at an epoch start with non-persistent workers, as
every epoch then starts fresh workers from its own seeds; mid-epoch, or with ``persistent_workers`` (whose
workers carry their streams from epoch to epoch), the resumed workers restart from the epoch's seeds.

**DDP.** Each rank builds ``Loader(dataset, batch_size, seed=seed, rank=r, world_size=W)``, with the same
``seed``; within an epoch the ranks' batches are disjoint and together cover the dataset (with
``drop_last=True`` up to the last ``len % W`` items of the permutation and the last incomplete batch of
each rank; with ``drop_last=False`` the sampler pads by repeating items so all ranks have as many batches).
Each rank's ``state_dict()`` goes into the checkpoint (e.g. a list indexed by rank), and on resume rank
``r`` loads its own entry; a state saved by another rank, or under another world size, is refused.
"""

from __future__ import annotations

import copy
import functools
import random
import warnings

import numpy as np
import torch
from torch.utils.data import default_collate
from torch.utils.data.distributed import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from dpdm.core.datasets import Batch
from dpdm.core.errors import DpdmError

STATE_VERSION = 1
_SAMPLER_STREAM = 1  # seed-derivation tags, so the sampler's and the workers' seeds never coincide
_WORKER_STREAM = 2
CHECKED = ("batch_size", "world_size", "rank", "seed", "dataset_len", "shuffle", "drop_last")
_FIXES = {
    "batch_size": "build the Loader with the per-rank batch_size of the saved run",
    "world_size": "resume with as many ranks as the saved run",
    "rank": "each rank must load the state that the same rank saved",
    "seed": "build the Loader with the saved run's seed",
    "dataset_len": "resume on the same dataset (same data path, max_size and xflip)",
    "shuffle": "build the Loader with the saved run's shuffle",
    "drop_last": "build the Loader with the saved run's drop_last",
    "num_workers": "a state saved mid-epoch resumes only with the same num_workers; build the Loader with it",
}


def _derive(*words: int) -> int:
    """A seed in [0, 2**63) hashed from non-negative integers (numpy's ``SeedSequence``)."""
    return int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0]) >> 1


def _seed_worker(worker_id: int, *, seed: int, rank: int) -> None:
    """``worker_init_fn``: seed numpy and ``random`` from (seed, rank, worker id, torch's worker seed).

    Torch's worker seed is ``base + worker_id`` with ``base`` drawn per epoch from the loader's generator,
    so the streams also change from epoch to epoch.
    """
    sequence = np.random.SeedSequence([seed, rank, worker_id, torch.initial_seed()])
    np.random.seed(sequence.generate_state(4))
    random.seed(int(sequence.generate_state(1, np.uint64)[0]))


def _option_problems(dataset, batch_size, seed, rank, world_size, num_workers, prefetch_factor,
                     persistent_workers, timeout) -> list[str]:
    """Every invalid option, each with its fix (an empty list when all are valid)."""
    problems = []
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        problems.append("dataset must be map-style (with __len__ and __getitem__), as dpdm datasets are")
    if not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"batch_size must be an integer >= 1 (per rank), got {batch_size!r}")
    if not isinstance(seed, int) or seed < 0:
        problems.append(f"seed must be an integer >= 0, got {seed!r}")
    if not isinstance(world_size, int) or world_size < 1:
        problems.append(f"world_size must be an integer >= 1, got {world_size!r}")
    elif not isinstance(rank, int) or not 0 <= rank < world_size:
        problems.append(f"rank must be an integer in [0, world_size={world_size}), got {rank!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        problems.append(f"num_workers must be an integer >= 0, got {num_workers!r}")
    elif num_workers == 0:
        unused = [f"{name}={value!r}" for name, value in
                  (("prefetch_factor", prefetch_factor), ("persistent_workers", persistent_workers),
                   ("timeout", timeout)) if value not in (None, False, 0)]
        if unused:
            problems.append(f"num_workers=0 does not allow {', '.join(unused)} (options of worker processes); "
                            f"set num_workers >= 1 or leave them at their defaults")
    if prefetch_factor is not None and (not isinstance(prefetch_factor, int) or prefetch_factor < 1):
        problems.append(f"prefetch_factor must be an integer >= 1 or None, got {prefetch_factor!r}")
    if timeout < 0:
        problems.append(f"timeout must be >= 0 seconds, got {timeout!r}")
    return problems


def collate(items):
    """A batch the dataset collated itself (``datasets.Batch``, from ``__getitems__``) as it is; else torch's
    ``default_collate`` of the items."""
    if isinstance(items, Batch):
        return tuple(items)
    return default_collate(items)


class Loader:
    """An endless stream of batches ``(x, labels)`` over a map-style dataset, with exact resume.

    ``batch_size`` is per rank. ``epoch``, ``step`` (batches yielded in all) and ``epoch_step`` (batches
    yielded in the current epoch) count progress; ``batches_per_epoch`` is this rank's number of batches
    in an epoch. See the module docstring for the state, the seeds and use under DDP.
    """

    def __init__(self, dataset, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, shuffle: bool = True, drop_last: bool = True, pin_memory: bool = False,
                 prefetch_factor: int | None = None, persistent_workers: bool = False, timeout: float = 0):
        problems = _option_problems(dataset, batch_size, seed, rank, world_size, num_workers, prefetch_factor,
                                    persistent_workers, timeout)
        if problems:
            raise DpdmError("invalid Loader options: " + "; ".join(problems))
        self.dataset = dataset
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers, self.shuffle, self.drop_last = num_workers, bool(shuffle), bool(drop_last)
        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=self.shuffle,
                                          seed=_derive(seed, _SAMPLER_STREAM), drop_last=self.drop_last)
        self._generator = torch.Generator()  # draws the worker base seed; reseeded at each epoch start
        with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, which newer torch deprecates
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
            self._loader = StatefulDataLoader(
                dataset, batch_size=batch_size, sampler=self.sampler, drop_last=self.drop_last, collate_fn=collate,
                num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
                persistent_workers=persistent_workers, timeout=timeout, generator=self._generator,
                worker_init_fn=functools.partial(_seed_worker, seed=seed, rank=rank) if num_workers else None)
        self.batches_per_epoch = len(self._loader)
        if self.batches_per_epoch < 1:
            raise DpdmError(self._too_short())
        self.epoch = self.step = self.epoch_step = 0
        self._iterator = None  # the StatefulDataLoader's iterator over the current epoch, once started
        self._pending = {}  # StatefulDataLoader state handed over by load_state_dict, until iteration starts

    def _too_short(self) -> str:
        n, total = len(self.dataset), self.world_size * self.batch_size
        if self.drop_last:
            return (f"the dataset has {n} items, fewer than one global batch ({self.world_size} rank(s) x "
                    f"batch_size {self.batch_size} = {total}), and drop_last=True leaves no batch in an epoch; "
                    f"use a smaller batch_size, fewer ranks or more data, or drop_last=False")
        return "the dataset is empty; a Loader needs at least one item"

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._iterator is None:
            self._iterator = self._start_epoch()
        x, labels = next(self._iterator)
        self.step += 1
        self.epoch_step += 1
        if self.epoch_step == self.batches_per_epoch:  # step into the next epoch now: its state is {}
            self._iterator = None
            self.epoch += 1
            self.epoch_step = 0
        return x, labels

    def _start_epoch(self):
        """The iterator over epoch ``self.epoch``, resumed from a loaded state if there is one."""
        self.sampler.set_epoch(self.epoch)
        self._generator.manual_seed(_derive(self.seed, _WORKER_STREAM, self.rank, self.epoch))
        self._pending = {}
        return iter(self._loader)

    def state_dict(self) -> dict:
        """Everything needed to resume at the next batch (see the module docstring)."""
        loader = self._loader.state_dict() if self._iterator is not None else self._pending
        return {"version": STATE_VERSION, "epoch": self.epoch, "step": self.step, "epoch_step": self.epoch_step,
                "batch_size": self.batch_size, "world_size": self.world_size, "rank": self.rank,
                "seed": self.seed, "dataset_len": len(self.dataset), "shuffle": self.shuffle,
                "drop_last": self.drop_last, "num_workers": self.num_workers, "loader": copy.deepcopy(loader)}

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state_dict()``'s output: the next batch is the one that followed it.

        The settings in ``CHECKED`` (and ``num_workers`` for a state saved mid-epoch) must match this
        Loader's, else a ``DpdmError`` names each mismatch and its fix. The sampler's epoch is set before
        the ``StatefulDataLoader`` state is restored, so the restore replays the right permutation.
        """
        self._check_state(state)
        self.epoch, self.step, self.epoch_step = state["epoch"], state["step"], state["epoch_step"]
        self._iterator = None
        self.sampler.set_epoch(self.epoch)
        self._pending = copy.deepcopy(state["loader"])
        self._loader.load_state_dict(self._pending)

    def _check_state(self, state) -> None:
        """Raise a ``DpdmError`` unless ``state`` is a Loader state that this Loader can resume."""
        keys = ("version", "epoch", "step", "epoch_step", "num_workers", "loader") + CHECKED
        if not isinstance(state, dict) or any(key not in state for key in keys):
            raise DpdmError("not a Loader state: expected the dict that Loader.state_dict() returns, with keys "
                            + ", ".join(keys))
        if state["version"] != STATE_VERSION:
            raise DpdmError(f"Loader state version {state['version']!r} is not supported (this dpdm writes and "
                            f"reads version {STATE_VERSION})")
        now = {field: getattr(self, field) for field in CHECKED + ("num_workers",) if field != "dataset_len"}
        now["dataset_len"] = len(self.dataset)
        fields = CHECKED + (("num_workers",) if state["loader"] else ())  # an epoch start resumes anywhere
        wrong = [f"{field} is {state[field]!r} in the saved state but {now[field]!r} here ({_FIXES[field]})"
                 for field in fields if state[field] != now[field]]
        if wrong:
            raise DpdmError("cannot resume the data loader: " + "; ".join(wrong))
