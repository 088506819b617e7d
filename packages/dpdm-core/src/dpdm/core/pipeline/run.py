"""Running a recipe end to end: train (or load) the teacher, distill the DPDM student
(Algorithm 1), evaluate (NFE sweeps and Section 5.1 recovery), and write the run directory.

Both training phases run in ``engine.Trainer`` (single process, or every rank under torchrun) on
resumable batches (``dpdm.data.loader.Loader``); ``run(..., resume=True)`` continues each phase from
its newest complete snapshot, bit for bit on CPU. Rank 0 alone writes files other than snapshots and
evaluates. The run directory's layout, its lock and where it may live (a folder or an fsspec URL) are
``rundir.RunDir``'s.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from ..config.recipe import Recipe
from ..config.structure import dump_yaml
from ..eval.report import write_report
from ..io.checkpoint import load_checkpoint, load_denoiser, save_denoiser
from ..progress import Progress
from ..train.lora import plain_state_dict, scale_numerator
from ..train.distributed import Dist, init_dist
from ..train.tracking import Tracker
from .build import check_teacher_fits, student_spec
from .evaluation import evaluate
from .preflight import Plan, prefetch, preflight
from .rundir import CONFIG, RunDir
from .training import BASELINE_STREAM, RunContext, baseline_phase, lora_options, distill, train_teacher


def run(plan: Plan | Recipe, out: str | Path | RunDir, progress: Progress | None = None, *, dist: Dist | None = None,
        resume: bool = False) -> dict | None:
    """Run a recipe's ``plan`` (``preflight(recipe)``; a ``Recipe`` is checked here) into the run directory ``out``
    (a path or fsspec URL, or a ``RunDir``); returns the report (also written there) on rank 0, None on the other
    ranks. Under torchrun every rank calls this (``dist`` from ``distributed.init_dist``); rank 0 alone writes files
    other than snapshots and evaluates. ``resume``: continue from the newest complete training snapshot of each
    phase (``out``'s, or ``engine.checkpoint.dir``). Rank 0 claims ``out`` (``RunDir.claim``: its lock, and a refusal
    before any write if the run may not be written) unless the caller claimed it."""
    plan = plan if isinstance(plan, Plan) else preflight(plan)
    dist = dist or init_dist(plan.recipe.device)
    run_dir = out if isinstance(out, RunDir) else RunDir(out)
    with contextlib.ExitStack() as stack:
        if dist.is_main:
            if run_dir.lock is None:  # a library call: the same guard as `dpdm run`
                run_dir.claim(plan.recipe, resume=resume)
                stack.callback(run_dir.release)
            stack.callback(_publish_on_failure, run_dir)
        else:
            stack.callback(run_dir.discard)  # the other ranks stage nothing worth keeping
        report = _run(plan, run_dir, (progress or Progress()) if dist.is_main else Progress(), dist, resume)
        if dist.is_main:
            run_dir.publish()
    dist.barrier()
    return report


def _publish_on_failure(run_dir: RunDir) -> None:
    """Upload what a failed run staged (its log, figures) without hiding the failure; a no-op once published."""
    with contextlib.suppress(Exception):
        run_dir.publish()


def _run(plan: Plan, run_dir: RunDir, progress: Progress, dist: Dist, resume: bool) -> dict | None:
    """The run itself: config, both training phases (and baselines), checkpoints, evaluation, report."""
    recipe, train_set, spec = plan.recipe, plan.train_set, plan.spec
    if dist.is_main:
        prefetch(plan)
        run_dir.write_text(dump_yaml(recipe), CONFIG)
    dist.barrier()
    device = dist.device
    timings = {}
    with Tracker(run_dir.metrics_log, dist=dist, tensorboard=run_dir.tensorboard) as tracker:  # TB if installed
        phase = RunContext(recipe, run_dir, dist, progress, tracker, resume)
        t0 = time.perf_counter()
        if recipe.teacher.checkpoint:
            # the recipe's model: the network a bare state dict (torch.save(net.state_dict())) is loaded into
            teacher, spec = load_checkpoint(recipe.teacher.checkpoint, device=device, spec=spec)
            check_teacher_fits(spec, train_set, recipe.teacher.checkpoint)
        else:
            teacher = train_teacher(recipe, spec, train_set, phase)
        timings["teacher_s"] = time.perf_counter() - t0
        if dist.is_main:
            save_denoiser(run_dir.checkpoint("teacher"), teacher, spec, {"role": "teacher"})

        t0 = time.perf_counter()
        s_spec = student_spec(recipe, spec)  # the checkpoint's spec when the teacher was loaded
        job = distill(recipe, teacher, spec, train_set, phase, s_spec)
        timings["student_s"] = time.perf_counter() - t0

        baselines = {}
        for i, (name, base) in enumerate(recipe.baselines.items()):
            t0 = time.perf_counter()
            b_spec = student_spec(recipe, spec, base.train)
            b_job = distill(recipe, teacher, spec, train_set, phase, b_spec, cfg=base.train,
                            name=baseline_phase(name), stream=BASELINE_STREAM + i)
            baselines[name] = (b_job.model.eval(), b_spec, b_job.divergence)
            timings[f"baseline_{name}_s"] = time.perf_counter() - t0
    student = job.model.eval()
    if not dist.is_main:
        return None
    # adapted models (train.student_lora, fake_lora) are saved merged: each checkpoint loads as a plain denoiser
    save_denoiser(run_dir.checkpoint("student"), plain_state_dict(student), s_spec,
                  {"role": "student", "steps": recipe.train.steps, **lora_info(job.student_lora)})
    save_denoiser(run_dir.checkpoint("fake"), plain_state_dict(job.fake.module), spec,
                  {"role": "fake", **lora_info(job.fake_lora)})
    for name, (model, b_spec, _) in baselines.items():
        save_denoiser(run_dir.checkpoint(name), plain_state_dict(model), b_spec,
                      {"role": "baseline", "name": name, "steps": recipe.baselines[name].train.steps,
                       **lora_info(lora_options(recipe.baselines[name].train.student_lora))})
    report = evaluate(plan, teacher, student, device, progress, run_dir, baselines)
    report["timings"].update(timings)
    report["recipe"] = recipe.name
    report["world_size"] = dist.world_size
    if resume:  # the phase times then cover this process only, not the one that trained
        report["resumed"] = True
    write_report(report, run_dir.report_json, run_dir.report_md)
    return report


def lora_info(lora: dict | None) -> dict:
    """A checkpoint's extra info on its adapters (``train.fake_lora``/``student_lora``), merged into its weights."""
    if not lora:
        return {}
    return {"lora": {**lora, "alpha": scale_numerator(lora["rank"], lora.get("alpha")), "merged": True}}


def load_run(run_dir: str | Path | RunDir, device="cpu"):
    """``(recipe, teacher, student)`` of a finished run (a path, URL or ``RunDir``), from its config and
    checkpoints."""
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    teacher = load_denoiser(run_dir.checkpoint("teacher"), device=device)
    student = load_denoiser(run_dir.checkpoint("student"), device=device)
    return run_dir.recipe(), teacher, student


# The rest of what ``dpdm.core.run`` held in 0.1 (that deprecated name resolves to this module until 0.3).
from ..config.identity import config_changes, config_hash, training_config  # noqa: E402,F401
from .build import batches, build_divergence, make_dataset, resolve_device, spec_of  # noqa: E402,F401
from .evaluation import recovery_setup, references  # noqa: E402,F401
