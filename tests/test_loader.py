"""dpdm-data's ``Loader``: an endless batch stream over torchdata's StatefulDataLoader with exact resume.

Every resume test runs a Loader without interruption as the reference, then for each cut point takes that
many batches from a second Loader, saves its state through ``torch.save``/``torch.load(weights_only=True)``,
restores it into a freshly built Loader and checks that the remaining batches equal the reference's, item
for item. Items carry their own index (``x[:, 0]`` of the vector sets below) so coverage checks are exact.
"""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from dpdm.core.datasets import TensorDataset
from dpdm.core.errors import DpdmError
from dpdm.data.image_folder import image_zip
from dpdm.data.loader import Loader

torch.set_num_threads(1)


def _vectors(n: int = 50, labels: bool = True) -> TensorDataset:
    """``n`` float vectors ``(i, -i, 0.5 i)``, labelled ``i % 3`` (or unlabelled)."""
    i = torch.arange(n, dtype=torch.float32)
    data = torch.stack([i, -i, 0.5 * i], dim=1)  # (n, 3)
    return TensorDataset(data, torch.arange(n) % 3 if labels else None, 3 if labels else 0)


class _Noisy(torch.utils.data.Dataset):
    """Item ``i`` is ``(i, u)`` with ``u`` drawn from numpy's global generator: it shows the worker seeds."""

    def __len__(self) -> int:
        return 20

    def __getitem__(self, i):
        return torch.tensor([float(i), np.random.random()]), torch.tensor(0)


def _image_zip(path, n: int = 24) -> str:
    """An EDM-format ZIP of ``n`` random 8x8 RGB PNGs, labelled ``i % 4``."""
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        names = []
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="png")
            names.append(f"{i:08d}"[:5] + f"/img{i:08d}.png")
            z.writestr(names[-1], buf.getvalue())
        z.writestr("dataset.json", json.dumps({"labels": [[name, i % 4] for i, name in enumerate(names)]}))
    return str(path)


