"""The fake score as low-rank adapters on the frozen teacher (issue #16, ``train.fake_lora``, ``train/lora.py``).

Checked on every backbone we ship: the adapted fake score holds no tensor of its own but the adapters (the teacher's
weights and buffers are the same storage), computes the teacher's function to the bit at initialisation (so the
student's gradient is exactly zero, as with a full copy, and not zero once the adapters move), and its gradient
flows into the adapters only. Also: what a job holds (parameters and Adam states, counted), the merged checkpoint
loading as a plain denoiser, targets, and a whole ``dpdm run`` with ``dpdm sample --model fake``. Resume to the bit
and 2-rank DDP are in ``test_engine.py``/``test_distributed.py`` (the ``student-lora`` job) and ``test_resume.py``.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from dpdm.core.config.recipe import load_recipe
from dpdm.core.errors import ConfigError, DpdmError
from dpdm.core.io.checkpoint import build_denoiser, load_denoiser, network_spec, save_denoiser
from dpdm.core.losses import EDMLoss
from dpdm.core.divergences import SmoothedKL
from dpdm.core.pipeline.preflight import preflight
from dpdm.core.sigmas import SigmaDist
from dpdm.core.train import distill
from dpdm.core.train.distill import DistillJob, student_loss
from dpdm.core.train.lora import (LoraError, LowRank, adapted_copy, adapted_layers, adapter_parameters, layers,
                                  merged_state_dict, targeted)
from test_rundir import TINY, TOY2D, invoke, sets

torch.set_num_threads(1)

LABELS = 3
# every backbone dpdm-nets ships, small, conditional where the backbone takes labels (embedding tables adapted too)
BACKBONES = {
    "mlp": ((2,), 0, {"hidden": 16, "depth": 1, "emb_dim": 8}),
    "unet-small": ((1, 8, 8), LABELS, {"channels": 8, "emb_dim": 8, "num_blocks": 1}),
    "edm-songunet": ((1, 8, 8), LABELS, {"model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1,
                                         "attn_resolutions": [4]}),
    "edm-dhariwal": ((1, 8, 8), LABELS, {"model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1,
                                         "attn_resolutions": [4]}),
    "dit": ((1, 8, 8), LABELS, {"hidden": 16, "depth": 1, "num_heads": 2}),
    "stylegan2": ((1, 16, 16), LABELS, {"channels": 8, "channel_max": 16, "w_dim": 16, "mapping_layers": 2}),
}
DIVERGENCE = SmoothedKL(SigmaDist("log-uniform", min=0.01, max=10.0))


def teacher_of(name: str, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """A backbone's denoiser with every tensor random (zero-initialised output layers would make gradients vanish
    for a reason of their own)."""
    shape, label_dim, options = BACKBONES[name]
    spec = network_spec({"name": name, **options}, {"name": "edm", "sigma_data": 0.5}, shape, label_dim)
    torch.manual_seed(seed)
    model = build_denoiser(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.2)
    return model.eval(), spec


def batch(spec: dict, n: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *spec["shape"], generator=g).clamp(-1, 1)
    labels = torch.nn.functional.one_hot(torch.arange(n) % LABELS, LABELS).float() if spec["label_dim"] else None
    return x, labels


def storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_an_adapted_fake_shares_the_teachers_tensors_and_starts_equal_to_it(name):
    teacher, spec = teacher_of(name)
    fake = adapted_copy(teacher, rank=2)
    adapters = {id(p) for p in adapter_parameters(fake)}
    own = {id(t) for t in (*teacher.parameters(), *teacher.buffers())}
    assert adapted_layers(fake) == layers(teacher) and len(adapters) == 2 * len(layers(teacher)) > 0
    assert all(id(t) in own for t in (*fake.parameters(), *fake.buffers()) if id(t) not in adapters)
    assert not any(p.requires_grad for p in teacher.parameters())
    x, labels = batch(spec)
    sigma = torch.tensor([0.02, 0.5, 3.0, 40.0])
    with torch.no_grad():
        assert torch.equal(fake.eval()(x, sigma, class_labels=labels), teacher(x, sigma, class_labels=labels))


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_the_students_gradient_is_zero_at_initialisation_and_the_fake_trains_only_its_adapters(name):
    teacher, spec = teacher_of(name)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    job = DistillJob(teacher, DIVERGENCE, EDMLoss(), fake_lora={"rank": 2}, lr=1e-3, fake_lr=1e-2)
    x, labels = batch(spec)

    def student_grads():
        job.student.module.zero_grad(set_to_none=True)
        loss = student_loss(job.student.module, job.teacher, job.fake.module.eval(), DIVERGENCE, x, labels,
                            torch.Generator().manual_seed(3))
        loss.mean().backward()
        return [p.grad for p in job.student.module.parameters() if p.grad is not None]

    grads = student_grads()
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)  # fake == teacher to the bit

    # one fake-score step: gradients reach the adapters and nothing else; the teacher is untouched
    seen = {}
    hooks = [p.register_hook(lambda g, n=n: seen.setdefault(n, g)) for n, p in job.fake.module.named_parameters()
             if p.requires_grad]
    stats = job.fake_step(lambda: (x, labels), torch.Generator().manual_seed(4))
    for h in hooks:
        h.remove()
    assert stats["applied"] and seen and all(".parametrizations.weight.0." in n for n in seen)
    assert sorted(seen) == sorted(n for n, p in job.fake.module.named_parameters() if p.requires_grad)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert any(torch.count_nonzero(m.B) for m in job.fake.module.modules() if hasattr(m, "B"))
    # the moved adapters now make the fake differ from the teacher: the zero above was not vacuous
    assert any(torch.count_nonzero(g) for g in student_grads())


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_a_training_forward_keeps_no_merged_weight_for_the_backward_which_is_unchanged(name, monkeypatch):
    """fp32: autograd would keep each merged weight W' (an extra copy of the adapted weights) until the backward;
    ``RecomputeMerged`` remakes them there instead, to the same gradients bit for bit."""
    import weakref

    from dpdm.core.train.lora import LowRank

    teacher, spec = teacher_of(name)
    x, labels = batch(spec)
    sigma = torch.tensor([0.1, 1.0, 5.0, 20.0])
    grads, kept = {}, {}
    for recompute in (True, False):
        torch.manual_seed(1)
        fake = adapted_copy(teacher, rank=2, recompute=recompute).train()
        with torch.no_grad():
            for q in adapter_parameters(fake):
                q.normal_(0, 0.05)
        made, forward = [], LowRank.forward
        monkeypatch.setattr(LowRank, "forward", lambda self, w: made.append(weakref.ref(out := forward(self, w))) or out)
        loss = fake(x, sigma, class_labels=labels).square().mean()
        monkeypatch.setattr(LowRank, "forward", forward)
        kept[recompute] = sum(ref() is not None for ref in made)  # W' still referenced (by the graph) after forward
        loss.backward()
        grads[recompute] = [q.grad for q in adapter_parameters(fake)]
    assert kept[True] == 0 < kept[False]  # without the hooks the graph holds W' tensors: the test can fail
    assert all(torch.equal(a, b) for a, b in zip(grads[True], grads[False]))


@pytest.mark.parametrize("name", ["edm-songunet", "edm-dhariwal"])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_a_layer_merges_its_weight_once_per_call(name, grad, monkeypatch):
    """EDM's Conv2d reads ``self.weight`` twice per call: without the per-call memo each conv merged twice."""
    merges = {}
    real = LowRank.merge
    monkeypatch.setattr(LowRank, "merge", lambda self, w: merges.update({id(self): merges.get(id(self), 0) + 1})
                        or real(self, w))
    teacher, spec = teacher_of(name)
    fake = adapted_copy(teacher, rank=2)
    merges.clear()  # registering a parametrization evaluates it once
    x, labels = batch(spec)
    with torch.set_grad_enabled(grad):
        out = fake(x, torch.ones(len(x)), class_labels=labels)
    assert len(merges) == len(adapted_layers(fake)) and set(merges.values()) == {1}
    if grad:  # the backward remakes each saved merge (RecomputeMerged), and nothing is left kept
        out.square().sum().backward()
        assert all(m._merged is None and m._depth == 0 for m in fake.modules() if isinstance(m, LowRank))


