"""DDP training with two gloo processes on the CPU (issue #6).

Each test starts two processes with torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), so ``init_dist`` joins the group as it does under torchrun. Checked:
both jobs train for several iterations with ``find_unused_parameters=False`` and gradient accumulation
(``no_sync``); student and fake score have their own DDP wrappers and the teacher none; parameters are
identical on the ranks; 2 ranks x batch B take the same step as 1 process x batch 2B; only rank 0 writes
records; and a run restarted from a snapshot (new processes) ends bit for bit where the uninterrupted one did.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dpdm.core.train.distributed import Dist, derive_seed, init_dist
from dpdm.core.errors import DpdmError

STEPS, CUT, BATCH = 4, 2, 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, scenario: str, out: str) -> None:
    """One rank: torchrun's environment, then the scenario; results go to ``out`` as files."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dpdm.core.train.engine import DeviceBatches, Trainer
    from dpdm.core.train.snapshots import Snapshots
    from dpdm.core.train.teacher import TeacherJob
    from dpdm.core.train.tracking import Tracker
    from dpdm.data.loader import Loader
    from dpdm.core.train.lora import adapter_parameters
    from test_engine import (_deterministic_loss, denoiser, distill_job, distill_lora_both_job, distill_lora_job,
                             flat_state, teacher_job, toy_data)

    dist = init_dist("cpu", timeout_s=120)
    assert (dist.rank, dist.world_size, dist.backend, dist.device.type) == (rank, world, "gloo", "cpu")
    out = Path(out)
    results = {}
    for phase, make in (("student", distill_job), ("student-lora", distill_lora_job),
                        ("student-lora-both", distill_lora_both_job), ("teacher", teacher_job)):
        job = make(dist=dist)
        if phase.startswith("student-lora"):  # DDP wraps the adapters alone: the teacher's weights are not its
            adapted = [job.fake] + ([job.student] if phase.endswith("both") else [])
            for part in adapted:
                assert isinstance(part.wrapped, DDP) and not any(p.requires_grad for p in job.teacher.parameters())
                adapters = {id(p) for p in adapter_parameters(part.module)}
                frozen = {n for n, p in part.module.named_parameters() if id(p) not in adapters}
                assert part.wrapped.parameters_to_ignore == frozen | {n for n, _ in part.module.named_buffers()}
                synced = [p for p in part.wrapped.parameters() if p.requires_grad]
                assert [id(p) for p in synced] == [id(p) for p in adapter_parameters(part.module)]
            teacher_before = {k: v.clone() for k, v in job.teacher.state_dict().items()}
        if phase == "student":
            assert isinstance(job.student.wrapped, DDP) and isinstance(job.fake.wrapped, DDP)
            assert not job.student.wrapped.find_unused_parameters and not job.fake.wrapped.find_unused_parameters
            assert not isinstance(job.teacher, DDP) and not any(p.requires_grad for p in job.teacher.parameters())
            teacher_before = {k: v.clone() for k, v in job.teacher.state_dict().items()}
        loader = Loader(toy_data(), BATCH, seed=5, rank=dist.rank, world_size=dist.world_size)
        snaps = Snapshots(str(out / f"snaps-{phase}"), keep_last=5)
        tracker = Tracker(out / f"{phase}.jsonl", dist=dist)
        trainer = Trainer(job, DeviceBatches(loader, dist.device, conditional=False), dist=dist, seed=11,
                          snapshots=snaps, save_every=CUT, tracker=tracker, log_every=1)
        if scenario == "resume":
            assert trainer.resume(snaps.url(CUT)) and trainer.step == CUT
        trainer.fit(STEPS)
        results[phase] = flat_state(trainer)
        if phase.startswith("student"):
            assert all(torch.equal(v, teacher_before[k]) for k, v in job.teacher.state_dict().items())
    if scenario == "run":  # one TeacherJob step on this rank's half of a batch of 2B, with a loss without draws
        job = TeacherJob(denoiser(0, dropout=0.0), _deterministic_loss, lr=1e-2, dist=dist)
        data = toy_data(4 * BATCH).data
        for i in range(2):
            part = data[2 * BATCH * i:][:2 * BATCH][rank * BATCH:(rank + 1) * BATCH]
            job.iteration(lambda: (part, None))
        results["split"] = [p.detach().clone() for p in job.denoiser.parameters()]
        # the same for a fake score's adapters: 2 ranks x B = 1 process x 2B
        results["lora-split"] = adapter_steps(
            dist, lambda i: data[2 * BATCH * i:][:2 * BATCH][rank * BATCH:(rank + 1) * BATCH])
    torch.save(results, out / f"{scenario}-rank{rank}.pt")
    dist.barrier()
    dist.destroy()


