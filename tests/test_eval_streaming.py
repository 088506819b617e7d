"""One streaming evaluation engine (``eval/protocols.py``, ``eval/references.py``): real data is read item by item
as seeded subsets, never as a whole split; results do not depend on the batch size; energy on many images is refused
before training; the training sample grids draw through the engine with the recipe's sampler options."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dpdm.core.config.components import Component
from dpdm.core.config.recipe import load_recipe
from dpdm.core.datasets import TensorDataset, to_model
from dpdm.core.errors import ConfigError
from dpdm.core.eval import generation, protocols, recovery, references
from dpdm.core.io.checkpoint import build_denoiser, network_spec
from dpdm.core.plugins.registry import get
from dpdm.core.progress import Progress
from dpdm.core.pipeline.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent
DIGITS = str(ROOT / "recipes" / "digits.yaml")

torch.set_num_threads(1)


class NoWholeSplit(TensorDataset):
    """A dataset that refuses ``.tensors()`` (reading a whole split) and records every index it is asked for."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        super().__init__(torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8), None, label_dim=0,
                         kind="image", name="digits")
        self.read: list[int] = []

    def tensors(self):
        raise AssertionError("a whole split was read into memory")

    def __getitem__(self, i):
        self.read.append(int(i))
        return super().__getitem__(i)

    def __getitems__(self, indices):
        self.read.extend(int(i) for i in indices)
        return super().__getitems__(indices)


def tiny_net(seed: int = 0):
    torch.manual_seed(seed)
    spec = network_spec({"name": "mlp", "hidden": 16, "depth": 1}, {"name": "edm"}, (1, 8, 8), 0)
    return build_denoiser(spec).eval(), spec


def test_reference_sets_are_seeded_subsets_read_item_by_item():
    recipe = load_recipe(DIGITS)
    train, test = NoWholeSplit(300, 1), NoWholeSplit(120, 2)
    reference, validation = references.reference_sets(recipe, train, test, 50)
    assert train.read == test.read == []  # nothing is read before it is used
    want = sorted(torch.randperm(120, generator=torch.Generator().manual_seed(recipe.seed + 1000))[:50].tolist())
    assert list(reference.indices) == want
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(recipe.seed + 2000))[:50].tolist()
    assert list(validation.indices) == perm  # the permutation's order, as 0.1's run.references took it
    energy = get("metric", "energy")()
    data = protocols.prepare(energy, reference, batch_size=7)
    assert sorted(test.read) == want and len(data) == 50
    torch.testing.assert_close(data, to_model(test.data[want]), rtol=0, atol=0)
    everything, _ = references.reference_sets(recipe, train, test, 500)  # num covers the split: all, in order
    assert list(everything.indices) == list(range(120))


def test_recovery_items_and_training_reference_are_capped_subsets():
    recipe = load_recipe(DIGITS)
    train = NoWholeSplit(400, 3)
    items, note = recovery.select("paper", train, None, 30, seed=0)
    assert len(items) == 30 and note is None and train.read == []
    data, name = recovery.training_reference(recipe, train, get("metric", "energy")(), num_samples=50,
                                             exclude=items.indices)
    assert len(data) == 50 and len(train.read) == 50 and not set(train.read) & set(items.indices)
    assert name == "digits training split (50 random items of 370 (eval.num_samples), the other 30 are the noised ones)"


def test_in_run_evaluation_never_reads_a_whole_split(tmp_path, caplog):
    caplog.set_level("INFO", logger="dpdm")
    from dpdm.core.pipeline.evaluation import evaluate
    from dpdm.core.pipeline.preflight import Plan

    recipe = load_recipe(DIGITS, ["eval.num_samples=40", "eval.student_steps=[1]", "eval.teacher_nfe=[1]",
                                  "eval.teacher_samplers=[euler]", "eval.one_step_sigma_max=[80.0]",
                                  "eval.recovery_sigmas=[1.0]", "eval.recovery_num=10", "eval.figure_samples=4",
                                  "eval.batch_size=16", "train.steps=0"])
    train, test = NoWholeSplit(1000, 4), NoWholeSplit(500, 5)
    net, spec = tiny_net()
    plan = Plan(recipe, None, train, test, spec, spec, {}, torch.device("cpu"))
    report = evaluate(plan, net, net, "cpu", Progress(), RunDir(tmp_path))
    assert set(report["sweep"]) == {"student", "undistilled", "teacher"}
    # the reference (40 test items), the validation (40), the two real halves (2 × 40), the recovery items (10) and
    # their reference (40): each a subset, never the split
    assert len(set(test.read)) == 40
    assert len(set(train.read)) <= 40 + 80 + 10 + 40 < len(train)
    assert report["recovery_reference"] == "digits training split (40 random items of 990 (eval.num_samples), " \
                                           "the other 10 are the noised ones)"
    notes = [r.getMessage() for r in caplog.records if r.name == "dpdm.core.pipeline.evaluation"]
    assert "evaluate: energy compares with 40 random items of the 500-item test split (eval.num_samples)" in notes


