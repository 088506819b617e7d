"""``dpdm eval``: reference statistics (``ref``), FID of a run or checkpoint at several step counts (``fid``),
the NFE sweep of student and teacher samplers (``sweep``, the paper's Table 4), and the cross-use of models and
samplers at one NFE (``cross``, Section 5.2 / Figure 6).

The work happens in the evaluation engine, ``dpdm.core.eval.protocols`` (what the commands load: ``eval_inputs``).
Every command runs under torchrun (or ``--nproc N``): each rank generates or featurises its share of the items, statistics are summed
over the ranks, rank 0 writes.
Numbers carry their metric's name: ``fid`` (the standard Inception-v3 detector) or a substitute such as
``fd-mnist`` (a small classifier; not comparable with published FIDs).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from .common import console, err, ints, launch, local_path, show_markdown, show_table, user_errors
from .eval_inputs import (
    check_sigma_max,
    load_reference,
    metric_on_ranks,
    model_of,
    on_ranks,
    open_dataset,
    run_models,
    sampling,
    save_grids,
    write_json,
)

eval_app = typer.Typer(no_args_is_help=True, help="FID and other distances: reference statistics, FID at several "
                                                  "step counts, NFE sweeps of student and teacher, models x samplers.")

# The NFE grid of the paper's Table 4 (CIFAR-10, DPDM vs EDM): the student at 1…10, the teacher at these.
DEFAULT_STUDENT_NFE = list(range(1, 11))
DEFAULT_TEACHER_NFE = [4, 5, 6, 7, 8, 9, 10, 12, 14, 15, 16, 18, 35]


@eval_app.command("ref")
@user_errors
def ref_cmd(
    dataset: str = typer.Argument(..., help="A dataset name (cifar10, mnist, digits, ...; options with --data) or "
                                            "a path/URL of an EDM dataset ZIP, an image folder or an .npz"),
    out: str = typer.Argument(..., help="Where to write the statistics (.npz with EDM's mu/sigma), any fsspec URL"),
    detector: Optional[str] = typer.Option(None, "--detector", help="FID Inception-v3 file or URL"),
    metric: Optional[str] = typer.Option(None, "--metric", help="fd-<dataset> instead of FID"),
    data: Optional[List[str]] = typer.Option(None, "--data", help="Dataset option key=value (repeatable)"),
    split: str = typer.Option("train", "--split", help="Dataset split (EDM's references use the training set)"),
    num: Optional[int] = typer.Option(None, "--num", min=2, help="Use the first N items (default: all)"),
    batch: int = typer.Option(250, "--batch", min=1, help="Images per detector call"),
    device: str = typer.Option("auto", "--device"),
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, help="Launch N processes with torchrun"),
):
    """Feature statistics of a dataset (EDM's `fid.py ref`): the reference of `dpdm eval fid --ref`."""
    if nproc is not None:
        launch(nproc)
    from dpdm.core.eval.fid import save_stats
    from dpdm.core.eval.protocols import dataset_stats, is_feature_metric
    from dpdm.core.io.storage import check_destination

    check_destination(out)  # before a detector is loaded or an image read
    ds = open_dataset(dataset, data or [], split)
    with on_ranks(device) as (dist, progress):
        name, metric_fn = metric_on_ranks(dist, metric, detector, None, progress)
        if not is_feature_metric(metric_fn):
            from dpdm.core.errors import DpdmError

            raise DpdmError(f"metric {name!r} compares data directly; reference statistics are for fid or fd-<dataset>")
        t0 = time.perf_counter()
        stats = dataset_stats(ds, metric_fn.detector, num=num, batch_size=batch, dist=dist, progress=progress)
        if dist.is_main:
            save_stats(out, stats, detector=metric_fn.detector.key)
            console.print(f"wrote {escape(out)}: {name} statistics of {stats.num_images} images of {escape(dataset)} "
                          f"({split}), {len(stats.mu)} features, detector {escape(metric_fn.detector.key)}, "
                          f"{time.perf_counter() - t0:.1f} s", highlight=False)


@eval_app.command("fid")
@user_errors
def fid_cmd(
    run: Optional[str] = typer.Option(None, "--run", help="Run directory, a path or URL (default: runs/latest unless "
                                                          "--checkpoint)"),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="A dpdm checkpoint or an official EDM .pkl"),
    model: str = typer.Option("student", "--model", help="With --run: student or teacher"),
    steps: Optional[List[str]] = typer.Option(None, "--steps", help="Step counts: --steps 4 5 6 7 8 "
                                                                    "(default: the run's eval.student_steps, or 4..8)"),
    num: int = typer.Option(50000, "--num", min=2, help="Generated images per step count"),
    ref: Optional[str] = typer.Option(None, "--ref", help="Reference statistics .npz (default with --run: the "
                                                          "recipe's eval.ref, else its test split, cached)"),
    detector: Optional[str] = typer.Option(None, "--detector", help="FID Inception-v3 file or URL"),
    metric: Optional[str] = typer.Option(None, "--metric", help="fd-<dataset> (substitute) instead of fid"),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="Default: dpdm for a student (a run's, or a "
                                                                  "checkpoint whose metadata role is student), heun "
                                                                  "for a teacher (an EDM .pkl, any other checkpoint)"),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="Default: the sampler's (the run's student "
                                                                    "schedule, else dpdm, for dpdm; the run's teacher "
                                                                    "schedule, else karras, for the others)"),
    sigma_max: Optional[float] = typer.Option(None, "--sigma-max", help="Start of the schedule"),
    seed: int = typer.Option(0, "--seed", min=0, help="Image i uses the seed derived from (seed, i)"),
    batch: int = typer.Option(256, "--batch", min=1, help="Images per generation batch on each rank"),
    out: Optional[Path] = typer.Option(None, "--out", callback=local_path,
                                       help="JSON result (default: RUN/eval/fid-<model>.json or "
                                            "./fid-<checkpoint name>.json); grids beside it"),
    device: str = typer.Option("auto", "--device"),
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, help="Launch N processes with torchrun"),
):
    """FID (or a named substitute) of a run's student/teacher or a checkpoint at each step count."""
    if nproc is not None:
        launch(nproc)
    from dpdm.core.errors import DpdmError
    from dpdm.core.io.storage import check_destination
    from dpdm.core.pipeline.rundir import EVAL

    step_list = ints(steps, "--steps")
    check_sigma_max(sigma_max)
    with on_ranks(device) as (dist, progress):
        from dpdm.core.io.checkpoint import checkpoint_role

        net, spec, recipe, run_dir, source = model_of(run, checkpoint, model, dist.device)
        default = (run_dir.file(EVAL, f"fid-{model}.json") if run_dir is not None
                   else f"fid-{Path(source.rstrip('/')).stem}.json")
        check_destination(str(out or default), what="--out " if out else "")  # before any image is generated
        if not step_list:
            step_list = list(recipe.eval.student_steps) if recipe is not None and model == "student" else [4, 5, 6, 7, 8]
        role = model if recipe is not None else checkpoint_role(checkpoint)  # a teacher by default: heun + karras
        sampler_spec, schedule_spec = sampling(recipe, role, sampler, schedule, sigma_max)
        name, metric_fn = metric_on_ranks(dist, metric, detector, recipe, progress)
        from dpdm.core.eval.protocols import fid_at_steps, is_feature_metric

        if len(spec["shape"]) != 3:
            raise DpdmError(f"dpdm eval fid is for images; this model makes vectors of shape {spec['shape']} "
                            f"(use dpdm eval sweep with the energy metric)")
        reference, ref_name = load_reference(ref, metric_fn, recipe, dist, progress)
        if not is_feature_metric(metric_fn):
            raise DpdmError(f"metric {name!r} is not a feature distance; use fid or fd-<dataset>")
        t0 = time.perf_counter()
        results, grids = fid_at_steps(net, sampler=sampler_spec, schedule=schedule_spec, steps=step_list,
                                      metric=metric_fn, reference=reference, num=num, shape=tuple(spec["shape"]),
                                      label_dim=int(spec["label_dim"]), seed=seed, batch_size=batch, dist=dist,
                                      progress=progress)
        if dist.is_main:
            out_path = out or (run_dir.eval_dir / f"fid-{model}.json" if run_dir is not None
                               else Path(f"fid-{Path(source.rstrip('/')).stem}.json"))
            det = metric_fn.detector
            result = {"metric": name, "detector": det.key, "source": source,
                      "model": model if recipe is not None else "checkpoint", "role": role, "sampler": sampler_spec,
                      "schedule": schedule_spec, "num": num, "seed": seed, "ref": ref_name,
                      "world_size": dist.world_size, "seconds": time.perf_counter() - t0,
                      "results": [{"steps": n, **r} for n, r in results.items()]}
            if getattr(det, "accuracy", None) is not None:
                result["detector_test_accuracy"] = det.accuracy
            write_json(out_path, result)
            save_grids(out_path.parent, out_path.stem, {f"steps{n:02d}": g for n, g in grids.items()})
            _fid_table(result)
            if run_dir is not None:
                run_dir.publish()
                out_path = run_dir.final(out_path)
            console.print(f"wrote {escape(str(out_path))}", highlight=False)


