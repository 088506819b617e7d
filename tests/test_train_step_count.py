"""``benchmarks/train_step.py --count`` (issue #16): each job's peak of live tensors, counted, against what the job
holds by construction. On the ``mlp`` preset at a tiny batch the activations are a few KiB, so the peaks differ by
the state alone: a DPDM iteration with a full fake score holds four more copies of the network than a teacher step
(the teacher itself, the fake score and its two Adam moments), with adapters one copy and the adapters three times
(teacher, adapters, their Adam moments; the student's gradients are the peak's, as the teacher step's)."""

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train_step():
    spec = importlib.util.spec_from_file_location("train_step_tool", ROOT / "benchmarks" / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_counted_peaks_differ_by_the_state_each_job_holds(train_step):
    torch.set_num_threads(1)
    common = {"preset": "mlp", "device": "cpu", "batch": 4, "precision": "fp32", "iters": 1, "warmup": 1,
              "count": True}
    teacher = train_step.measure("teacher", **common)
    full = train_step.measure("dpdm", **common)
    lora = train_step.measure("dpdm", lora_rank=4, **common)
    mib = 2**20
    p = teacher["params_m"] * 1e6 * 4 / mib  # one fp32 copy of the network, MiB
    a = lora["trained_m"] * 1e6 * 4 / mib  # the adapters
    assert 0 < a < p / 5
    activations = 0.002 * p  # what else may differ between the jobs: batch-sized tensors, bytes here
    extra_full = full["counted"]["peak_mib"] - teacher["counted"]["peak_mib"]
    extra_lora = lora["counted"]["peak_mib"] - teacher["counted"]["peak_mib"]
    assert extra_full == pytest.approx(4 * p, abs=activations)
    assert extra_lora == pytest.approx(p + 3 * a, abs=activations)
    # alive before the first step: the teacher step's model and EMA; DPDM's teacher, student, EMA and fake score
    assert full["counted"]["start_mib"] - teacher["counted"]["start_mib"] == pytest.approx(2 * p, abs=activations)
    assert lora["counted"]["start_mib"] - teacher["counted"]["start_mib"] == pytest.approx(p + a, abs=activations)


@pytest.mark.slow  # a subprocess per job and batch
def test_the_peak_predicted_from_small_batches_is_the_peak_counted_at_a_larger_one(train_step, tmp_path, capsys):
    train_step.main(["--count", "--backbone", "mlp", "--batches", "8,16", "--predict", "256", "--lora-ranks", "4",
                     "--both-ranks", "", "--score-chunks", "0", "--ema", "on", "--threads", "1",
                     "--out", str(tmp_path / "c.json")])
    out = capsys.readouterr().out
    assert "| mlp | on | lora r=4 |" in out and "batch 256 (fit)" in out and "≤1.10×:" in out
    jobs = json.loads((tmp_path / "c.json").read_text())["results"][0]["jobs"]
    assert all(j["fit"]["max_residual_mib"] < 0.01 for j in jobs.values())  # op by op, a line in the batch
    # the direct count in a fresh interpreter too, as the fit's were: this process holds tensors earlier tests left
    # alive, which a count counts (0.12 MiB once on CI)
    args = argparse.Namespace(precision="fp32", warmup=1, threads=1)
    for name, kind, rank in (("teacher", "teacher", None), ("dpdm", "dpdm", None), ("lora4", "dpdm", 4)):
        counted = train_step.run_case((kind, rank, True, False, 0), "mlp", args, "cpu", 256, 1, count=True)["counted"]
        small = jobs[name]["by_batch"]["16"]["counted"]["peak_mib"]
        assert counted["peak_mib"] > small * 1.1, name  # the batch's share of the peak is visible at 256
        assert jobs[name]["fit"]["predicted_mib"] == pytest.approx(counted["peak_mib"], rel=0.001), name