def _held(*modules) -> int:
    """Elements of the distinct storages the modules' parameters and buffers live in."""
    seen = {}
    for m in modules:
        for t in (*m.parameters(), *m.buffers()):
            seen[storage(t)] = t.untyped_storage().nbytes() // t.element_size()
    return sum(seen.values())


def _adam_elements(optimizer) -> int:
    return sum(v.numel() for s in optimizer.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq"))


def test_what_a_job_holds_full_copy_against_adapters():
    teacher, spec = teacher_of("edm-songunet")
    w = sum(p.numel() for p in teacher.parameters()) + sum(b.numel() for b in teacher.buffers())
    p = sum(p.numel() for p in teacher.parameters())
    x, _ = batch(spec)
    labels = batch(spec)[1]
    jobs = {}
    for kind, lora in (("full", None), ("lora", {"rank": 4})):
        job = DistillJob(teacher_of("edm-songunet")[0], DIVERGENCE, EDMLoss(), fake_lora=lora,
                         ema_halflife_nimg=100)
        job.iteration(lambda: (x, labels), torch.Generator().manual_seed(0))  # Adam's states exist after a step
        jobs[kind] = job
    full, lora = jobs["full"], jobs["lora"]
    a = sum(t.numel() for t in adapter_parameters(lora.fake.module))
    assert 0 < a < p / 4  # (tiny layers; a rank-r adapter on an out x in weight holds r(out + in))
    # weights: teacher, student, fake, EMA (4 copies) against teacher (shared with the fake), student, EMA + adapters
    assert _held(full.teacher, full.student.module, full.fake.module, full.ema.model) == 4 * w
    assert _held(lora.teacher, lora.student.module, lora.fake.module, lora.ema.model) == 3 * w + a
    # Adam's two moments: the student's and the whole fake's, against the student's and the adapters'
    assert _adam_elements(full.student.optimizer) == _adam_elements(full.fake.optimizer) == 2 * p
    assert _adam_elements(lora.fake.optimizer) == 2 * a
    assert [id(q) for q in lora.fake.params] == [id(q) for q in adapter_parameters(lora.fake.module)]
    # the snapshot keeps the adapters alone for the fake score
    saved = lora.weights()["fake"].state_dict()
    assert sum(t.numel() for t in saved.values()) == a and all(".parametrizations.weight.0." in k for k in saved)


def test_a_student_as_adapters_shares_the_teacher_with_its_ema_and_the_fake():
    teacher, spec = teacher_of("edm-songunet")
    w = sum(t.numel() for t in (*teacher.parameters(), *teacher.buffers()))
    job = DistillJob(teacher, DIVERGENCE, EDMLoss(), fake_lora={"rank": 2}, student_lora={"rank": 3},
                     ema_halflife_nimg=100)
    x, labels = batch(spec)
    a_student, a_fake = (sum(t.numel() for t in adapter_parameters(m)) for m in (job.student.module, job.fake.module))
    assert a_student > a_fake > 0
    # one copy of the teacher's tensors for all four models; the EMA copies the student's adapters alone
    assert _held(job.teacher, job.student.module, job.ema.model, job.fake.module) == w + 2 * a_student + a_fake
    with torch.no_grad():
        sigma = torch.tensor([0.1, 1.0, 5.0, 20.0])
        want = teacher(x, sigma, class_labels=labels)
        assert torch.equal(job.student.module.eval()(x, sigma, class_labels=labels), want)
        assert torch.equal(job.ema.model(x, sigma, class_labels=labels), want)
    job.iteration(lambda: (x, labels), torch.Generator().manual_seed(0))
    assert _adam_elements(job.student.optimizer) == 2 * a_student and _adam_elements(job.fake.optimizer) == 2 * a_fake
    # the EMA followed the student's adapters, and only them moved
    ema_b = [m.B for m in job.ema.model.modules() if hasattr(m, "B")]
    assert any(torch.count_nonzero(b) for b in ema_b)
    assert {k for k in job.weights()} == {"student", "ema", "fake"}
    assert all(all(".parametrizations.weight.0." in k for k in m.state_dict()) for m in job.weights().values())
    with pytest.raises(ValueError, match="give either student .* or student_lora"):
        DistillJob(teacher, DIVERGENCE, EDMLoss(), student=teacher_of("edm-songunet")[0], student_lora={"rank": 2})


def test_the_merged_fake_loads_as_a_plain_denoiser(tmp_path):
    teacher, spec = teacher_of("edm-songunet")
    fake = adapted_copy(teacher, rank=3, alpha=6.0)
    with torch.no_grad():
        for q in adapter_parameters(fake):
            q.normal_(0, 0.1)
    url = str(tmp_path / "fake.safetensors")
    save_denoiser(url, merged_state_dict(fake), spec, {"role": "fake"})
    loaded = load_denoiser(url)
    x, labels = batch(spec)
    sigma = torch.tensor([0.1, 1.0, 5.0, 20.0])
    with torch.no_grad():
        want, got = fake.eval()(x, sigma, class_labels=labels), loaded(x, sigma, class_labels=labels)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got, teacher(x, sigma, class_labels=labels), atol=1e-3)