@pytest.mark.parametrize("metric_name", ["energy", "sliced-wasserstein"])
def test_scores_do_not_depend_on_the_batch_size(metric_name):
    net, _ = tiny_net()
    metric = get("metric", metric_name)()
    reference = references.Items(NoWholeSplit(60, 6), range(60))
    sampler, sigmas = get("sampler", "euler"), get("schedule", "karras")(3)
    values = [protocols.score(net, sampler, sigmas, metric, reference, num=25, shape=(1, 8, 8), batch_size=b,
                              keep=None) for b in (1, 7, 25)]
    for value, items in values[1:]:
        assert value == pytest.approx(values[0][0], rel=1e-6)
        torch.testing.assert_close(items, values[0][1], rtol=1e-6, atol=1e-6)
    small = protocols.prepare(metric, reference, batch_size=4)
    torch.testing.assert_close(small, protocols.prepare(metric, reference, batch_size=60), rtol=0, atol=0)


def test_collector_gathers_in_position_order_and_keeps_the_first():
    collect = protocols.Collector(get("metric", "energy")(), keep=3)
    collect.add([4, 5], torch.full((2, 2), 2.0))
    collect.add([0, 1, 2, 3], torch.arange(8.0).reshape(4, 2))
    data = collect.value()
    assert data[:4].tolist() == torch.arange(8.0).reshape(4, 2).tolist() and data[4:].eq(2.0).all()
    assert collect.first().tolist() == data[:3].tolist()


def test_energy_on_many_images_is_refused_before_training():
    from dpdm.core.pipeline.preflight import preflight

    refusal = r"recipe\.eval\.metric: energy compares every pair.*eval\.metric\.max_samples"
    with pytest.raises(ConfigError, match=refusal):
        preflight(load_recipe(DIGITS, ["eval.num_samples=6000"]), DIGITS, check_metric=False)
    preflight(load_recipe(DIGITS, ["eval.num_samples=6000", "eval.metric.max_samples=2000"]), DIGITS,
              check_metric=False)
    preflight(load_recipe(str(ROOT / "recipes" / "toy2d.yaml"), ["eval.num_samples=6000"]), check_metric=False)


def test_sample_grid_draws_through_the_engine_with_the_samplers_options(monkeypatch, tmp_path):
    from dpdm.core.eval import hooks
    from dpdm.core.pipeline.training import RunContext
    from dpdm.core.train.distributed import Dist
    from dpdm.core.train.tracking import Tracker

    net, _ = tiny_net()
    churn = Component("heun", {"s_churn": 40.0, "s_noise": 1.0})
    calls = []
    real = protocols.score

    def spy(model, sample_fn, sigmas, *a, **kw):
        calls.append((sample_fn, sigmas))
        return real(model, sample_fn, sigmas, *a, **kw)

    monkeypatch.setattr(hooks, "score", spy)
    recipe = load_recipe(DIGITS, ["engine.sample_every=1", "eval.figure_samples=6"])
    context = RunContext(recipe, RunDir(tmp_path), Dist(), Progress(), Tracker(None), resume=False)
    grid = context.sample_grid(net, churn, Component("karras"), 3, (1, 8, 8), "image", 0)
    x = grid.draw(net)
    (sample_fn, sigmas), = calls
    assert sample_fn.keywords == {"s_churn": 40.0, "s_noise": 1.0}  # the recipe's options reach the call
    assert sigmas.tolist() == generation.schedule_for(net, {"name": "karras"})(3).tolist()
    plain = hooks.SampleGrid(1, tmp_path, sampler={"name": "heun"}, schedule={"name": "karras"}, steps=3,
                             shape=(1, 8, 8), kind="image", num=6).draw(net)
    assert x.shape == plain.shape == (6, 1, 8, 8) and not torch.equal(x, plain)
    _, want = real(net, generation.build_sampler(churn), sigmas, hooks._no_metric, None, num=6, shape=(1, 8, 8),
                   keep=None, batch_size=2)
    torch.testing.assert_close(x, want)


@pytest.mark.slow
def test_peak_memory_of_a_run_does_not_grow_with_its_image_zip(tmp_path):
    """A 2k-image and a 24k-image 32×32 ZIP: the whole run (training and in-run evaluation) within 1.25× peak RSS
    (``benchmarks/eval_memory.py``, each run in its own process)."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "eval_memory.py"), "--out",
                        str(tmp_path / "eval_memory.json")], env=env, capture_output=True, text=True, timeout=1800,
                       check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads((tmp_path / "eval_memory.json").read_text())
    assert result["ratio"] <= 1.25, result


def test_the_fd_classifier_trains_on_batches_never_the_whole_split():
    from dpdm.core.eval import classifier

    class Labelled(NoWholeSplit):
        def __init__(self, n: int, seed: int):
            super().__init__(n, seed)
            self.labels = torch.arange(n) % 3
            self.label_dim = 3

        def __getitems__(self, indices):
            x, _ = super().__getitems__(indices)
            return x, self.labels[list(indices)]

    train, test = Labelled(50, 7), Labelled(20, 8)
    net, acc = classifier.train_classifier(train, test, seed=0, epochs=2, batch_size=16)
    assert sorted(train.read) == sorted(list(range(50)) * 2)  # each epoch reads every item once, in batches
    assert sorted(test.read) == list(range(20)) and 0.0 <= acc <= 1.0
    again = Labelled(50, 7)
    net_b, acc_b = classifier.train_classifier(again, Labelled(20, 8), seed=0, epochs=2, batch_size=16)
    assert again.read == train.read and acc_b == acc  # the same seeded order of batches
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net_b.state_dict().values()))
