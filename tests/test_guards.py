"""The divergence guard (``train.guards.LossGuard``, recipe ``engine.loss_guard``) on synthetic loss sequences and
in the engine, and a tiny diverging ``dpdm run`` that stops with the message and a non-zero exit."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from dpdm.core.config.recipe import load_recipe
from dpdm.core.errors import ConfigError, DpdmError
from dpdm.core.losses import EDMLoss
from dpdm.core.train.engine import Trainer
from dpdm.core.train.guards import LossDiverged, LossGuard
from dpdm.core.train.snapshots import Snapshots
from dpdm.core.train.teacher import TeacherJob

from test_engine import Poisoned, denoiser

TOY2D = str(Path(__file__).resolve().parent.parent / "recipes" / "toy2d.yaml")


def first_trip(guard: LossGuard, values, key: str = "loss"):
    """``(iteration, verdict)`` of the first iteration (1-based) at which ``guard`` trips on ``values``, else None."""
    for i, v in enumerate(values, 1):
        verdict = guard.update({key: v})
        if verdict is not None:
            return i, verdict
    return None


def noisy_decreasing(n: int, seed: int = 0):
    """A normal training loss: decreasing from 3 to 0.3, log-normal noise of ~30%, occasional 10x spikes."""
    rng = random.Random(seed)
    return [3.0 * 10 ** (-i / n) * math.exp(rng.gauss(0, 0.3)) * (10 if rng.random() < 0.01 else 1)
            for i in range(n)]


def test_a_normal_noisy_decreasing_loss_never_trips():
    for seed in range(5):
        assert first_trip(LossGuard(), noisy_decreasing(5000, seed)) is None


def test_a_single_spike_or_a_burst_shorter_than_patience_does_not_trip():
    base = noisy_decreasing(1000)
    spiky = base[:500] + [1e9] + base[500:]
    burst = base[:500] + [1e9] * 49 + base[500:]
    assert first_trip(LossGuard(patience=50), spiky) is None
    assert first_trip(LossGuard(patience=50), burst) is None


def test_a_loss_that_runs_away_trips_after_patience_steps():
    base = noisy_decreasing(300)
    diverging = base + [100.0 * 10**k for k in range(1, 17)] + [1e16] * 200  # 1000x, 10000x, ... then it stays
    at, verdict = first_trip(LossGuard(factor=1e3, patience=50), diverging)
    assert at == 300 + 50 and verdict["key"] == "loss" and verdict["since"] == 49
    assert 0.3 < verdict["median"] < 3  # the healthy level, not the diverged one


def test_the_median_is_not_dragged_up_by_the_divergence_nor_by_early_blowups():
    """Outliers stay out of the window: a loss stuck at its diverged level keeps tripping, and one that blows up
    at the second step (a student lr of 1e3 on toy2d: the fake loss went from 1.6 to 7e13) is caught too."""
    at, verdict = first_trip(LossGuard(), [1.58] + [7e13, 9e13, 8e13] * 100, key="fake_loss")
    assert at == 51 and verdict["median"] == 1.58
    at, _ = first_trip(LossGuard(window=200, patience=50, warmup=20), [1.0] * 20 + [1e8] * 400)
    assert at == 70


def test_non_finite_values_are_left_to_the_nonfinite_guard():
    values = [1.0] * 50 + [math.nan, math.inf] * 100
    assert first_trip(LossGuard(patience=5), values) is None


def test_each_loss_has_its_own_median_and_the_student_surrogate_is_not_watched():
    guard = LossGuard(patience=3, keys=("loss", "fake_loss"))
    for _ in range(10):
        assert guard.update({"loss": 2e-4, "fake_loss": 3.0, "student_loss": 0.0}) is None
    # the student surrogate starts near 0 and may rise by orders of magnitude as the fake score leaves the teacher
    verdicts = [guard.update({"loss": 1.0, "fake_loss": 3.0, "student_loss": 1.0}) for _ in range(3)]
    assert verdicts[:2] == [None, None] and verdicts[2]["key"] == "loss"  # 5000x its median
    assert LossGuard().keys == ("loss", "fake_loss")


def test_bad_settings_are_refused():
    with pytest.raises(DpdmError, match="factor must be > 1"):
        LossGuard(factor=1.0)
    with pytest.raises(ConfigError) as info:
        load_recipe(TOY2D, ["engine.loss_guard.factor=0.5", "engine.loss_guard.patience=0"])
    assert "recipe.engine.loss_guard.factor: must be above 1, got 0.5" in str(info.value)
    assert "recipe.engine.loss_guard.patience: must be at least 1, got 0" in str(info.value)
    assert load_recipe(TOY2D, ["engine.loss_guard=null"]).engine.loss_guard is None
    assert load_recipe(TOY2D).engine.loss_guard.factor == 1e3


class Exploding:
    """A teacher job whose loss is 1, then from iteration ``at`` on 1e12 (finite): a run that diverged."""

    def __init__(self, at: int):
        self.job = TeacherJob(denoiser(0), EDMLoss(), lr=1e-2)
        self.at, self.n = at, 0

    def __getattr__(self, name):
        return getattr(self.job, name)

    def iteration(self, next_batch, generator):
        self.n += 1
        stats = self.job.iteration(next_batch, generator)
        return {**stats, "loss": 1e12 if self.n >= self.at else 1.0}


def test_the_trainer_stops_with_the_newest_checkpoint_and_the_learning_rate(tmp_path):
    snaps = Snapshots(str(tmp_path / "snaps"))
    trainer = Trainer(Exploding(at=8), Poisoned(()), snapshots=snaps, save_every=5,
                      loss_guard=LossGuard(patience=4, warmup=3))
    with pytest.raises(LossDiverged) as info:
        trainer.fit(100)
    message = str(info.value)
    assert trainer.step == 11
    assert message.startswith("teacher training stopped at step 11: the loss diverged: 1e+12, more than 1000x its "
                              "running median (1) in 4 consecutive steps since step 8")
    assert f"the newest checkpoint, {snaps.latest()}, was saved after the divergence began" in message
    assert snaps.latest().endswith("ckpt-000000010")
    assert "lower learning rate (now model 0.01)" in message and "engine.loss_guard=null" in message


def test_a_checkpoint_saved_before_the_divergence_is_named_the_last_good_one(tmp_path):
    snaps = Snapshots(str(tmp_path / "snaps"))
    trainer = Trainer(Exploding(at=8), Poisoned(()), snapshots=snaps, save_every=5, loss_guard=LossGuard(patience=2))
    with pytest.raises(LossDiverged) as info:
        trainer.fit(100)
    assert trainer.step == 9 and snaps.latest().endswith("ckpt-000000005")
    assert f"the last good checkpoint is {snaps.latest()}. Try a lower learning rate" in str(info.value)


def test_a_tiny_diverging_run_exits_non_zero_with_the_message(tmp_path):
    sets = ["teacher.train.steps=5", "teacher.train.batch_size=64", "train.steps=20", "train.batch_size=32",
            "train.fake_updates=1", "train.lr=1e3", "model.backbone.hidden=16", "model.backbone.depth=1",
            "engine.loss_guard.patience=5", "engine.checkpoint.every=4",
            "eval.num_samples=64", "eval.teacher_nfe=[1]", "eval.student_steps=[1]", "eval.teacher_samplers=[euler]"]
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"}
    proc = subprocess.run([sys.executable, "-m", "dpdm.cli", "run", TOY2D, *[a for s in sets for a in ("--set", s)],
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    message = " ".join(proc.stderr.split())
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "error: student training stopped at step 6: the fake_loss diverged" in message, message[-3000:]
    assert "since step 2" in message and "was saved after the divergence began" in message
    assert "Try a lower learning rate (now student 1000, fake 0.0001)" in message
    assert "Traceback" not in proc.stderr
    assert not (out / "report.json").exists() and not (out / ".lock").exists()


def test_a_resumed_run_keeps_the_guards_medians_and_streaks(tmp_path):
    """Stopped with 3 of 4 outliers seen (steps 8-10), the resumed run trips at step 11 as the uninterrupted one
    does; a guard starting empty would take the runaway loss for its reference and never trip."""
    snaps = Snapshots(str(tmp_path / "snaps"))
    first = Trainer(Exploding(at=8), Poisoned(()), snapshots=snaps, save_every=5,
                    loss_guard=LossGuard(patience=4, warmup=3))
    first.fit(10)
    assert snaps.latest().endswith("ckpt-000000010") and first.loss_guard.streak["loss"] == 3
    again = Trainer(Exploding(at=1), Poisoned(()), snapshots=snaps, save_every=5,
                    loss_guard=LossGuard(patience=4, warmup=3))
    assert again.resume()
    assert again.loss_guard.state_dict() == first.loss_guard.state_dict()
    with pytest.raises(LossDiverged) as info:
        again.fit(100)
    assert again.step == 11 and "in 4 consecutive steps since step 8" in str(info.value)