def test_targets_choose_layers_by_glob_and_a_pattern_that_matches_none_is_named():
    teacher, _ = teacher_of("edm-songunet")
    attention = targeted(teacher, ["*qkv", "*proj"])
    assert attention and all(n.endswith(("qkv", "proj")) for n in attention)
    fake = adapted_copy(teacher, rank=2, targets=["*qkv"])
    assert adapted_layers(fake) == [n for n in layers(teacher) if n.endswith("qkv")]
    with pytest.raises(LoraError) as info:
        targeted(teacher, ["*qkv", "*nope*"])
    assert "'*nope*' match no layer with a weight matrix" in str(info.value)
    assert "model.map_layer0" in str(info.value)  # names some that exist
    with pytest.raises(LoraError, match="rank must be at least 1"):
        adapted_copy(teacher, rank=0)
    with pytest.raises(ValueError, match="not both"):
        DistillJob(teacher, DIVERGENCE, EDMLoss(), fake=teacher_of("edm-songunet")[0], fake_lora={"rank": 2})


def test_a_recipe_with_targets_that_match_nothing_fails_its_preflight():
    recipe = load_recipe(TOY2D, [*TINY, "train.fake_lora={rank: 2, targets: ['*attn*']}",
                                 "train.student_lora={targets: ['*blocks.0*', '*qkv']}"])
    with pytest.raises(ConfigError) as info:
        preflight(recipe, check_metric=False)
    assert "recipe.train.fake_lora: targets '*attn*' match no layer with a weight matrix" in str(info.value)
    assert "recipe.train.student_lora: targets '*qkv' match no layer with a weight matrix" in str(info.value)
    recipe = load_recipe(TOY2D, [*TINY, "train.student_lora={rank: 2}", "train.student={backbone: {name: mlp}}"])
    with pytest.raises(ConfigError) as info:
        preflight(recipe, check_metric=False)
    assert ("recipe.train: student_lora puts adapters on the teacher's network, student names a network of its own "
            "trained from scratch; keep one of them") in str(info.value)
    with pytest.raises(DpdmError, match="rank: must be at least 1"):
        load_recipe(TOY2D, ["train.fake_lora={rank: 0}"])


