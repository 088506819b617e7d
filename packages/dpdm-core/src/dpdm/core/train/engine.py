"""The training engine: one loop for teacher training and DPDM distillation, single process or DDP.

A *job* says what one training iteration is (``teacher.TeacherJob``: one EDM-loss step;
``distill.DistillJob``: Algorithm 1's ``fake_updates`` fake-score steps and one student step); the
``Trainer`` runs iterations, counts steps, guards against non-finite steps and runaway losses (``guards.py``),
stops at a step boundary with a snapshot on SIGTERM/SIGINT (``signals.py``), logs, saves and resumes.
Both jobs are built from ``Trainable``s, one per trained model, which own everything one optimizer
step needs: the raw module, its ``DistributedDataParallel`` wrapper, Adam, the fp16 loss scaler, the
learning-rate warm-up, gradient clipping and the counters.

**One optimizer step** (``Trainable.step``) takes ``accum`` micro-batches; the forward and backward of all
but the last run under ``no_sync()``, so DDP all-reduces the gradients once per step. The per-sample
losses are averaged over each micro-batch and divided by ``accum``, so ``accum`` micro-batches of ``B``
give the gradient of one batch of ``accum·B`` (and with ``W`` ranks, of ``W·accum·B``: DDP averages).
Then ``precision.guarded_step``: gradient norm, clipping, the finite check, step or skip, and
``zero_grad(set_to_none=True)``, so a model holds no gradients while the other one trains.

**Randomness.** Every draw of training (σ, noise) comes from the trainer's per-rank ``generator`` on the
training device, seeded from ``(seed, rank)``; dropout draws from torch's global generator, which the
trainer seeds from ``(seed, rank)`` too. Snapshots keep all of them per rank, with the data loader's
state, so that a resumed run continues bit for bit (on CPU) where the interrupted one stopped.

**Learning-rate warm-up** follows EDM (``training_loop.py``): lr · min(nimg / warmup_nimg, 1), where nimg
counts the images of the model's applied steps over all ranks.

Usage (``run.py`` drives both phases this way)::

    dist = init_dist("auto")
    job = TeacherJob(build_denoiser(spec), EDMLoss(), lr=1e-3, dist=dist, precision=Precision("bf16", dist.device))
    batches = DeviceBatches(Loader(train_set, batch // dist.world_size, seed=seed, rank=dist.rank,
                                   world_size=dist.world_size), dist.device)
    trainer = Trainer(job, batches, dist=dist, seed=seed, snapshots=Snapshots(url), save_every=1000,
                      specs={"model": spec, "ema": spec}, tracker=Tracker("metrics.jsonl", dist=dist))
    trainer.resume()        # the newest complete snapshot, if there is one
    trainer.fit(steps)      # runs steps - trainer.step more iterations
"""

from __future__ import annotations

import functools
import logging
import signal
import time
from typing import Iterator

import torch

from ..datasets import to_model
from .distributed import Dist
from ..errors import DpdmError
from ..progress import Progress
from ..defaults import LOG_EVERY, MAX_NONFINITE  # noqa: F401  (shared with the recipe schema)
from . import signals
from .guards import LossGuard
from .rng import rng_state, set_rng_state
from .trainable import Job, MicroLoss, Trainable, job_state, load_job_state, warmup_lr  # noqa: F401

log = logging.getLogger(__name__)

STATE_FORMAT = "dpdm-training-state/1"