def adapter_steps(dist: Dist, part_of) -> list[torch.Tensor]:
    """Two optimizer steps of a fake score's adapters (``Trainable(params=...)``, rank 2 on a frozen denoiser) with a
    loss without draws on the batches ``part_of(i)``; returns the adapters."""
    from dpdm.core.train.lora import adapted_copy, adapter_parameters
    from dpdm.core.train.trainable import Trainable
    from test_engine import _deterministic_loss, denoiser

    module = adapted_copy(denoiser(0, dropout=0.0), rank=2)  # denoiser() seeds: the same adapters in every process
    fake = Trainable("fake", module, lr=1e-2, dist=dist, params=adapter_parameters(module))
    for i in range(2):
        fake.step(lambda model, x0, labels: _deterministic_loss(model, x0), lambda: (part_of(i), None))
    return [p.detach().clone() for p in adapter_parameters(module)]


def spawn(scenario: str, out: Path) -> list[dict]:
    mp.spawn(_worker, args=(2, free_port(), scenario, str(out)), nprocs=2, join=True)
    return [torch.load(out / f"{scenario}-rank{r}.pt", weights_only=True) for r in range(2)]


def same(a: dict, b: dict, prefix: str = "") -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key.startswith(prefix):
            equal = torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]
            assert equal, key


def test_two_process_gloo_training(tmp_path):
    from test_engine import _deterministic_loss, denoiser, toy_data
    from dpdm.core.train.teacher import TeacherJob

    run = spawn("run", tmp_path)
    for phase in ("student", "student-lora", "student-lora-both", "teacher"):
        same(run[0][phase], run[1][phase], prefix="weights/")  # DDP keeps the ranks' parameters identical
        records = [json.loads(line) for line in (tmp_path / f"{phase}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # rank 0 only: one record per step
        assert records[-1]["nimg"] == STEPS * 2 * BATCH * 2  # steps x accum x batch per rank x ranks

    single = TeacherJob(denoiser(0, dropout=0.0), _deterministic_loss, lr=1e-2)
    data = toy_data(4 * BATCH).data
    for i in range(2):
        single.iteration(lambda: (data[2 * BATCH * i:][:2 * BATCH], None))
    for a, b in zip(run[0]["split"], single.denoiser.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    single = adapter_steps(Dist(), lambda i: data[2 * BATCH * i:][:2 * BATCH])
    assert all(torch.count_nonzero(b) for b in single[1::2])  # the B factors (zero at first) have moved
    for rank in range(2):
        for a, b in zip(run[rank]["lora-split"], single):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_process_resume_is_exact(tmp_path):
    run = spawn("run", tmp_path)  # uninterrupted (it also saves at step CUT, which changes nothing)
    resumed = spawn("resume", tmp_path)  # new processes, started from the snapshot of step CUT
    for rank in range(2):
        for phase in ("student", "student-lora", "student-lora-both", "teacher"):
            same(run[rank][phase], resumed[rank][phase])


def test_single_process_without_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    dist = init_dist("cpu")
    assert (dist.rank, dist.world_size, dist.backend, dist.is_main, dist.distributed) == (0, 1, None, True, False)
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}] and dist.broadcast_object(3) == 3
    assert not dist.any(False) and dist.any(True)
    assert torch.equal(dist.all_reduce_mean(torch.tensor([2.0])), torch.tensor([2.0]))
    dist.barrier()
    dist.destroy()


def test_torchrun_environment_errors(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(DpdmError, match="incomplete torchrun environment: RANK set but WORLD_SIZE, LOCAL_RANK"):
        init_dist("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(DpdmError, match="MASTER_ADDR and MASTER_PORT not set"):
        init_dist("cpu")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(DpdmError, match=r"RANK=2 is not in \[0, WORLD_SIZE=2\)"):
        init_dist("cpu")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    if not torch.cuda.is_available():
        with pytest.raises(DpdmError, match="CUDA is not available"):
            init_dist("cuda")


def test_seeds_derive_from_seed_and_rank():
    seeds = {derive_seed(s, r) for s in range(3) for r in range(3)}
    assert len(seeds) == 9 and all(0 <= s < 2**63 for s in seeds)
    a = Dist(rank=0).seed_everything(0).initial_seed()
    b = Dist(rank=1).seed_everything(0).initial_seed()
    assert a != b and a == Dist(rank=0).seed_everything(0).initial_seed()


TORCHRUN_SCRIPT = textwrap.dedent("""
    import torch
    from dpdm.core.train.distributed import init_dist
    from dpdm.core.train.engine import Trainer
    from test_engine import distill_job, toy_data

    torch.set_num_threads(1)
    dist = init_dist("auto")
    job = distill_job(dist=dist)
    data = toy_data(64).data[dist.rank::2]
    batches = iter([(data[i % 4 * 8:][:8], None) for i in range(100)])
    Trainer(job, batches, dist=dist).fit(3)
    weights = torch.cat([p.detach().flatten() for p in job.student.module.parameters()])
    everyone = dist.all_gather_object(weights)
    assert torch.equal(everyone[0], everyone[1])
    print(f"rank {dist.rank} of {dist.world_size} ok ({dist.backend})")
    dist.destroy()
""")


@pytest.mark.slow
def test_under_torchrun(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank 0 of 2 ok (gloo)" in proc.stdout and "rank 1 of 2 ok (gloo)" in proc.stdout