@pytest.mark.parametrize("adapted", [("fake",), ("student", "fake")])
def test_a_run_with_adapters_snapshots_them_alone_and_saves_merged_checkpoints(adapted, tmp_path, monkeypatch):
    out = tmp_path / "run"
    loras = [f"train.{name}_lora={{rank: 2, alpha: 4}}" for name in adapted]
    chunks = []  # engine.score_chunk (test_score_chunk.py) reaches the student step of a run
    real_in_chunks = distill.in_chunks
    monkeypatch.setattr(distill, "in_chunks", lambda *a: chunks.append(a[-1]) or real_in_chunks(*a))
    result = invoke("run", TOY2D, *sets([*TINY, *loras, "train.ema_halflife_nimg=100", "engine.checkpoint.every=1",
                                         "engine.score_chunk=3"]), "--out", out)
    assert result.exit_code == 0, result.output
    assert chunks and set(chunks) == {3}
    snap = sorted((out / "checkpoints" / "train" / "student").glob("ckpt-*"))[-1] / "weights.safetensors"
    saved = {"student": ("student", "ema"), "fake": ("fake",)}
    with safe_open(str(snap), "pt") as f:
        keys = list(f.keys())
    for name in ("student", "ema", "fake"):  # the adapted models' adapters only; the others whole
        own = [k for k in keys if k.startswith(f"{name}.")]
        lora = any(name in saved[a] for a in adapted)
        assert own and all((".parametrizations.weight.0." in k) == lora for k in own), name
    teacher = load_denoiser(str(out / "checkpoints" / "teacher.safetensors"))
    x, s = torch.randn(8, 2), torch.full((8,), 1.0)
    for name in ("student", "fake"):
        path = out / "checkpoints" / f"{name}.safetensors"
        with safe_open(str(path), "pt") as f:
            extra = json.loads(f.metadata()["extra"])
            assert not any("parametrizations" in k for k in f.keys())
        assert ("lora" in extra) == (name in adapted)
        if name in adapted:
            assert extra["lora"] == {"rank": 2, "alpha": 4, "targets": ["*"], "merged": True}
        with torch.no_grad():  # trained, and (if adapted) merged into the teacher's weights
            assert not torch.equal(load_denoiser(str(path))(x, s), teacher(x, s)), name
    report = json.loads((out / "report.json").read_text())
    assert all(v == v for v in report["sweep"]["student"][next(iter(report["sweep"]["student"]))].values())
    png = tmp_path / "fake.png"
    result = invoke("sample", "--run", out, "--model", "fake", "--num", 16, "--out", png)
    assert result.exit_code == 0, result.output
    assert png.stat().st_size > 0


def test_adapters_are_part_of_the_training_identity_only_when_set():
    from dpdm.core.config.identity import config_changes, config_hash, training_config

    plain = load_recipe(TOY2D)
    assert "fake_lora" not in training_config(plain)["train"]  # runs from before the option keep their hash
    assert "student_lora" not in training_config(plain)["train"]
    r16, r4 = (load_recipe(TOY2D, [f"train.fake_lora={{rank: {r}}}"]) for r in (16, 4))
    assert config_hash(r16) != config_hash(plain) != config_hash(r4)
    assert config_changes(training_config(r16), training_config(r4)) == ["recipe.train.fake_lora.rank"]
    assert config_changes(training_config(plain), training_config(r4)) == ["recipe.train.fake_lora"]
