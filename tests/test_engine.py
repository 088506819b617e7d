"""The training engine (issue #6): resume exactness to the bit, gradient accumulation, non-finite guards,
mixed precision and the JSONL/TensorBoard records, on a small ``mlp`` denoiser with toy 2-D data.

Resume: a run of N iterations without interruption is the reference; a second run stops after k, saves a
snapshot, and everything (models, jobs, loader, trainer) is rebuilt from scratch, loaded and trained to N.
Weights, EMA, optimizer states and counters must be equal, bit for bit. The networks use dropout, so the
global generator's state is part of what must survive the restart.
"""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from dpdm.core.io.checkpoint import build_denoiser, network_spec
from dpdm.core.datasets import TensorDataset
from dpdm.core.train.distill import DistillJob
from dpdm.core.train.distributed import Dist
from dpdm.core.divergences import SmoothedKL
from dpdm.core.train.engine import DeviceBatches, Trainer, warmup_lr
from dpdm.core.errors import DpdmError
from dpdm.core.losses import EDMLoss
from dpdm.core.train.precision import Precision
from dpdm.core.sigmas import SigmaDist
from dpdm.core.train.snapshots import Snapshots
from dpdm.core.train.teacher import TeacherJob, TeacherTrainer
from dpdm.core.eval.hooks import SampleGrid
from dpdm.core.train.tracking import Tracker
from dpdm.data.loader import Loader

torch.set_num_threads(1)

SPEC = network_spec({"name": "mlp", "hidden": 16, "depth": 1, "emb_dim": 8, "dropout": 0.2},
                    {"name": "edm", "sigma_data": 0.5}, (2,), 0)


def toy_data(n: int = 96) -> TensorDataset:
    g = torch.Generator().manual_seed(123)
    centers = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    x = centers[torch.randint(3, (n,), generator=g)] + 0.1 * torch.randn(n, 2, generator=g)
    return TensorDataset(x)


def denoiser(seed: int, dropout: float = 0.2) -> torch.nn.Module:
    """A denoiser with every weight random (the MLP's zero output layer would make the student's gradient 0)."""
    torch.manual_seed(seed)
    model = build_denoiser({**SPEC, "backbone": {**SPEC["backbone"], "dropout": dropout}})
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
    return model


def teacher_job(**kw) -> TeacherJob:
    opts = dict(lr=1e-2, ema_halflife_nimg=200, lr_warmup_nimg=64, grad_clip=1.0, accum=2)
    return TeacherJob(denoiser(0), EDMLoss(), **{**opts, **kw})


def distill_job(**kw) -> DistillJob:
    opts = dict(lr=1e-3, fake_lr=2e-3, fake_updates=2, ema_halflife_nimg=200, lr_warmup_nimg=32, grad_clip=10.0,
                accum=2)
    div = SmoothedKL(SigmaDist("log-uniform", min=0.01, max=10.0))
    return DistillJob(denoiser(1), div, EDMLoss(), **{**opts, **kw})


def distill_lora_job(**kw) -> DistillJob:
    """``distill_job`` with the fake score as rank-2 adapters on the teacher (``train/lora.py``)."""
    return distill_job(fake_lora={"rank": 2}, **kw)


def distill_lora_both_job(**kw) -> DistillJob:
    """``distill_job`` with the student and the fake score as rank-2 adapters on the teacher."""
    return distill_job(fake_lora={"rank": 2}, student_lora={"rank": 2}, **kw)


def distill_lora_chunked_job(**kw) -> DistillJob:
    """``distill_lora_job`` with teacher and fake evaluated 3 samples at a time (``score_chunk``; chunks 3 + 1)."""
    return distill_lora_job(score_chunk=3, **kw)


JOBS = {"teacher": teacher_job, "student": distill_job, "student-lora": distill_lora_job,
        "student-lora-both": distill_lora_both_job, "student-lora-chunked": distill_lora_chunked_job}


def trainer_for(job, snapshots=None, batch: int = 8, **kw) -> Trainer:
    loader = Loader(toy_data(), batch, seed=5)
    return Trainer(job, DeviceBatches(loader, "cpu", conditional=False), seed=11, snapshots=snapshots, **kw)