def _fid_table(result: dict) -> None:
    from rich.table import Table

    t = Table(title=f"{result['metric']} of {result['source']} ({result['num']} images, {result['sampler']['name']} "
                    f"sampler, {result['schedule']['name']} schedule, ref: {result['ref']}) — lower is better")
    for col in ("steps", "NFE", result["metric"], "seconds"):
        t.add_column(col, justify="right")
    for r in result["results"]:
        t.add_row(str(r["steps"]), str(r["nfe"]), f"{r['value']:.4g}", f"{r['seconds']:.1f}")
    show_table(t)


@eval_app.command("sweep")
@user_errors
def sweep_cmd(
    run: Optional[str] = typer.Option(None, "--run", help="Run directory, a path or URL (default: runs/latest)"),
    student_nfe: Optional[List[str]] = typer.Option(None, "--student-nfe", help="Default: 1 2 ... 10 (Table 4)"),
    teacher_nfe: Optional[List[str]] = typer.Option(
        None, "--teacher-nfe", help="Default: Table 4's 4 5 6 7 8 9 10 12 14 15 16 18 35, each sampler where it "
                                    "reaches that NFE exactly: Heun reaches only odd NFEs (2 steps − 1), so its even "
                                    "entries are skipped"),
    teacher_sampler: Optional[List[str]] = typer.Option(None, "--teacher-sampler",
                                                        help="Default: heun euler dpmpp-2m (with the recipe's "
                                                             "options for a sampler its eval.teacher_samplers set)"),
    num: Optional[int] = typer.Option(None, "--num", min=2, help="Samples per point (default: eval.num_samples)"),
    ref: Optional[str] = typer.Option(None, "--ref", help="Reference statistics .npz (fid / fd-<dataset>)"),
    detector: Optional[str] = typer.Option(None, "--detector", help="FID Inception-v3 file or URL"),
    metric: Optional[str] = typer.Option(None, "--metric", help="Default: the run's eval.metric"),
    seed: int = typer.Option(0, "--seed", min=0),
    batch: int = typer.Option(256, "--batch", min=1, help="Items per generation batch on each rank"),
    out: Optional[Path] = typer.Option(None, "--out", callback=local_path,
                                       help="Output folder (default: RUN/eval/sweep)"),
    device: str = typer.Option("auto", "--device"),
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, help="Launch N processes with torchrun"),
):
    """The paper's Table 4: the student (dpdm sampler) at NFE 1…10 against the teacher's samplers at NFE 4…18 and
    35 (Heun: odd NFEs only); writes sweep.json, sweep.md, nfe_curve.png and sample grids per NFE."""
    if nproc is not None:
        launch(nproc)
    from dpdm.core.eval.protocols import nfe_sweep
    from dpdm.core.io.storage import check_destination
    from dpdm.core.pipeline.rundir import EVAL, resolve_run

    s_nfe = ints(student_nfe, "--student-nfe") or list(DEFAULT_STUDENT_NFE)
    t_nfe = ints(teacher_nfe, "--teacher-nfe") or list(DEFAULT_TEACHER_NFE)
    run_dir = resolve_run(run)
    # before any point is computed
    check_destination(str(out) if out else run_dir.file(EVAL, "sweep"), folder=True, what="--out " if out else "")
    recipe = run_dir.recipe()
    cfg = recipe.eval
    names = [x.strip() for v in (teacher_sampler or []) for x in v.split(",") if x.strip()]
    recipe_options = {c.name: c.options for c in cfg.teacher_samplers}  # a sampler the recipe sets keeps its options
    samplers = [{"name": s, **recipe_options.get(s, {})} for s in (names or ["heun", "euler", "dpmpp-2m"])]
    from dpdm.core.plugins.registry import entry

    for s in samplers:
        entry("sampler", s["name"])
    with on_ranks(device) as (dist, progress):
        student, teacher, spec, name, metric_fn, reference, ref_name = run_models(run_dir, recipe, dist, metric,
                                                                                   detector, ref, progress)
        n = num or cfg.num_samples
        kind = "image" if len(spec["shape"]) == 3 else "vector"
        t0 = time.perf_counter()
        values, grids = nfe_sweep(
            student, teacher, metric=metric_fn, reference=reference,
            student_sampler=cfg.student_sampler, student_schedule=cfg.student_schedule, student_nfe=s_nfe,
            teacher_samplers=samplers, teacher_schedule=cfg.teacher_schedule, teacher_nfe=t_nfe,
            num=n, shape=tuple(spec["shape"]), label_dim=int(spec["label_dim"]), seed=seed, batch_size=batch,
            dist=dist, progress=progress, keep=cfg.figure_samples if kind == "image" else min(n, 2000))
        if dist.is_main:
            folder = out or run_dir.eval_dir / "sweep"
            folder.mkdir(parents=True, exist_ok=True)
            sweep = {role: {s: {str(k): v for k, v in by.items()} for s, by in d.items()} for role, d in values.items()}
            result = {"metric": name, "run": str(run_dir), "num": n, "seed": seed, "ref": ref_name,
                      "world_size": dist.world_size, "seconds": time.perf_counter() - t0, "sweep": sweep}
            det = getattr(metric_fn, "detector", None)
            if det is not None:
                result["detector"] = det.key
                if getattr(det, "accuracy", None) is not None:
                    result["detector_test_accuracy"] = det.accuracy
            from dpdm.core.eval.report import checks, sweep_markdown, warnings as score_warnings

            found = checks({"sweep": sweep}) if sweep.get("student") else None
            if found is not None:  # the paper's sampling claims (Table 2, Section 5.2); recovery is `dpdm recover`
                result["checks"] = {k: found[k] for k in ("student_vs_best_teacher", "student_vs_undistilled")}
            result["warnings"] = score_warnings(result)  # non-finite scores: a model that diverged, said at the top
            write_json(folder / "sweep.json", result)

            (folder / "sweep.md").write_text(sweep_markdown(result))
            from dpdm.core.eval import figures

            figures.curve_figure(sweep, name, folder / "nfe_curve.png")
            for role, by_sampler in grids.items():
                save_grids(folder / "grids", role, {f"{s}-nfe{k:02d}": x for s, by in by_sampler.items()
                                                for k, x in by.items()})
            show_markdown(sweep_markdown(result))
            run_dir.publish()
            console.print(f"wrote {escape(run_dir.final(folder))}/sweep.json, sweep.md, nfe_curve.png, grids/", highlight=False)


