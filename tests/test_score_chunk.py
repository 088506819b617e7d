"""``engine.score_chunk`` (issue #16): the student step evaluates the teacher and the fake score, without gradients,
a chunk of the batch at a time, so that their activations never sit beside the whole student graph.

Checked: the outputs and the student's gradient are the one-call ones up to round-off; the models never see more
than a chunk; the peak of the tensors alive during a student step falls by exactly what the no-grad forward of the
rest of the batch holds (counted, not timed); bad values are refused; the option enters the training identity only
when set. Resume to the bit with it is in ``test_engine.py`` (the ``student-lora-chunked`` job); that a recipe's value
reaches the job, in ``test_lora.py``'s whole run.
"""

from __future__ import annotations

import pytest
import torch

from dpdm.core.config.recipe import load_recipe
from dpdm.core.errors import DpdmError
from dpdm.core.io.checkpoint import build_denoiser, network_spec
from dpdm.core.losses import EDMLoss
from dpdm.core.train.distill import DistillJob, in_chunks, student_loss
from dpdm.core.train.memory import TensorMemory
from test_lora import DIVERGENCE, batch, teacher_of
from test_rundir import TOY2D

torch.set_num_threads(1)


@pytest.mark.parametrize("name", ["mlp", "unet-small"])
def test_in_chunks_is_the_one_call_and_never_feeds_more_than_a_chunk(name):
    model, spec = teacher_of(name)
    x, labels = batch(spec, n=7)
    sigma = torch.linspace(0.1, 5.0, 7)
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(len(args[0])), with_kwargs=True)
    with torch.no_grad():
        whole = model(x, sigma, class_labels=labels)
        for chunk, sizes in ((1, [1] * 7), (3, [3, 3, 1]), (7, [7]), (100, [7]), (None, [7])):
            seen.clear()
            got = in_chunks(model, x, sigma, labels, chunk)
            assert seen == sizes, chunk
            torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-6)
        # each sample keeps its own σ and label: a chunk is not fed another chunk's
        torch.testing.assert_close(in_chunks(model, x, sigma.flip(0), labels, 2),
                                   model(x, sigma.flip(0), class_labels=labels), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(in_chunks(model, x, torch.tensor(2.0), labels, 3),  # a scalar σ is shared
                                   model(x, torch.full((7,), 2.0), class_labels=labels), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lora", [None, {"rank": 2}], ids=["full", "adapters"])
def test_a_chunked_student_step_is_the_whole_batch_step_up_to_round_off(lora):
    teacher, spec = teacher_of("unet-small")
    x, labels = batch(spec, n=6)
    job = DistillJob(teacher, DIVERGENCE, EDMLoss(), fake_lora=lora, score_chunk=4, lr=1e-3)
    job.iteration(lambda: (x, labels), torch.Generator().manual_seed(3))  # the fake moves: the gradient is not 0
    student, fake = job.student.module, job.fake.module.eval()
    params = [p for p in student.parameters() if p.requires_grad]
    grads = {}
    for chunk in (None, 4):
        loss = student_loss(student, job.teacher, fake, DIVERGENCE, x, labels, torch.Generator().manual_seed(5),
                            score_chunk=chunk)
        grads[chunk] = torch.cat([g.flatten() for g in torch.autograd.grad(loss.sum(), params)])
    assert grads[None].abs().max() > 0
    torch.testing.assert_close(grads[4], grads[None], rtol=1e-4, atol=1e-7)
    fed = []  # the job's own step: teacher and fake score see chunks of 4 and 2, the student the whole batch
    for name, m in (("teacher", job.teacher), ("fake", fake), ("student", student)):
        m.register_forward_pre_hook(lambda m, args, kwargs, name=name: fed.append((name, len(args[0]))),
                                    with_kwargs=True)
    job.student_step(lambda: (x, labels), torch.Generator().manual_seed(5))
    assert fed == [("student", 6), ("teacher", 4), ("teacher", 2), ("fake", 4), ("fake", 2)]


def test_chunks_lower_the_student_steps_peak_by_the_rest_of_the_batchs_forward():
    spec = network_spec({"name": "edm-songunet", "model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1,
                         "attn_resolutions": [8]}, {"name": "edm", "sigma_data": 0.5}, (1, 32, 32), 0)
    torch.manual_seed(0)
    teacher = build_denoiser(spec).eval()  # at 32x32 the activations, not the weights, are what a step holds
    x, _ = batch(spec, n=8)

    def forward_peak(n):
        with torch.no_grad(), TensorMemory() as live:
            teacher(x[:n], torch.ones(n))
        return live.growth

    peaks = {}
    for chunk in (None, 2):
        job = DistillJob(teacher, DIVERGENCE, EDMLoss(), fake_lora={"rank": 2}, score_chunk=chunk)
        g = torch.Generator().manual_seed(0)
        job.iteration(lambda: (x, None), g)  # Adam's states exist: the step below makes only transient tensors
        with TensorMemory() as live:
            job.student_step(lambda: (x, None), g)
        peaks[chunk] = live.growth
    saved, expected = peaks[None] - peaks[2], forward_peak(8) - forward_peak(2)
    assert expected > 0.05 * peaks[None]  # the no-grad forward is a visible part of the step's peak
    assert abs(saved - expected) < 0.05 * expected, (peaks, expected)


def test_bad_chunks_are_refused_and_the_option_is_in_the_identity_only_when_set():
    from dpdm.core.config.identity import config_changes, config_hash, training_config

    teacher, _ = teacher_of("mlp")
    with pytest.raises(ValueError, match="score_chunk must be >= 1 or None, got 0"):
        DistillJob(teacher, DIVERGENCE, EDMLoss(), score_chunk=0)
    with pytest.raises(DpdmError, match="score_chunk: must be at least 1"):
        load_recipe(TOY2D, ["engine.score_chunk=0"])
    plain, four, two = load_recipe(TOY2D), load_recipe(TOY2D, ["engine.score_chunk=4"]), \
        load_recipe(TOY2D, ["engine.score_chunk=2"])
    assert "score_chunk" not in training_config(plain)["engine"]  # runs from before the option keep their hash
    assert config_hash(plain) != config_hash(four) != config_hash(two)
    assert config_changes(training_config(four), training_config(two)) == ["recipe.engine.score_chunk"]
