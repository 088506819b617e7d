"""How much tensor memory a piece of training holds at its peak, counted exactly, on any device.

On CUDA, ``torch.cuda.max_memory_allocated`` reports this (rounded up to the allocator's 512-byte blocks). On CPU
torch keeps no such count, and the process's resident set mixes in the allocator's free lists, the interpreter and
the kernels' libraries, so it moves by MiB from run to run. ``TensorMemory`` counts the tensors themselves: the
storages alive when it is entered (found by the garbage collector: weights, optimizer states, EMA, batches) plus
every storage an operator makes inside it, each until it is freed, and keeps the peak of their sum over the ops.
The count does not depend on the machine's load, allocator or speed, so a memory comparison made with it on a CPU
holds to the byte for the same computation on a GPU (up to the allocator's rounding and what a GPU's kernels
choose differently: cuDNN/cuBLAS workspaces, fused attention). ``benchmarks/train_step.py --count`` uses it; so
does ``tests/test_score_chunk.py``.

The ops are seen through a ``TorchDispatchMode`` (as ``torch.utils.flop_counter`` sees them), backward and
optimizer steps included; the count costs a little Python per op, so it is for measuring, not for training runs.
"""

from __future__ import annotations

import gc
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorMemory(TorchDispatchMode):
    """A context whose ``peak`` is the largest number of bytes of tensor storage alive after any op run inside it.

    ``start``: the bytes alive on entry (every tensor the garbage collector finds; on ``device`` only, when
    given); ``bytes``: alive now (at the exit, frozen there); ``growth``: ``peak - start``. A storage is counted
    once however many tensors view it, from the op that made it until it is freed (a weak reference to its Python
    object, which torch keeps as long as the storage lives, says when). Tensors only C++ holds on entry (an
    autograd graph left alive) are not found; enter it between steps. ``timeline``: keep the bytes alive after
    every op in ``timeline`` (the same program at two batch sizes runs the same ops: op by op, the memory is a
    line in the batch, which is how ``benchmarks/train_step.py --predict`` extrapolates)."""

    def __init__(self, device: torch.device | str | None = None, timeline: bool = False):
        super().__init__()
        self.device = None if device is None else torch.device(device)
        self.live: dict[int, weakref.ref] = {}  # id of the storage's Python object -> a weak ref that uncounts it
        self.bytes = self.start = self.peak = 0
        self.timeline: list[int] | None = [] if timeline else None  # ``timeline``: the bytes alive after each op

    @property
    def growth(self) -> int:
        return self.peak - self.start

    def _track(self, tensor: torch.Tensor) -> None:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
            return
        key = id(storage)
        if key in self.live or storage.device.type == "meta" or (
                self.device is not None and storage.device != self.device):
            return
        nbytes = storage.nbytes()

        def freed(_, key=key, nbytes=nbytes):
            if self.live.pop(key, None) is not None:
                self.bytes -= nbytes

        self.live[key] = weakref.ref(storage, freed)
        self.bytes += nbytes

    def __enter__(self):
        gc.collect()
        self.live.clear()
        self.bytes = 0
        for obj in gc.get_objects():
            if issubclass(type(obj), torch.Tensor):  # not isinstance: it reads __class__, which some objects warn on
                self._track(obj)
        self.start = self.peak = self.bytes
        return super().__enter__()

    def __exit__(self, *exc):
        self.live.clear()  # the weak refs go, and with them the uncounting: ``bytes`` stays as it was here
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)
        self.peak = max(self.peak, self.bytes)
        if self.timeline is not None:
            self.timeline.append(self.bytes)
        return out
