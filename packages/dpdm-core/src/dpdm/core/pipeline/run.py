"""Running a recipe end to end: train (or load) the teacher, distill the DPDM student
(Algorithm 1), evaluate (NFE sweeps and Section 5.1 recovery), and write the run directory.

Both training phases run in ``engine.Trainer`` (single process, or every rank under torchrun) on
resumable batches (``dpdm.data.loader.Loader``); ``run(..., resume=True)`` continues each phase from
its newest complete snapshot, bit for bit on CPU. Rank 0 alone writes files other than snapshots and
evaluates.

    config.yaml          the resolved recipe
    checkpoints/         teacher, student, fake score (safetensors + network spec)
    checkpoints/train/   training snapshots per phase (teacher/, student/: ckpt-<step>/, see snapshots.py),
                         unless engine.checkpoint.dir puts them elsewhere (any fsspec URL)
    metrics.jsonl        per-step losses, gradient norms, lr, images/s, peak memory (every engine.log_every)
    tensorboard/         the same for TensorBoard, when it is installed
    figures/progress/    sample grids at a fixed seed every engine.sample_every steps
    report.json          {"metric", "train_steps", "sweep" (student, undistilled, teacher), "recovery", "one_step",
                         "checks" (with "summary"), "timings", ...}
    report.md            the same as tables
    figures/*.png        samples per NFE (student, undistilled teacher, each teacher sampler), NFE curve,
                         recovery panels
"""

from __future__ import annotations

import time
from pathlib import Path

from ..config.recipe import Recipe
from ..config.structure import dump_yaml, unstructure
from ..eval.report import write_report
from ..io.checkpoint import load_checkpoint, load_denoiser, save_denoiser
from ..progress import Progress
from ..train.distributed import Dist, init_dist
from ..train.tracking import Tracker
from .build import check_teacher_fits, student_spec
from .evaluation import evaluate
from .preflight import Plan, preflight, prefetch
from .training import BASELINE_STREAM, RunContext, baseline_phase, distill, train_teacher


def run(plan: Plan | Recipe, out: str | Path, progress: Progress | None = None, *, dist: Dist | None = None,
        resume: bool = False) -> dict | None:
    """Run a recipe's ``plan`` (``preflight(recipe)``; a ``Recipe`` is checked here) into the directory ``out``;
    returns the report (also written to disk) on rank 0, None on the other ranks. Under torchrun every rank calls
    this (``dist`` from ``distributed.init_dist``); rank 0 alone writes files other than snapshots and evaluates. ``resume``: continue from the newest complete
    training snapshot of each phase (``out``'s, or ``engine.checkpoint.dir``)."""
    plan = plan if isinstance(plan, Plan) else preflight(plan)
    recipe, train_set, spec = plan.recipe, plan.train_set, plan.spec
    dist = dist or init_dist(recipe.device)
    progress = (progress or Progress()) if dist.is_main else Progress()
    out = Path(out)
    if dist.is_main:
        prefetch(plan)
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_yaml(unstructure(recipe)))
    dist.barrier()
    device = dist.device
    timings = {}
    with Tracker(out / "metrics.jsonl", dist=dist, tensorboard=out / "tensorboard") as tracker:  # TB if installed
        phase = RunContext(recipe, out, dist, progress, tracker, resume)
        t0 = time.perf_counter()
        if recipe.teacher.checkpoint:
            teacher, spec = load_checkpoint(recipe.teacher.checkpoint, device=device)
            check_teacher_fits(spec, train_set, recipe.teacher.checkpoint)
        else:
            teacher = train_teacher(recipe, spec, train_set, phase)
        timings["teacher_s"] = time.perf_counter() - t0
        if dist.is_main:
            save_denoiser(str(out / "checkpoints" / "teacher.safetensors"), teacher, spec, {"role": "teacher"})

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
    report = None
    if dist.is_main:
        save_denoiser(str(out / "checkpoints" / "student.safetensors"), student, s_spec,
                      {"role": "student", "steps": recipe.train.steps})
        save_denoiser(str(out / "checkpoints" / "fake.safetensors"), job.fake.module, spec, {"role": "fake"})
        for name, (model, b_spec, _) in baselines.items():
            save_denoiser(str(out / "checkpoints" / f"{name}.safetensors"), model, b_spec,
                          {"role": "baseline", "name": name, "steps": recipe.baselines[name].train.steps})
        report = evaluate(plan, teacher, student, device, progress, out, baselines)
        report["timings"].update(timings)
        report["recipe"] = recipe.name
        report["world_size"] = dist.world_size
        if resume:  # the phase times then cover this process only, not the one that trained
            report["resumed"] = True
        write_report(report, out)
    dist.barrier()
    return report


def load_run(run_dir: str | Path, device="cpu"):
    """``(recipe, teacher, student)`` of a finished run, from its config and checkpoints."""
    from ..config.recipe import load_recipe

    run_dir = Path(run_dir)
    recipe = load_recipe(str(run_dir / "config.yaml"))
    teacher = load_denoiser(str(run_dir / "checkpoints" / "teacher.safetensors"), device=device)
    student = load_denoiser(str(run_dir / "checkpoints" / "student.safetensors"), device=device)
    return recipe, teacher, student


# The rest of what ``dpdm.core.run`` held in 0.1 (that deprecated name resolves to this module until 0.3).
from ..config.identity import config_changes, config_hash, training_config  # noqa: E402,F401
from .build import batches, build_divergence, make_dataset, resolve_device, spec_of  # noqa: E402,F401
from .evaluation import recovery_setup, references  # noqa: E402,F401
