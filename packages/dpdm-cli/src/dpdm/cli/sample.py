"""``dpdm sample``: draw samples from a run's student, teacher or fake score and save them as a PNG grid or scatter."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .common import console, local_path, user_errors
from .eval_inputs import check_sigma_max, sampling

MODELS = ("student", "teacher", "fake")  # a run's checkpoints/<model>.safetensors (the fake score's merged if adapted)


@user_errors
def sample(
    run: Optional[str] = typer.Option(None, "--run", help="Run directory, a path or URL (default: runs/latest)"),
    steps: int = typer.Option(4, "--steps", min=1, help="Number of sampling steps"),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="Sampler (default: the recipe's student sampler, "
                                                                  "dpdm, for the student; heun for the teacher and "
                                                                  "the fake score)"),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="Schedule (default: the sampler's: the recipe's "
                                                                    "student schedule for dpdm, its teacher schedule, "
                                                                    "karras, for heun and the other ODE samplers)"),
    model: str = typer.Option("student", "--model", help="student, teacher, or fake (the auxiliary score: a diffusion "
                                                         "model of the student's outputs, sampled like the teacher)"),
    num: Optional[int] = typer.Option(None, "--num", min=1, help="Samples (default: 64 images or 2000 points)"),
    sigma_max: Optional[float] = typer.Option(None, "--sigma-max", help="Start of the schedule (default: the recipe's)"),
    seed: int = typer.Option(0, "--seed", min=0),
    out: Path = typer.Option(..., "--out", callback=local_path, help="Output figure: .png, .jpg, .pdf or .svg"),
):
    """Draw samples from a run's student (or teacher, or fake score) and save them as a PNG grid or scatter."""
    from dpdm.core.errors import DpdmError
    from dpdm.core.eval.figures import check_format
    from dpdm.core.io.storage import check_destination
    from dpdm.core.pipeline.rundir import resolve_run

    if model not in MODELS:
        raise DpdmError(f"--model must be one of {', '.join(MODELS)}, got {model!r}")
    check_sigma_max(sigma_max)
    check_format(out, "--out")
    check_destination(str(out), what="--out ")  # before the run is loaded or a sample drawn
    run_dir = resolve_run(run)
    from dpdm.core.eval import protocols as ev
    from dpdm.core.eval import figures
    from dpdm.core.eval.protocols import sampler_and_schedule
    from dpdm.core.io.checkpoint import load_denoiser
    from dpdm.core.pipeline.run import make_dataset

    recipe = run_dir.recipe()
    net = load_denoiser(run_dir.checkpoint(model))  # only the model sampled: a diverged student spares the teacher
    sampler_spec, schedule_spec = sampling(recipe, model, sampler, schedule, sigma_max)
    # the schedule clamped to the network's σ range, as on every evaluation route (EDM's generate.py)
    sample_fn, nfe_of, sigmas_of = sampler_and_schedule(sampler_spec, schedule_spec, net)
    try:
        sigmas = sigmas_of(steps)
    except ValueError as exc:
        given = f" and --sigma-max {sigma_max:g}" if sigma_max is not None else ""
        raise DpdmError(f"--schedule {schedule_spec['name']} with --steps {steps}{given}: {exc}") from None
    ds = make_dataset(recipe.data, "test")
    n = num if num is not None else (64 if ds.kind == "image" else 2000)
    x = ev.generate(net, sample_fn, sigmas, n, tuple(ds.shape), label_dim=ds.label_dim, seed=seed)
    if not bool(x.isfinite().all()):  # finite weights can still overflow: refuse an empty figure
        raise DpdmError(f"the {model} of {run_dir} ({run_dir.checkpoint(model)}) gave non-finite samples (NaN/Inf) "
                        f"with {sampler_spec['name']} at {steps} steps: its outputs are non-finite; "
                        "nothing was written")
    out.parent.mkdir(parents=True, exist_ok=True)
    what = f"{sampler_spec['name']} sampler, {schedule_spec['name']} schedule"
    figures.samples_figure({f"{model}, {what}, NFE {nfe_of(steps)}": x}, ds.kind, out, max_images=n)
    console.print(f"wrote {escape(str(out))} ({n} samples, {what}, {steps} steps, NFE {nfe_of(steps)})")
