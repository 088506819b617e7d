"""The training engine: one loop for teacher training and DPDM distillation, single process or DDP.

A *job* says what one training iteration is (``teacher.TeacherJob``: one EDM-loss step;
``distill.DistillJob``: Algorithm 1's ``fake_updates`` fake-score steps and one student step); the
``Trainer`` runs iterations, counts steps, guards against non-finite steps, logs, saves and resumes.
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

import contextlib
import functools
import random
import time
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
from torch import nn

from ..datasets import to_model
from .distributed import Dist
from ..errors import DpdmError
from .precision import Precision, backward, guarded_step
from ..progress import Progress

STATE_FORMAT = "dpdm-training-state/1"
# Defaults of Trainer that the recipe schema (config/recipe.py, EngineConfig) takes from here
MAX_NONFINITE = 10  # consecutive skipped (NaN/Inf) optimizer steps of one model that stop the run
LOG_EVERY = 50  # iterations between records
MicroLoss = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def warmup_lr(lr: float, nimg: int, warmup_nimg: float) -> float:
    """EDM's linear learning-rate warm-up in images: lr · min(nimg / warmup_nimg, 1) (none when 0)."""
    return lr * min(nimg / warmup_nimg, 1.0) if warmup_nimg > 0 else lr


class Trainable:
    """One trained model and everything one optimizer step of it needs.

    Args:
        name: the model's name in stats, logs and snapshots (``model``, ``student``, ``fake``).
        module: the raw model; moved to ``dist.device``, set to train mode with gradients on.
        lr, betas, eps: Adam (EDM: betas (0.9, 0.999), eps 1e-8).
        warmup_nimg: linear learning-rate warm-up length in images (0: none).
        grad_clip: clip the global gradient norm to this value (None: no clipping).
        precision: forward precision and (fp16) loss scaling.
        dist: the process group; with more than one rank the module is wrapped in its own
            ``DistributedDataParallel`` (``wrapped``); ``module`` stays the raw model, to be called
            without gradients by the other model's steps.
        find_unused_parameters: DDP's option, for networks whose forward skips parameters.
    """

    def __init__(self, name: str, module: nn.Module, *, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 warmup_nimg: float = 0.0, grad_clip: float | None = None, precision: Precision | None = None,
                 dist: Dist | None = None, find_unused_parameters: bool = False):
        self.name = name
        self.dist = dist or Dist()
        self.precision = precision or Precision("fp32", self.dist.device)
        if self.precision.device.type != self.dist.device.type:
            raise DpdmError(f"{name}: the precision is set up for {self.precision.device} but the model trains on "
                            f"{self.dist.device}; build Precision(mode, dist.device)")
        self.module = module.to(self.dist.device).train().requires_grad_(True)
        self.wrapped = self.module
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(self.module, device_ids=ids,
                                                   find_unused_parameters=find_unused_parameters)
        self.lr = float(lr)  # base learning rate
        self.warmup_nimg = float(warmup_nimg)
        self.grad_clip = grad_clip
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=self.lr, betas=tuple(betas), eps=eps)
        self.scaler = self.precision.grad_scaler(self.module)  # fp16, or a network with fp16 parts
        self.nimg = 0  # images of the applied steps, all ranks
        self.steps = 0  # applied optimizer steps
        self.skipped = 0  # steps skipped for a non-finite loss or gradient
        self.consecutive = 0  # skipped steps since the last applied one

    def step(self, micro_loss: MicroLoss, next_batch: Callable[[], tuple], accum: int = 1) -> dict:
        """One optimizer step over ``accum`` micro-batches from ``next_batch()``.

        ``micro_loss(model, x0, labels)`` returns per-sample losses ``(B,)``; ``model`` is the module to
        differentiate (the DDP wrapper under DDP). Returns ``loss`` (mean over the micro-batches, this
        rank), ``grad_norm`` (before clipping), ``lr``, ``images`` (all ranks) and ``applied`` (False: skipped).
        """
        lr = warmup_lr(self.lr, self.nimg, self.warmup_nimg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        losses, images = [], 0
        for i in range(accum):
            x0, labels = next_batch()
            sync = i == accum - 1 or self.wrapped is self.module
            with contextlib.nullcontext() if sync else self.wrapped.no_sync():
                with self.precision.autocast():
                    loss = micro_loss(self.wrapped, x0, labels).mean()
                backward(loss / accum, self.scaler)
            losses.append(loss.detach().float())
            images += x0.shape[0]
            del loss  # the graph is gone after backward; drop the last reference too
        loss = torch.stack(losses).mean()
        applied, norm = guarded_step(self.optimizer, list(self.module.parameters()), scaler=self.scaler,
                                     grad_clip=self.grad_clip, loss_finite=bool(torch.isfinite(loss)),
                                     dist=self.dist)
        images *= self.dist.world_size
        if applied:
            self.nimg += images
            self.steps += 1
            self.consecutive = 0
        else:
            self.skipped += 1
            self.consecutive += 1
        return {"loss": float(loss), "grad_norm": norm, "lr": lr, "images": images, "applied": applied}

    def state_dict(self) -> dict:
        """Optimizer, loss scaler and counters (the weights go to the snapshot's safetensors file)."""
        return {"optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "nimg": self.nimg, "steps": self.steps, "skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.nimg, self.steps = int(state["nimg"]), int(state["steps"])
        self.skipped, self.consecutive = int(state["skipped"]), int(state["consecutive"])


class Job(Protocol):
    """What the ``Trainer`` drives: one training iteration at a time (``teacher.TeacherJob``,
    ``distill.DistillJob``)."""

    phase: str  # "teacher" or "student": names the snapshots' phase and the log records
    parts: dict[str, Trainable]  # the trained models, by name

    @property
    def model(self) -> nn.Module:
        """The model to evaluate (the EMA if kept)."""

    @property
    def nimg(self) -> int:
        """Images shown to the main model (the one the EMA follows)."""

    def iteration(self, next_batch: Callable[[], tuple], generator: torch.Generator | None) -> dict:
        """One training iteration; returns float stats."""

    def weights(self) -> dict[str, nn.Module]:
        """Every module a snapshot keeps, by name (the trained ones, their EMA)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def job_state(job: Job) -> dict:
    """The non-weight state of a job's trained models: optimizers, loss scalers, counters."""
    return {"parts": {name: part.state_dict() for name, part in job.parts.items()}}


def load_job_state(job: Job, state: dict) -> None:
    missing = sorted(set(job.parts) - set(state["parts"]))
    if missing:
        raise DpdmError(f"the snapshot has no optimizer state for {', '.join(missing)}; was it written by "
                        "another kind of job?")
    for name, part in job.parts.items():
        part.load_state_dict(state["parts"][name])


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


def rng_state(generator: torch.Generator | None, device: torch.device) -> dict:
    """This rank's random state: the training generator, torch's global CPU generator (and that of ``device``
    if it is a GPU), numpy and ``random``, as tensors and plain values (``torch.load(weights_only=True)``
    reads them)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"generator": generator.get_state() if generator is not None else None,
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def set_rng_state(state: dict, generator: torch.Generator | None, device: torch.device) -> None:
    """Restore what ``rng_state`` saved."""
    if generator is not None and state["generator"] is not None:
        generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


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
                 max_nonfinite: int = MAX_NONFINITE, snapshots=None, save_every: int = 0, specs: dict | None = None,
                 config_hash: str = "", tracker=None, log_every: int = LOG_EVERY, progress: Progress | None = None,
                 hooks=()):
        if max_nonfinite < 1:
            raise DpdmError(f"max_nonfinite must be at least 1, got {max_nonfinite}")
        self.job, self.batches = job, batches
        self.dist = dist or Dist()
        self.generator = self.dist.seed_everything(seed)
        self.max_nonfinite = int(max_nonfinite)
        self.snapshots, self.save_every = snapshots, int(save_every)
        self.specs, self.config_hash = dict(specs or {}), str(config_hash)
        self.tracker, self.log_every = tracker, max(int(log_every), 1)
        self.progress = progress if progress is not None and self.dist.is_main else Progress()
        self.hooks = list(hooks)
        self.step = 0  # iterations done
        self.last_saved: str | None = None  # URL of the newest snapshot this trainer saved or resumed from

    def fit(self, steps: int) -> dict:
        """Run iterations until ``self.step == steps``; returns the last iteration's stats."""
        stats: dict = {}
        if self.step >= steps:
            return stats
        start = self.step
        title = f"{self.job.phase}" + (f" (from step {start})" if start else "")
        clock, images = time.perf_counter(), 0
        next_batch = functools.partial(next, self.batches)
        with self.progress.task(title, steps - start) as bar:
            while self.step < steps:
                before = {name: part.skipped for name, part in self.job.parts.items()}
                stats = self.job.iteration(next_batch, self.generator)
                self.step += 1
                images += int(stats.get("images", 0))
                skipped = {name: part.skipped - before[name] for name, part in self.job.parts.items()
                           if part.skipped > before[name]}
                if skipped:
                    self._nonfinite(skipped, stats)
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
        return stats

    def _nonfinite(self, skipped: dict, stats: dict) -> None:
        names = ", ".join(f"{name} ({n}x)" for name, n in skipped.items())
        self.progress.log(f"{self.job.phase} step {self.step}: NaN/Inf loss or gradient in {names}; step skipped")
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
                "world_size": self.dist.world_size, "job": self.job.state_dict()}

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
        set_rng_state(snap.rank_state["rng"], self.generator, self.dist.device)
        loader = snap.rank_state["loader"]
        if loader is not None:
            if not hasattr(self.batches, "load_state_dict"):
                raise DpdmError(f"snapshot {url!r} holds a data loader state but the batches given to the Trainer "
                                "cannot load one; use DeviceBatches over a dpdm.data.loader.Loader")
            self.batches.load_state_dict(loader)
        self.last_saved = url
        return True