def flat_state(trainer: Trainer) -> dict:
    """Every weight, optimizer tensor and counter of a trainer, flattened to ``{path: value}``."""
    out = {f"weights/{name}/{k}": v for name, m in trainer.job.weights().items() for k, v in m.state_dict().items()}

    def walk(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}/{i}", v)
        else:
            out[prefix] = obj

    walk("state", trainer.job.state_dict())
    out["step"] = trainer.step
    return out


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("phase", list(JOBS))
def test_resume_is_exact_to_the_bit(phase, tmp_path):
    steps, cut = 6, 3
    reference = trainer_for(JOBS[phase]())
    reference.fit(steps)

    first = trainer_for(JOBS[phase](), snapshots=Snapshots(str(tmp_path / "snaps")))
    first.fit(cut)  # saves after its last iteration
    assert first.last_saved.endswith("ckpt-000000003")
    del first

    resumed = trainer_for(JOBS[phase](), snapshots=Snapshots(str(tmp_path / "snaps")))
    assert resumed.resume() and resumed.step == cut
    resumed.fit(steps)
    want, got = flat_state(reference), flat_state(resumed)
    assert_bitwise_equal(want, got)
    initial = JOBS[phase]().weights()
    trained = reference.job.weights()
    moved = [name for name in initial if not torch.equal(next(initial[name].parameters()),
                                                         next(trained[name].parameters()))]
    assert sorted(moved) == sorted(initial)  # every saved model (EMA included) has moved: the test is not vacuous
    assert reference.job.nimg == steps * 2 * 8


def test_resume_refuses_another_phase_and_config(tmp_path):
    snaps = Snapshots(str(tmp_path / "s"))
    trainer_for(teacher_job(), snapshots=snaps, config_hash="abc").fit(1)
    with pytest.raises(DpdmError, match="'teacher' training"):
        trainer_for(distill_job(), snapshots=snaps).resume()
    with pytest.raises(DpdmError, match="another training configuration"):
        trainer_for(teacher_job(), snapshots=snaps, config_hash="xyz").resume()
    with pytest.raises(DpdmError, match="has weights for ema, which this job does not train"):
        trainer_for(teacher_job(ema_halflife_nimg=None), snapshots=snaps).resume()
    plain = Snapshots(str(tmp_path / "plain"))
    trainer_for(teacher_job(ema_halflife_nimg=None), snapshots=plain).fit(1)
    with pytest.raises(DpdmError, match="has no weights for ema"):
        trainer_for(teacher_job(), snapshots=plain).resume()
    assert not trainer_for(teacher_job(), snapshots=Snapshots(str(tmp_path / "empty"))).resume()


def _deterministic_loss(model, y, class_labels=None, generator=None):
    """A loss without random draws (use it with a network without dropout), so that different batchings see
    the same problem."""
    return ((model(y, 0.7) - 0.5 * y) ** 2).sum(dim=1)


def test_accumulation_matches_one_big_batch():
    data = toy_data(32).data
    results = []
    for accum, batch in [(1, 16), (2, 8), (4, 4)]:
        job = TeacherJob(denoiser(0, dropout=0.0), _deterministic_loss, lr=1e-2, accum=accum)
        batches = iter([(data[i:i + batch], None) for i in range(0, 32, batch)])
        for _ in range(2):
            job.iteration(lambda: next(batches))
        results.append(torch.cat([p.detach().flatten() for p in job.denoiser.parameters()]))
        assert job.nimg == 32
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[2], results[0], rtol=1e-5, atol=1e-6)
    assert not torch.equal(results[0], torch.cat([p.detach().flatten() for p in denoiser(0).parameters()]))


def test_learning_rate_warmup_in_images():
    assert warmup_lr(1e-3, 0, 100) == 0.0
    assert warmup_lr(1e-3, 50, 100) == pytest.approx(5e-4)
    assert warmup_lr(1e-3, 500, 100) == 1e-3
    assert warmup_lr(1e-3, 0, 0) == 1e-3
    job = TeacherJob(denoiser(0), EDMLoss(), lr=1e-3, lr_warmup_nimg=32)
    data = toy_data(16).data
    lrs = [job.iteration(lambda: (data, None), torch.Generator().manual_seed(0))["lr"] for _ in range(3)]
    assert lrs == [0.0, pytest.approx(5e-4), 1e-3]


def test_idle_models_hold_no_gradients():
    job = distill_job(accum=1)
    data = toy_data(16).data
    job.iteration(lambda: (data, None), torch.Generator().manual_seed(0))
    for model in (job.student.module, job.fake.module, job.teacher):
        assert all(p.grad is None for p in model.parameters())
    assert all(not p.requires_grad for p in job.teacher.parameters())


# --- non-finite guards --------------------------------------------------------------------------------------------

class Poisoned:
    """Toy batches where the iterations in ``bad`` (1-based, counted in batches drawn) carry a NaN."""

    def __init__(self, bad, batch: int = 8):
        self.data, self.bad, self.batch, self.n = toy_data(64).data, set(bad), batch, 0

    def __next__(self):
        self.n += 1
        x = self.data[(self.n * self.batch) % 64:][:self.batch].clone()
        if self.n in self.bad:
            x[0, 0] = float("nan")
        return x, None