def _take(loader: Loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def _ids(batches) -> list[int]:
    """The item indices in ``batches`` of a ``_vectors`` set, in order."""
    return torch.cat([x[:, 0] for x, _ in batches]).long().tolist()


def _roundtrip(state: dict) -> dict:
    """``state`` through ``torch.save`` and ``torch.load(weights_only=True)``, as a checkpoint carries it."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _assert_same(got, want) -> None:
    assert len(got) == len(want)
    for (x, y), (x_ref, y_ref) in zip(got, want):
        torch.testing.assert_close(x, x_ref, rtol=0, atol=0)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)


def _check_resume(make, cuts, total: int) -> None:
    """For each cut: save after ``cut`` batches, restore into ``make()`` and compare the rest with a reference."""
    reference = _take(make(), total)
    for cut in cuts:
        first = make()
        _assert_same(_take(first, cut), reference[:cut])
        state = _roundtrip(first.state_dict())
        resumed = make()
        resumed.load_state_dict(state)
        assert resumed.epoch == first.epoch == cut // first.batches_per_epoch
        assert resumed.step == first.step == cut
        _assert_same(_take(resumed, total - cut), reference[cut:])
        _assert_same(_take(first, total - cut), reference[cut:])  # taking the state did not disturb the run


@pytest.mark.parametrize("labels", [True, False])
def test_resume_single_process(labels):
    data = _vectors(50, labels=labels)
    make = lambda: Loader(data, 8, seed=3)  # 6 batches per epoch, 2 items dropped
    # before any batch, mid-epoch, at the end of epoch 0 (= start of 1), mid-epoch 1, end of epoch 1
    _check_resume(make, cuts=[0, 2, 6, 9, 12], total=15)


def test_resume_two_workers():
    data = _vectors(40)
    make = lambda: Loader(data, 8, seed=1, num_workers=2)  # 5 batches per epoch
    _check_resume(make, cuts=[3, 5, 7], total=8)


def test_resume_lazy_image_zip_two_persistent_workers(tmp_path):
    data = image_zip(path=_image_zip(tmp_path / "set.zip"))
    make = lambda: Loader(data, 5, seed=2, num_workers=2, persistent_workers=True, prefetch_factor=1)
    reference = _take(make(), 9)  # 4 batches per epoch
    x, labels = reference[0]
    assert x.dtype == torch.uint8 and x.shape == (5, 3, 8, 8) and labels.dtype == torch.int64
    epoch0 = torch.cat([x for x, _ in reference[:4]])
    assert len({bytes(image.numpy()) for image in epoch0}) == 20  # 20 distinct images of 24
    _check_resume(make, cuts=[2], total=9)


def test_worker_seeds_derive_from_seed_rank_and_epoch():
    noisy = _Noisy()
    make = lambda rank=0: Loader(noisy, 5, seed=4, rank=rank, world_size=2, num_workers=2)  # 2 batches per epoch
    reference = _take(make(), 4)
    noise = [x[:, 1] for x, _ in reference]
    assert len(set(torch.cat(noise).tolist())) == 20  # fresh draws in each worker and epoch
    assert not torch.equal(noise[0], _take(make(rank=1), 1)[0][0][:, 1])
    # a state at an epoch start restarts the workers exactly as the uninterrupted run started them
    _check_resume(make, cuts=[2], total=4)


def test_two_ranks_partition_each_epoch_and_resume():
    data = _vectors(60)
    ranks = [lambda r=r: Loader(data, 5, seed=7, rank=r, world_size=2) for r in range(2)]  # 6 batches per rank
    runs = [_take(make(), 12) for make in ranks]
    for epoch in range(2):
        seen = [_ids(run[6 * epoch:6 * epoch + 6]) for run in runs]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(60))
        assert seen[0] != _ids(runs[0][6 * (1 - epoch):6 * (2 - epoch)])  # a new permutation each epoch
    for make in ranks:
        _check_resume(make, cuts=[4, 6, 8], total=12)


def test_state_of_another_rank_is_refused():
    data = _vectors(60)
    state = _roundtrip(Loader(data, 5, rank=0, world_size=2).state_dict())
    with pytest.raises(DpdmError, match="rank is 0 in the saved state but 1 here"):
        Loader(data, 5, rank=1, world_size=2).load_state_dict(state)


def test_counters_and_state_contents():
    loader = Loader(_vectors(50), 8)
    assert loader.batches_per_epoch == 6
    assert loader.state_dict()["loader"] == {}
    _take(loader, 8)
    assert (loader.epoch, loader.step, loader.epoch_step) == (1, 8, 2)
    state = loader.state_dict()
    assert state["loader"] and {k: state[k] for k in ("epoch", "step", "epoch_step")} == {
        "epoch": 1, "step": 8, "epoch_step": 2}
    _take(loader, 4)
    assert loader.state_dict()["loader"] == {} and (loader.epoch, loader.epoch_step) == (2, 0)


def test_state_after_restore_before_iterating_is_the_restored_state():
    data = _vectors(50)
    first = Loader(data, 8)
    _take(first, 3)
    state = _roundtrip(first.state_dict())
    resumed = Loader(data, 8)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state


def test_drop_last_false_keeps_the_short_batch_and_resumes():
    data = _vectors(50)
    make = lambda: Loader(data, 8, drop_last=False)
    run = _take(make(), 7)
    assert [len(x) for x, _ in run] == [8] * 6 + [2]
    assert sorted(_ids(run)) == list(range(50))
    _check_resume(make, cuts=[6, 7], total=10)


def test_shuffle_false_is_in_order():
    batches = _take(Loader(_vectors(50), 10, shuffle=False), 6)
    assert _ids(batches) == list(range(50)) + list(range(10))


def test_seeds():
    data = _vectors(50)

    def order(seed, epoch=0):
        loader = Loader(data, 10, seed=seed)
        return _ids(_take(loader, 5 * (epoch + 1))[5 * epoch:])

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert order(0, epoch=1) != order(1, epoch=0)  # neighbouring seeds do not share epochs


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 5, "batch_size is 8 in the saved state but 5"),
    ("seed", 1, "seed is 0 in the saved state but 1"),
    ("shuffle", False, "shuffle is True in the saved state but False"),
    ("drop_last", False, "drop_last is True in the saved state but False"),
    ("world_size", 2, "world_size is 1 in the saved state but 2"),
])
def test_mismatched_settings_are_refused(field, value, message):
    data = _vectors(50)
    first = Loader(data, 8)
    _take(first, 2)
    state = _roundtrip(first.state_dict())
    with pytest.raises(DpdmError, match=message):
        Loader(data, **{"batch_size": 8, field: value}).load_state_dict(state)


def test_other_dataset_and_all_mismatches_at_once():
    first = Loader(_vectors(50), 8)
    _take(first, 2)
    state = _roundtrip(first.state_dict())
    with pytest.raises(DpdmError, match=r"batch_size is 8 .* but 4 .*dataset_len is 50 .* but 40 .*same dataset"):
        Loader(_vectors(40), 4).load_state_dict(state)


def test_num_workers_must_match_mid_epoch_only():
    data = _vectors(50)
    first = Loader(data, 10)
    _take(first, 2)
    with pytest.raises(DpdmError, match="num_workers is 0 in the saved state but 2"):
        Loader(data, 10, num_workers=2).load_state_dict(_roundtrip(first.state_dict()))
    _take(first, 3)  # the end of epoch 0: an epoch start resumes with any num_workers
    resumed = Loader(data, 10, num_workers=2)
    resumed.load_state_dict(_roundtrip(first.state_dict()))
    _assert_same(_take(resumed, 5), _take(first, 5))


def test_not_a_state():
    with pytest.raises(DpdmError, match="not a Loader state"):
        Loader(_vectors(50), 8).load_state_dict({"epoch": 1})


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(batch_size=8, rank=2, world_size=2), r"rank must be an integer in \[0, world_size=2\)"),
    (dict(batch_size=8, seed=-1), "seed must be an integer >= 0"),
    (dict(batch_size=8, prefetch_factor=2), "num_workers=0 does not allow prefetch_factor=2"),
    (dict(batch_size=30, world_size=2), r"50 items, fewer than one global batch \(2 rank\(s\) x batch_size 30 = 60\)"),
])
def test_invalid_options(kwargs, message):
    with pytest.raises(DpdmError, match=message):
        Loader(_vectors(50), **kwargs)


def test_short_dataset_without_drop_last_still_yields():
    batches = _take(Loader(_vectors(5), 8, drop_last=False), 2)
    assert [len(x) for x, _ in batches] == [5, 5]


class _ItemsOnly(torch.utils.data.Dataset):
    """The same items as a TensorDataset, without its batched ``__getitems__``."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


@pytest.mark.parametrize("workers", [0, 2])
def test_tensor_dataset_batched_fetch_equals_item_by_item(workers):
    ds = _vectors(64)
    got = _take(Loader(ds, 8, seed=3, num_workers=workers), 12)
    want = _take(Loader(_ItemsOnly(ds), 8, seed=3), 12)
    _assert_same(got, want)
    x, y = ds.__getitems__([5, 1, 5])
    assert torch.equal(x, ds.data[[5, 1, 5]]) and y.tolist() == ds.labels[[5, 1, 5]].tolist()