@eval_app.command("cross")
@user_errors
def cross_cmd(
    run: Optional[str] = typer.Option(None, "--run", help="Run directory, a path or URL (default: runs/latest)"),
    nfe: int = typer.Option(7, "--nfe", help="Evaluations per sample (the paper's 7); a sampler that cannot reach it "
                                             "exactly takes the largest NFE below it (Heun: odd NFEs only)"),
    num: Optional[int] = typer.Option(None, "--num", min=2, help="Samples per cell (default: eval.num_samples)"),
    ref: Optional[str] = typer.Option(None, "--ref", help="Reference statistics .npz (fid / fd-<dataset>)"),
    detector: Optional[str] = typer.Option(None, "--detector", help="FID Inception-v3 file or URL"),
    metric: Optional[str] = typer.Option(None, "--metric", help="Default: the run's eval.metric"),
    seed: int = typer.Option(0, "--seed", min=0, help="Sample i uses the seed derived from (seed, i), in every cell"),
    batch: int = typer.Option(256, "--batch", min=1, help="Items per generation batch on each rank"),
    out: Optional[Path] = typer.Option(None, "--out", callback=local_path, help="Output folder (default: RUN/eval)"),
    device: str = typer.Option("auto", "--device"),
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, help="Launch N processes with torchrun"),
):
    """Section 5.2 / Figure 6 of the paper: student and teacher, each with the DPDM sampler (the recipe's dpdm
    schedule) and with Heun's ODE sampler (Karras schedule) at one NFE; writes cross.json and cross.png."""
    if nproc is not None:
        launch(nproc)
    from dpdm.core.errors import DpdmError

    if nfe < 1:
        raise DpdmError(f"--nfe: the number of evaluations must be at least 1, got {nfe}")
    from dpdm.core.eval.protocols import cross_samplings, cross_use
    from dpdm.core.io.storage import check_destination
    from dpdm.core.pipeline.rundir import EVAL, resolve_run

    run_dir = resolve_run(run)
    check_destination(str(out) if out else run_dir.file(EVAL), folder=True, what="--out " if out else "")
    recipe = run_dir.recipe()
    samplings = cross_samplings(recipe)
    with on_ranks(device) as (dist, progress):
        student, teacher, spec, name, metric_fn, reference, ref_name = run_models(run_dir, recipe, dist, metric,
                                                                                   detector, ref, progress)
        n = num or recipe.eval.num_samples
        kind = "image" if len(spec["shape"]) == 3 else "vector"
        t0 = time.perf_counter()
        cells, grids = cross_use(student, teacher, metric=metric_fn, reference=reference, samplers=samplings,
                                 nfe=nfe, num=n, shape=tuple(spec["shape"]), label_dim=int(spec["label_dim"]),
                                 seed=seed, batch_size=batch, dist=dist, progress=progress,
                                 keep=recipe.eval.figure_samples if kind == "image" else min(n, 2000))
        if dist.is_main:
            folder = out or run_dir.eval_dir
            result = {"metric": name, "run": str(run_dir), "nfe": nfe, "num": n, "seed": seed, "ref": ref_name,
                      "samplers": {c: {"sampler": s, "schedule": sch} for c, (s, sch) in samplings.items()},
                      "cells": cells, "world_size": dist.world_size, "seconds": time.perf_counter() - t0}
            det = getattr(metric_fn, "detector", None)
            if det is not None:
                result["detector"] = det.key
                if getattr(det, "accuracy", None) is not None:
                    result["detector_test_accuracy"] = det.accuracy
            from dpdm.core.eval.report import warnings as score_warnings

            scores = {m: {c: {cell["nfe"]: cell["value"]} for c, cell in row.items()} for m, row in cells.items()}
            result["warnings"] = score_warnings({"sweep": scores})  # non-finite scores: a model that diverged
            for line in result["warnings"]:
                err.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)
            write_json(folder / "cross.json", result)
            figure = folder / "cross.png"
            try:
                from dpdm.core.eval import figures

                panels = {m: {c: (f"{m}, {c} sampler, NFE {cell['nfe']}", grids[m][c], figures.colour(m, c))
                              for c, cell in row.items()}
                          for m, row in cells.items()}
                figures.panel_grid(panels, kind, figure, title=f"Models × samplers at NFE {nfe} (DPDM paper, "
                                                                f"Figure 6): {recipe.name}")
            except ImportError:
                figure = None
            show_table(_cross_table(result))
            run_dir.publish()
            console.print(f"wrote {escape(run_dir.final(folder / 'cross.json'))}"
                          + (f", figure {escape(run_dir.final(figure))}" if figure else ""), highlight=False)


def _cross_table(result: dict):
    """Rows: model; columns: sampler; each cell the metric and the NFE it ran at."""
    from rich.table import Table

    t = Table(title=f"{result['metric']} of models × samplers at NFE {result['nfe']} ({result['num']} samples, "
                    f"ref: {result['ref']}) — lower is better",
              caption="; ".join(f"{c}: {v['sampler']['name']} sampler, {v['schedule']['name']} schedule"
                                for c, v in result["samplers"].items()))
    t.add_column("model")
    for c in result["samplers"]:
        t.add_column(f"{c} sampler", justify="right")
    for model, row in result["cells"].items():
        t.add_row(model, *[f"{cell['value']:.4g} (NFE {cell['nfe']})" for cell in row.values()])
    return t
