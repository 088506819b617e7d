"""``TensorMemory`` (``dpdm.core.train.memory``): the peak bytes of live tensor storage, counted per op, against sums
worked out by hand: what exists on entry, views counted once, frees, backward and optimizer steps."""

from __future__ import annotations

import torch

from dpdm.core.train.memory import TensorMemory


def test_counts_storages_made_inside_until_freed_and_views_once():
    kept = torch.zeros(1000)  # 4000 bytes alive on entry
    with TensorMemory() as mem:
        assert mem.start >= kept.nbytes
        a = torch.zeros(2000)  # +8000
        b = a * 2  # +8000: 16000 above the start
        v = b.view(40, 50).t()  # a view: nothing new
        del a  # -8000, at once
        assert mem.bytes - mem.start == 8000
        c = torch.ones(500)  # +2000: 10000 above the start, below the peak
        assert mem.bytes - mem.start == 10000
        del b  # v still views it
        assert mem.bytes - mem.start == 10000
        del v, c
        torch.zeros(1)  # made and freed
    assert mem.growth == 16000
    assert mem.bytes == mem.start


def test_backward_and_optimizer_states_are_counted():
    w = torch.nn.Parameter(torch.randn(100, 100))  # 40000 bytes
    opt = torch.optim.Adam([w])
    with TensorMemory() as mem:
        (w @ w).sum().backward()
        opt.step()
    # left alive: the gradient, Adam's two moments (its step counter is a 4-byte scalar)
    assert mem.bytes - mem.start == 3 * w.nbytes + 4
    # at the peak of the backward: mm's two products for the gradient, and their sum
    assert mem.growth >= 3 * w.nbytes


def test_only_the_given_device_is_counted():
    with TensorMemory(device="meta") as mem:
        torch.zeros(1000)
        torch.zeros(10, device="meta")
    assert mem.start == mem.peak == 0  # meta tensors hold no memory; CPU tensors are another device