class DeviceBatches:
    """Batches ``(x0, labels)`` of a resumable loader (``dpdm.data.loader.Loader``) mapped to model space
    (``datasets.to_model``) on ``device``; ``labels`` is None for unconditional models (``conditional=False``).
    ``state_dict``/``load_state_dict`` are the loader's."""

    def __init__(self, loader, device, conditional: bool = True):
        self.loader, self.device, self.conditional = loader, torch.device(device), conditional
        self._iter = iter(loader)

    def __iter__(self):
        return self

    def __next__(self):
        x, labels = next(self._iter)
        x = to_model(x).to(self.device, non_blocking=True)
        return x, (labels.to(self.device, non_blocking=True) if self.conditional else None)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._iter = iter(self.loader)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA's ``max_memory_allocated`` on GPUs, the process's max RSS on CPUs (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Trainer:
    """Runs a ``Job`` for a number of iterations, with non-finite guards, logs, snapshots and resume.

    Args:
        job: a ``TeacherJob`` or ``DistillJob``.
        batches: an iterator of ``(x0, labels)`` in model space on the training device, with
            ``state_dict()``/``load_state_dict()`` for exact resume (``DeviceBatches`` over a ``Loader``).
        dist: the process group (default: one process on the CPU).
        seed: seeds this rank's training generator and global generators from ``(seed, rank)``.
        max_nonfinite: consecutive skipped (NaN/Inf) optimizer steps of one model that stop the run; with
            fp16, overflows while the loss scaler backs off count too (each halves the scale).
        loss_guard: a ``guards.LossGuard`` that stops a run whose loss runs away (None: no such guard).
        snapshots: a ``snapshots.Snapshots`` to save into (None: no snapshots).
        save_every: save every this many iterations (and after the last one); 0: only after the last.
        specs: network specs by weight name, stored in the snapshot's weights metadata.
        config_hash: an identifier of the training configuration, checked on resume.
        tracker: a ``tracking.Tracker`` for JSONL/TensorBoard records (None: no records).
        log_every: record the stats every this many iterations (and every skipped step).
        progress: a ``Progress`` (shown by rank 0 only).
        hooks: callables ``hook(trainer, stats)`` run after every iteration (e.g. ``tracking.SampleGrid``).
    """

    def __init__(self, job: Job, batches: Iterator, *, dist: Dist | None = None, seed: int = 0,
                 max_nonfinite: int = MAX_NONFINITE, loss_guard: LossGuard | None = None, snapshots=None,
                 save_every: int = 0, specs: dict | None = None, config_hash: str = "", tracker=None,
                 log_every: int = LOG_EVERY, progress: Progress | None = None, hooks=()):
        if max_nonfinite < 1:
            raise DpdmError(f"max_nonfinite must be at least 1, got {max_nonfinite}")
        self.job, self.batches = job, batches
        self.dist = dist or Dist()
        self.generator = self.dist.seed_everything(seed)
        self.max_nonfinite = int(max_nonfinite)
        self.loss_guard = loss_guard
        self.snapshots, self.save_every = snapshots, int(save_every)
        self.specs, self.config_hash = dict(specs or {}), str(config_hash)
        self.tracker, self.log_every = tracker, max(int(log_every), 1)
        self.progress = progress if progress is not None and self.dist.is_main else Progress()
        self.hooks = list(hooks)
        self.step = 0  # iterations done
        self.last_saved: str | None = None  # URL of the newest snapshot this trainer saved or resumed from
        self.last_saved_step = -1  # its step

    def fit(self, steps: int) -> dict:
        """Run iterations until ``self.step == steps``; returns the last iteration's stats."""
        stats: dict = {}
        if self.step >= steps:
            return stats
        start = self.step
        title = f"{self.job.phase}" + (f" (from step {start})" if start else "")
        clock, images = time.perf_counter(), 0
        next_batch = functools.partial(next, self.batches)
        with signals.deferred(), self.progress.task(title, steps - start) as bar:
            while self.step < steps:
                before = {name: part.skipped for name, part in self.job.parts.items()}
                stats = self.job.iteration(next_batch, self.generator)
                self.step += 1
                images += int(stats.get("images", 0))
                skipped = {name: part.skipped - before[name] for name, part in self.job.parts.items()
                           if part.skipped > before[name]}
                if skipped:
                    self._nonfinite(skipped, stats)
                tripped, stop = self._watch(stats)
                if tripped is not None:
                    self._log(stats, float("nan"), skipped)  # a collective under DDP: every rank gets here
                    lrs = {name: part.lr for name, part in self.job.parts.items()}
                    raise self.loss_guard.error(tripped, self.job.phase, self.step, self.last_saved,
                                                self.last_saved_step, lrs)
                if self.step % self.log_every == 0 or self.step == steps or skipped:
                    now = time.perf_counter()
                    self._log(stats, images / max(now - clock, 1e-9), skipped)
                    clock, images = now, 0
                if self.snapshots is not None and (self.step == steps or
                                                   (self.save_every and self.step % self.save_every == 0)):
                    self.save()
                for hook in self.hooks:
                    hook(self, stats)
                bar.advance(1, **{k: v for k, v in stats.items() if k == "loss" or k.endswith("_loss")})
                if stop:
                    self._stop(stop, saved=self.snapshots is not None and self.last_saved_step == self.step)
        return stats

    def _watch(self, stats: dict) -> tuple[dict | None, int]:
        """The loss guard's verdict and the signal to stop for (0: none), the same on every rank: under DDP the
        losses are averaged over the ranks, and one rank's signal stops them all (one collective per iteration)."""
        watched = self.loss_guard.keys if self.loss_guard is not None else ()
        losses = {k: float(v) for k, v in stats.items() if k in watched}
        signum = signals.pending() or 0
        if self.dist.distributed:
            keys = sorted(losses)
            mean = self.dist.all_reduce_mean(torch.tensor([losses[k] for k in keys] + [float(signum > 0)],
                                                          dtype=torch.float64)).tolist()
            losses = dict(zip(keys, mean[:-1]))
            signum = (signum or int(signal.SIGTERM)) if mean[-1] > 0 else 0
        tripped = self.loss_guard.update(losses) if self.loss_guard is not None else None
        return tripped, signum

    def _stop(self, signum: int, saved: bool) -> None:
        """Stop for ``signum`` after this step: a snapshot of it (a collective), then ``signals.Interrupted``."""
        signals.acted_upon()
        if self.snapshots is not None and not saved:
            self.save()
        raise signals.Interrupted(signum, self.job.phase, self.step, self.last_saved)

    def _nonfinite(self, skipped: dict, stats: dict) -> None:
        names = ", ".join(f"{name} ({n}x)" for name, n in skipped.items())
        log.warning("%s step %d: NaN/Inf loss or gradient in %s; step skipped", self.job.phase, self.step, names)
        worst = max(self.job.parts.values(), key=lambda part: part.consecutive)
        if worst.consecutive >= self.max_nonfinite:
            self._log(stats, float("nan"), skipped)  # a collective under DDP: every rank gets here
            kept = (f"the last good checkpoint is {self.last_saved}" if self.last_saved
                    else "no checkpoint was saved before this")
            raise DpdmError(
                f"{self.job.phase} training stopped at step {self.step}: the {worst.name} model's loss or gradient "
                f"was NaN/Inf in {worst.consecutive} consecutive optimizer steps (max_nonfinite="
                f"{self.max_nonfinite}; {worst.skipped} skipped in all); {kept}. Try a lower learning rate "
                f"(now {worst.lr:g}) or a longer lr warm-up, gradient clipping (grad_clip, now {worst.grad_clip}), "
                f"or precision bf16/fp32 instead of {worst.precision.mode}; also check the data for NaN/Inf")

    def _log(self, stats: dict, images_per_s: float, skipped: dict) -> None:
        numeric = {k: float(v) for k, v in stats.items() if isinstance(v, (int, float)) and k not in ("applied",)}
        if self.dist.distributed:  # every rank gets here at the same steps
            keys = sorted(numeric)
            mean = self.dist.all_reduce_mean(torch.tensor([numeric[k] for k in keys], dtype=torch.float64))
            numeric = dict(zip(keys, mean.tolist()))
        numeric.pop("images", None)
        if self.tracker is None:
            return
        record = {"phase": self.job.phase, "step": self.step, "nimg": self.job.nimg, **numeric,
                  "images_per_s": images_per_s, "peak_mem_mb": peak_memory_mb(self.dist.device),
                  "skipped": {name: part.skipped for name, part in self.job.parts.items()}}
        if skipped:
            record["nonfinite"] = skipped
        self.tracker.log(record)

    # --- snapshots -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The state every rank shares (``state.pt``)."""
        return {"format": STATE_FORMAT, "phase": self.job.phase, "step": self.step, "config_hash": self.config_hash,
                "world_size": self.dist.world_size, "job": self.job.state_dict(),
                "loss_guard": self.loss_guard.state_dict() if self.loss_guard is not None else None}

    def rank_state(self) -> dict:
        """This rank's own state (``rank-NNNNN.pt``): random generators and the data loader."""
        loader = self.batches.state_dict() if hasattr(self.batches, "state_dict") else None
        return {"rank": self.dist.rank, "rng": rng_state(self.generator, self.dist.device), "loader": loader}

    def save(self) -> str:
        """Save a snapshot of this step (a collective: every rank calls it); returns its URL."""
        if self.snapshots is None:
            raise DpdmError("this Trainer has no snapshots to save into; pass snapshots=Snapshots(url)")
        self.last_saved = self.snapshots.save(self.step, modules=self.job.weights(), state=self.state_dict(),
                                              rank_state=self.rank_state(), specs=self.specs, dist=self.dist)
        self.last_saved_step = self.step
        return self.last_saved

    def resume(self, url: str | None = None) -> bool:
        """Continue from the snapshot at ``url`` (default: the newest complete one of ``snapshots``); False when
        there is none. Weights, optimizers, counters, this rank's generators and the loader are restored."""
        from .snapshots import load_snapshot

        if url is None:
            if self.snapshots is None:
                return False
            url = self.dist.broadcast_object(self.snapshots.latest() if self.dist.is_main else None)
            if url is None:
                return False
        snap = load_snapshot(url, rank=self.dist.rank, world_size=self.dist.world_size)
        state = snap.state
        if state.get("format") != STATE_FORMAT or state.get("phase") != self.job.phase:
            raise DpdmError(f"snapshot {url!r} holds {state.get('phase')!r} training ({state.get('format')}), "
                            f"not {self.job.phase!r}; point the run at the snapshots of this phase")
        if self.config_hash and state["config_hash"] and state["config_hash"] != self.config_hash:
            raise DpdmError(f"snapshot {url!r} was written with another training configuration (hash "
                            f"{state['config_hash']}, this run {self.config_hash}); resume with the recipe that "
                            "wrote it, or start a new run directory")
        snap.load_modules(self.job.weights())
        self.job.load_state_dict(state["job"])
        self.step = int(state["step"])
        if self.loss_guard is not None and state.get("loss_guard"):  # snapshots before the guard have none
            self.loss_guard.load_state_dict(state["loss_guard"])
        set_rng_state(snap.rank_state["rng"], self.generator, self.dist.device)
        loader = snap.rank_state["loader"]
        if loader is not None:
            if not hasattr(self.batches, "load_state_dict"):
                raise DpdmError(f"snapshot {url!r} holds a data loader state but the batches given to the Trainer "
                                "cannot load one; use DeviceBatches over a dpdm.data.loader.Loader")
            self.batches.load_state_dict(loader)
        self.last_saved, self.last_saved_step = url, self.step
        return True