def test_nonfinite_step_is_skipped_counted_and_logged(tmp_path, caplog):
    tracker = Tracker(tmp_path / "metrics.jsonl")
    trainer = Trainer(TeacherJob(denoiser(0), EDMLoss(), lr=1e-2), Poisoned({3}), tracker=tracker, log_every=100)
    trainer.fit(2)
    before = {k: v.clone() for k, v in trainer.job.denoiser.state_dict().items()}
    opt_before = trainer.job.trainable.optimizer.state_dict()["state"][0]["exp_avg"].clone()
    trainer.fit(3)
    after = trainer.job.denoiser.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # skipped: the weights did not move
    assert torch.equal(trainer.job.trainable.optimizer.state_dict()["state"][0]["exp_avg"], opt_before)
    assert trainer.job.trainable.skipped == 1 and trainer.job.trainable.consecutive == 1
    assert all(p.grad is None for p in trainer.job.denoiser.parameters())
    trainer.fit(4)
    assert trainer.job.trainable.consecutive == 0 and not torch.equal(before["model.linear_in.weight"],
                                                                      after["model.linear_in.weight"])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    bad = [r for r in records if "nonfinite" in r]
    assert len(bad) == 1 and bad[0]["step"] == 3 and bad[0]["nonfinite"] == {"model": 1}
    assert bad[0]["loss"] is None and bad[0]["skipped"] == {"model": 1}
    warned = [r for r in caplog.records if r.name == "dpdm.core.train.engine"]  # through logging, not the bar
    assert [(r.levelname, r.getMessage()) for r in warned] == [
        ("WARNING", "teacher step 3: NaN/Inf loss or gradient in model (1x); step skipped")]


@pytest.mark.parametrize("phase", ["teacher", "student"])
def test_repeated_nonfinite_steps_stop_the_run(phase, tmp_path):
    job = TeacherJob(denoiser(0), EDMLoss(), lr=1e-2) if phase == "teacher" else distill_job(accum=1, fake_updates=1)
    snaps = Snapshots(str(tmp_path / "snaps"))
    trainer = Trainer(job, Poisoned(range(5, 100)), snapshots=snaps, max_nonfinite=3)
    trainer.fit(2)
    with pytest.raises(DpdmError) as info:
        trainer.fit(10)
    message = str(info.value)
    name = "model" if phase == "teacher" else "student"  # the fake (also NaN) ties; the student is named first
    assert f"the {name} model's loss or gradient was NaN/Inf in 3 consecutive" in message
    assert "lower learning rate" in message and "grad_clip" in message and "bf16/fp32" in message
    assert snaps.latest() in message and snaps.latest().endswith("ckpt-000000002")


# --- precision ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("phase", list(JOBS))
@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_mixed_precision_runs_on_cpu(phase, mode):
    job = JOBS[phase](precision=Precision(mode, "cpu"), accum=1)
    part = next(iter(job.parts.values()))
    assert (part.scaler is not None) == (mode == "fp16")
    start = [p.detach().clone() for p in part.module.parameters()]
    trainer = trainer_for(job)
    stats = trainer.fit(4)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in stats.items() if k.endswith("_loss") or k == "loss")
    assert any(not torch.equal(a, b) for a, b in zip(start, part.module.parameters()))
    assert all(p.dtype == torch.float32 for p in part.module.parameters())


def test_precision_rejects_unknown_modes():
    with pytest.raises(DpdmError, match="unknown precision 'fp8'"):
        Precision("fp8")
    assert Precision("fp32").grad_scaler() is None
    assert isinstance(Precision("fp16", "cpu").grad_scaler(), torch.amp.GradScaler)


def test_networks_with_fp16_parts_get_a_loss_scaler_whatever_the_mode():
    """EDM's ADM body runs in float16 on CUDA by itself (``use_fp16``): its gradients need loss scaling even when
    the engine's precision is fp32 (the ImageNet-64 recipe). bfloat16 bodies and CPU runs need none."""
    from dpdm.core.train.precision import runs_fp16
    from dpdm.nets.edm.dhariwal import DhariwalUNet

    def adm(**kw):
        return DhariwalUNet(img_resolution=8, in_channels=1, out_channels=1, model_channels=8, channel_mult=[1],
                            num_blocks=1, attn_resolutions=[], **kw)

    assert runs_fp16(adm(use_fp16=True), "cuda")
    assert not runs_fp16(adm(use_fp16=True, fp16_dtype="bfloat16"), "cuda")
    assert not runs_fp16(adm(use_fp16=False), "cuda")
    assert not runs_fp16(adm(use_fp16=True), "cpu")  # the body runs in the input's dtype on a CPU
    assert Precision("fp32", "cpu").grad_scaler(adm(use_fp16=True)) is None


