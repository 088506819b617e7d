"""Data-parallel training with ``torch.distributed``, launched by ``torchrun`` (or run as one process).

``init_dist()`` reads the environment ``torchrun`` sets for every process (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); without it the run is a single process and every
collective below is a no-op. On GPUs each rank uses ``cuda:LOCAL_RANK`` with the NCCL backend, on CPUs
gloo. Multi-node runs use torchrun's usual flags, e.g. on each of two nodes::

    torchrun --nnodes 2 --nproc-per-node 8 --node-rank $NODE --rdzv-backend c10d \\
             --rdzv-endpoint $HOST:29500 -m dpdm.cli run recipe.yaml

Seeds: every rank derives its own seeds from ``(seed, rank)`` (``derive_seed``), hashed so that
neighbouring seeds and ranks never share a stream.
"""

from __future__ import annotations

import datetime
import inspect
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as tdist

from ..errors import DpdmError

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def derive_seed(*words: int) -> int:
    """A seed in [0, 2**63) hashed from non-negative integers (numpy's ``SeedSequence``)."""
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1, np.uint64)[0]) >> 1


@dataclass
class Dist:
    """Where this process stands in the job: its ``rank`` of ``world_size``, its ``local_rank`` on its node, the
    ``device`` it trains on and the collective ``backend`` (None for a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, checkpoint metadata and sample grids."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            tdist.barrier()

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over the ranks (a new tensor; ``value`` itself is unchanged)."""
        if not self.distributed:
            return value.clone()
        out = value.detach().to(self.device, torch.float64 if value.dtype == torch.float64 else torch.float32)
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
        return (out / self.world_size).to(value.dtype)

    def any(self, flag: bool | torch.Tensor) -> bool:
        """Whether ``flag`` is true on any rank (so that every rank takes the same decision)."""
        if not self.distributed:
            return bool(flag)
        t = torch.as_tensor(flag, dtype=torch.float32, device=self.device).reshape(1).clone()
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def all_gather_object(self, obj) -> list:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable objects)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, src: int = 0):
        """Rank ``src``'s ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=src)
        return box[0]

    def seed_everything(self, seed: int) -> torch.Generator:
        """Seed torch's global generators, numpy and ``random`` from ``(seed, rank)`` (dropout and anything else
        that draws from global state), and return this rank's training generator on ``device`` (σ, noise)."""
        torch.manual_seed(derive_seed(seed, self.rank, 1))
        np.random.seed(derive_seed(seed, self.rank, 2) % (1 << 32))
        random.seed(derive_seed(seed, self.rank, 3))
        generator = torch.Generator(self.device)
        generator.manual_seed(derive_seed(seed, self.rank, 0))
        return generator

    def destroy(self, sync: bool = True) -> None:
        """Leave the process group (if this process is in one).

        ``sync``: first wait for every rank (a barrier), so that no rank tears down its connections while a peer
        still has collective work in flight (gloo can abort a process whose worker threads still hold such work
        at exit). Pass ``sync=False`` on an error path, where the other ranks may never reach the barrier."""
        if self.distributed and tdist.is_initialized():
            if sync:
                tdist.barrier()
            tdist.destroy_process_group()


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise DpdmError(f"environment variable {name}={value!r} is not an integer (torchrun sets it)") from None


def resolve_device(name: str | torch.device, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """The device a recipe's (or a command's) ``device`` names: ``auto`` is CUDA when it is available, else the CPU;
    under torchrun (``world_size`` > 1) each rank takes ``cuda:local_rank``. Clear errors for a name torch does not
    know, CUDA that is not there, or a GPU this node does not have."""
    if str(name) == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DpdmError(f"device {name!r} is not a device name ({exc}); use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DpdmError(f"device {str(name)!r} asks for CUDA but CUDA is not available here; use 'cpu' or 'auto'")
        if world_size > 1:
            if device.index is not None and device.index != local_rank:
                raise DpdmError(f"device {str(name)!r}: under torchrun each rank uses cuda:LOCAL_RANK; set the "
                                "device to 'cuda' or 'auto' and choose GPUs with CUDA_VISIBLE_DEVICES")
            device = torch.device("cuda", local_rank)
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise DpdmError(f"device {device} does not exist: this node has {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(device)
    return device


def init_dist(device: str | torch.device = "auto", timeout_s: float = 1800) -> Dist:
    """Join the process group torchrun describes in the environment, or a single process without one.

    NCCL on CUDA devices, gloo on CPUs. A process group that is already initialised (by the caller) is used
    as it is. ``timeout_s`` bounds how long a collective waits for the other ranks.
    """
    if tdist.is_available() and tdist.is_initialized():
        rank, world = tdist.get_rank(), tdist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return Dist(rank, world, local, resolve_device(device, local, world), tdist.get_backend())
    present = [name for name in ENV if name in os.environ]
    if not present:
        return Dist(device=resolve_device(device))
    if len(present) < len(ENV):
        missing = [name for name in ENV if name not in os.environ]
        raise DpdmError(f"incomplete torchrun environment: {', '.join(present)} set but {', '.join(missing)} "
                        "missing; launch with torchrun (or unset them for a single process)")
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if not 0 <= rank < world:
        raise DpdmError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    dev = resolve_device(device, local, world)
    if world == 1:
        return Dist(rank, world, local, dev)
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise DpdmError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set; launch with torchrun, which sets "
                        "them (multi-node: --rdzv-endpoint HOST:PORT)")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    # binding the NCCL communicator to this rank's GPU (torch >= 2.3) avoids a guess and a warning
    bind = backend == "nccl" and "device_id" in inspect.signature(tdist.init_process_group).parameters
    kwargs = {"device_id": dev} if bind else {}
    tdist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                             timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return Dist(rank, world, local, dev, backend)