# --- the single-process facades keep their behaviour ----------------------------------------------------------------

def test_teacher_trainer_facade_matches_the_job():
    data = toy_data(16).data
    trainer = TeacherTrainer(denoiser(0), EDMLoss(), lr=1e-2, ema_halflife_nimg=100)
    job = TeacherJob(denoiser(0), EDMLoss(), lr=1e-2, ema_halflife_nimg=100)
    ga, gb = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for _ in range(3):
        torch.manual_seed(1)
        stats = trainer.step(data, None, generator=ga)
        torch.manual_seed(1)
        job.iteration(lambda: (data, None), gb)
    assert set(stats) == {"loss"} and trainer.nimg == 48
    for a, b in zip(trainer.model.parameters(), job.model.parameters()):
        assert torch.equal(a, b)


# --- tracking -----------------------------------------------------------------------------------------------------

def test_jsonl_records_and_keys(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    with Tracker(path) as tracker:
        trainer = trainer_for(distill_job(accum=1), tracker=tracker, log_every=2)
        trainer.fit(4)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    keys = {"phase", "step", "nimg", "student_loss", "student_grad_norm", "student_lr", "fake_loss",
            "fake_grad_norm", "fake_lr", "images_per_s", "peak_mem_mb", "skipped"}
    assert keys <= set(records[0]) and records[0]["phase"] == "student"
    assert records[1]["nimg"] == 4 * 8 and records[1]["skipped"] == {"student": 0, "fake": 0}
    assert records[1]["images_per_s"] > 0 and records[1]["peak_mem_mb"] > 0


def test_only_rank_zero_writes(tmp_path):
    other = Tracker(tmp_path / "m.jsonl", dist=Dist(rank=1, world_size=2))
    other.log({"step": 1, "loss": 0.5})
    other.close()
    assert not (tmp_path / "m.jsonl").exists()


def test_tensorboard_when_installed(tmp_path, monkeypatch):
    calls = []

    class FakeWriter:
        def __init__(self, log_dir):
            calls.append(("init", log_dir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def add_image(self, tag, image, step, dataformats):
            calls.append((tag, image.shape, step, dataformats))

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    with Tracker(tmp_path / "m.jsonl", tensorboard=tmp_path / "tb") as tracker:
        tracker.log({"phase": "teacher", "step": 5, "loss": 0.25, "skipped": {"model": 0}})
        tracker.image("teacher/samples", torch.zeros(4, 4, 3, dtype=torch.uint8).numpy(), 5)
    assert calls == [("init", str(tmp_path / "tb")), ("teacher/loss", 0.25, 5),
                     ("teacher/samples", (4, 4, 3), 5, "HWC"), ("close",)]


def test_sample_grid_hook_keeps_training_exact(tmp_path):
    """Sampling every step at a fixed seed draws nothing from the training's random streams."""
    from dpdm.core.plugins.registry import get

    plain = trainer_for(teacher_job(accum=1))
    plain.fit(3)
    grid = SampleGrid(1, tmp_path / "samples", sampler=get("sampler", "euler"),
                      sigmas=get("schedule", "karras")(4), shape=(2,), kind="vector", num=32)
    hooked = trainer_for(teacher_job(accum=1), hooks=[grid])
    hooked.fit(3)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [f"teacher-{i:09d}.png" for i in (1, 2, 3)]
    assert_bitwise_equal(flat_state(plain), flat_state(hooked))
    assert hooked.job.denoiser.training


def one_fake_update_job(order: str) -> DistillJob:
    div = SmoothedKL(SigmaDist("log-uniform", min=0.01, max=10.0))
    return DistillJob(denoiser(1, dropout=0.0), div, EDMLoss(), lr=1e-3, fake_updates=1, order=order)


def counted_batches(n: int = 3):
    """``(batches, drawn, next_batch)``: fixed batches served in order; ``drawn`` lists the indices served."""
    batches = [torch.randn(8, 2, generator=torch.Generator().manual_seed(i)) for i in range(n)]
    drawn = []

    def next_batch():
        drawn.append(len(drawn))
        return batches[len(drawn) - 1], None

    return batches, drawn, next_batch


def test_fake_first_order_is_algorithm_1():
    """Algorithm 1's order (the default): the fake score's update on the student's outputs for one batch, then the
    student's update on another batch against the *updated* fake score."""
    from dpdm.core.train.distill import fake_score_loss, student_loss

    def job_():
        return one_fake_update_job("fake-first")

    job = job_()
    assert job.order == "fake-first"
    batches, drawn, next_batch = counted_batches()
    student_before = {k: v.clone() for k, v in job.student.module.state_dict().items()}
    stats = job.iteration(next_batch, torch.Generator().manual_seed(0))
    assert drawn == [0, 1]  # the fake's batch, then the student's

    replay = job_()
    replay.student.module.load_state_dict(student_before)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        fake_loss = fake_score_loss(replay.fake.module.train(), replay.student.module.eval(), replay.divergence,
                                    EDMLoss(), batches[0], None, g).mean()
        # the student's loss is taken against the fake score as it is after its update
        s_loss = student_loss(replay.student.module, replay.teacher, job.fake.module.eval(), replay.divergence,
                              batches[1], None, g).mean()
    assert stats["fake_loss"] == pytest.approx(float(fake_loss), rel=1e-6)
    assert stats["student_loss"] == pytest.approx(float(s_loss), rel=1e-6)
    assert stats["student_loss"] > 0  # the fake moved first, so the student already sees a gradient


def test_student_dropout_is_a_stated_choice():
    div = SmoothedKL(SigmaDist("log-uniform", min=0.01, max=10.0))
    off = DistillJob(denoiser(1), div, EDMLoss(), lr=1e-3)
    on = DistillJob(denoiser(1), div, EDMLoss(), lr=1e-3, student_dropout=True)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(8, 2, generator=g), None)
    modes = {"student": [], "fake": []}
    for job in (off, on):
        job.student.module.register_forward_pre_hook(lambda m, a: modes["student"].append(m.training))
        job.fake.module.register_forward_pre_hook(lambda m, a: modes["fake"].append(m.training))
    off.iteration(lambda: batch, g)
    assert set(modes["student"]) == {False}  # eval mode in the fake's data and in the student's own step
    assert set(modes["fake"]) == {True, False}  # trains with dropout; queried in eval mode by the student step
    modes["student"].clear()
    on.iteration(lambda: batch, g)
    assert modes["student"] == [False, True]  # the fake's data in eval mode; dropout in the student's own step
    with pytest.raises(ValueError, match="order must be one of fake-first, student-first"):
        DistillJob(denoiser(1), div, EDMLoss(), order="fake-last")


def test_first_fake_update_reuses_the_student_steps_outputs():
    """``order="student-first"`` (DMD2's): the student step, then the fake step on its detached outputs at the σ that
    made them (no second student forward, no second batch); further fake updates draw fresh batches."""
    def no_dropout_job():
        return one_fake_update_job("student-first")

    job = no_dropout_job()
    batches, drawn, next_batch = counted_batches()
    student_before = {k: v.clone() for k, v in job.student.module.state_dict().items()}
    fake_before = {k: v.clone() for k, v in job.fake.module.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    stats = job.iteration(next_batch, g)
    assert drawn == [0]  # one real batch per iteration with fake_updates=1

    # replay: the student's outputs with its pre-update weights, then the fake loss at the same σ and noise
    replay = no_dropout_job()
    replay.student.module.load_state_dict(student_before)
    replay.fake.module.load_state_dict(fake_before)
    g = torch.Generator().manual_seed(0)
    outputs = []
    with torch.no_grad():
        from dpdm.core.train.distill import student_loss

        student_loss(replay.student.module, replay.teacher, replay.fake.module, replay.divergence, batches[0],
                     None, g, outputs)
        x0_hat, sigma_in, _ = outputs[0]
        want = EDMLoss()(replay.fake.module, x0_hat, generator=g,
                         sigma=replay.divergence.renoise_sigma(sigma_in, g)).mean()
    assert stats["fake_loss"] == pytest.approx(float(want), rel=1e-6)

    job2 = distill_job(fake_updates=3, accum=2, order="student-first")
    count = []
    job2.iteration(lambda: (count.append(1), (batches[0], None))[1], torch.Generator().manual_seed(0))
    assert len(count) == 2 * (1 + 2)  # accum x (student step + the two fake updates that draw fresh batches)


def test_frozen_call_turns_off_the_autocast_weight_cache():
    from dpdm.core.train.precision import frozen_call

    with frozen_call():
        assert torch.is_autocast_cache_enabled()  # outside autocast: nothing changes
    with Precision("bf16", "cpu").autocast():
        assert torch.is_autocast_cache_enabled()
        with frozen_call():
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            assert not torch.is_autocast_cache_enabled()
        assert torch.is_autocast_cache_enabled()
