"""``dpdm``: run recipes, evaluate recovery, sample, list plugins, convert official EDM snapshots.

This module wires the commands together (``app``, the ``dpdm`` entry point ``main``) and holds ``run``, ``plugins``
and ``convert``; ``recover``, ``sample``, ``data`` and ``eval`` live in their own modules, and what they share in
``common``. Heavy imports (torch, the registries) happen inside the commands so ``dpdm --help`` is fast.
User errors (``DpdmError``: bad files, keys, names, values) print one message and exit 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from .common import (ListOptionsGroup, command_argv, console, die_with_parent, err, flags_take_no_value,
                     launch, show_logs, show_markdown, show_table, stopped, user_errors, versions)
from .data import data_app
from .evaluation import eval_app
from .recover import recover
from .sample import sample

app = typer.Typer(cls=ListOptionsGroup, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Data-Prediction Denoising Models: distill EDM teachers into few-step denoisers.")
flags_take_no_value()


def _print_versions(value: bool) -> None:
    if value:
        for name, version in versions().items():
            console.out(f"{name} {version or 'not installed'}", highlight=False)
        raise typer.Exit()


@app.callback()
def _every_command(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_versions,
                                 help="Print the versions of dpdm-core, dpdm-nets, dpdm-data, dpdm-cli and torch"),
) -> None:
    show_logs()  # also when the app is invoked in-process (typer's CliRunner), not only through main()

@app.command(context_settings={"allow_extra_args": False})
@user_errors
def run(
    recipe: Path = typer.Argument(..., help="YAML recipe, e.g. recipes/toy2d.yaml"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a key: --set train.lr=2e-5 (repeatable)"),
    out: Optional[str] = typer.Option(None, "--out", help="Run directory, a path or fsspec URL (s3://, memory://) "
                                                          "(default: runs/<name>-<timestamp>)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the resolved recipe, run nothing"),
    resume: Optional[str] = typer.Option(None, "--resume", metavar="latest|RUN_DIR",
                                         help="Continue an interrupted run from its newest complete checkpoints: "
                                              "'latest' (--out's directory, else runs/latest) or a run directory"),
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1,
                                        help="Launch N processes on this machine with torchrun (DDP)"),
):
    """Run a recipe: train or load the teacher, distill the student, evaluate, write a report.

    Multi-GPU: `torchrun --nproc_per_node=8 -m dpdm.cli run RECIPE` (or `dpdm run RECIPE --nproc 8`);
    every rank trains, rank 0 prints, writes and evaluates."""
    if nproc is not None:
        launch(nproc)
    from dpdm.core.config.recipe import read_recipe
    from dpdm.core.config.structure import dump_yaml, unstructure
    from dpdm.core.pipeline.preflight import preflight
    from dpdm.core.pipeline.rundir import DEFAULT_ROOT, check_writable

    # bounds, then every build (data, nets, divergence, metric, schedules): all problems in one error, before any work
    resolved, _ = read_recipe(str(recipe), list(set_ or []))
    if out is not None or not (dry_run or resume):  # where the run goes, before anything is built
        check_writable(out if out is not None else DEFAULT_ROOT)
    plan = preflight(resolved, str(recipe))
    if dry_run:
        console.out(dump_yaml(unstructure(resolved)), highlight=False, end="")  # raw: no wrapping, markup or emoji
        err.print(f"[green]recipe {escape(str(recipe))} is valid[/]")
        return
    from dpdm.core.pipeline.run import run as run_recipe
    from dpdm.core.pipeline.rundir import REPORT_MD, RunDir
    from dpdm.core.progress import RichProgress
    from dpdm.core.train.distributed import init_dist
    from dpdm.core.train.signals import Interrupted, stop_on_signals

    dist = init_dist(resolved.device)
    finished, run_dir = False, None
    # SIGTERM (Slurm, Kubernetes) and SIGINT (Ctrl-C): training stops after its current step with a snapshot, anything
    # else at once; either way through the `finally` below (the lock is released), then exit 143 / 130
    try:
        with stop_on_signals():
            try:
                if dist.is_main:
                    run_dir = _claim_run_dir(resolved, out, resume)
                url = dist.broadcast_object(str(run_dir) if dist.is_main else None)  # a collective on every rank
                run_dir = run_dir or RunDir(url)
                if dist.is_main:
                    err.print(f"{'resuming' if resume else 'run directory'}: [bold]{escape(str(run_dir))}[/]"
                              + (f" ({dist.world_size} processes, {dist.backend})" if dist.distributed else ""))
                run_recipe(plan, run_dir, progress=RichProgress(err), dist=dist, resume=resume is not None)
                if dist.is_main:
                    show_markdown(run_dir.read_text(REPORT_MD))
                    err.print(f"[green]done:[/] {escape(str(run_dir))}/report.json, report.md, figures/")
                finished = True
            finally:
                if run_dir is not None:
                    run_dir.release()
                dist.destroy(sync=finished)  # no barrier when a rank failed: the others may never reach it
    except Interrupted as exc:
        again = ["run", str(recipe), *[a for o in set_ or [] for a in ("--set", o)]]
        raise stopped(exc, run_dir if dist.is_main else None, again, dist.world_size) from None


def _claim_run_dir(recipe, out: Optional[str], resume: Optional[str]):
    """The run directory, claimed (``RunDir.claim``: locked, and refused before anything is written if ``recipe``
    may not write into it): a new one under runs/ (``runs/latest`` points at it), ``--out``, or for ``--resume`` an
    existing one whose training settings match ``recipe``."""
    from dpdm.core.errors import DpdmError
    from dpdm.core.pipeline.rundir import RunDir, new_run_dir, resolve_run, update_latest

    if resume is None:
        run_dir = RunDir(out if out is not None else new_run_dir(recipe.name))
    elif resume == "latest":
        run_dir = resolve_run(out, given_by="the run: --resume RUN_DIR, or --out RUN_DIR --resume latest")
    else:
        run_dir = resolve_run(resume)
        if out is not None and RunDir(out) != run_dir:
            raise DpdmError(f"--resume {resume} and --out {out} name different directories; give one of them")
    lock = run_dir.claim(recipe, resume=resume is not None)
    for note in lock.notes:
        err.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    if resume is None and out is None:
        update_latest(run_dir)
    return run_dir


app.command()(recover)
app.command()(sample)


@app.command()
@user_errors
def plugins(as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON")):
    """List every registered component by kind, with the distribution (and version) that provided it."""
    from dpdm.core.plugins.registry import KINDS, entries

    data = {kind: [{"name": e.name, "distribution": e.distribution, "version": e.version, "plugin": e.plugin}
                   for e in sorted(entries(kind).values(), key=lambda e: e.name)] for kind in KINDS}
    if as_json:
        print(json.dumps(data, indent=2))
        return
    from rich.table import Table

    t = Table(title="dpdm components")
    for col in ("kind", "name", "distribution", "version", "plugin"):
        t.add_column(col)
    for kind, rows in data.items():
        for r in rows:
            t.add_row(kind, r["name"], r["distribution"] or "?", r["version"] or "?", r["plugin"])
    show_table(t)


convert_app = typer.Typer(no_args_is_help=True, help="Convert checkpoints from other code bases into dpdm checkpoints.")
app.add_typer(convert_app, name="convert")


@convert_app.command("edm-pkl")
@user_errors
def convert_edm_pkl(
    src: str = typer.Argument(..., help="Official NVlabs/edm snapshot: a path or URL (http(s) downloads are cached)"),
    dst: str = typer.Argument(..., help="Where to write the dpdm checkpoint (.safetensors), a path or fsspec URL"),
):
    """Import an official EDM network-snapshot-*.pkl without running its embedded code, and save it as a
    dpdm checkpoint (safetensors weights + network spec) that `load_denoiser` and recipes can use."""
    from dpdm.core.io.checkpoint import convert_edm_pickle

    spec, snapshot, notes = convert_edm_pickle(src, dst)
    backbone = {k: v for k, v in spec["backbone"].items() if k != "name"}
    precond = {k: v for k, v in spec["precond"].items() if k != "name"}
    console.print(f"{escape(src)}: {snapshot.kind}, {snapshot.precond_class} wrapping {snapshot.model_class}",
                  highlight=False)
    console.print(f"  backbone   {spec['backbone']['name']} {escape(json.dumps(backbone))}", highlight=False)
    console.print(f"  precond    {spec['precond']['name']} {escape(json.dumps(precond))}", highlight=False)
    console.print(f"  data       shape {spec['shape']}, label_dim {spec['label_dim']}", highlight=False)
    console.print(f"  weights    {snapshot.num_params:,} parameters, {len(snapshot.state_dict)} tensors",
                  highlight=False)
    if snapshot.dataset_kwargs:
        console.print(f"  trained on {escape(json.dumps(snapshot.dataset_kwargs))}", highlight=False)
    for note in notes:
        console.print(f"  [yellow]note:[/] {escape(note)}", highlight=False)
    console.print(f"wrote {escape(dst)}", highlight=False)


@convert_app.command("state-dict")
@user_errors
def convert_state_dict(
    src: str = typer.Argument(..., help="A bare state dict, torch.save(model.state_dict(), SRC): a path or URL"),
    dst: str = typer.Argument(..., help="Where to write the dpdm checkpoint (.safetensors), a path or fsspec URL"),
    backbone: str = typer.Option(..., "--backbone", help="The network the weights belong to, by registry name and "
                                                         "options as in a recipe: 'mlp' or '{name: mlp, hidden: 256}'"),
    shape: str = typer.Option(..., "--shape", help="Shape of one data item: C,H,W for images, D for points"),
    label_dim: int = typer.Option(0, "--label-dim", min=0, help="Number of classes (0: unconditional)"),
    precond: str = typer.Option("edm", "--precond", help="Preconditioning, as in a recipe: 'edm' or "
                                                         "'{name: edm, sigma_data: 0.5}'"),
):
    """Load a bare state dict (a backbone's or a denoiser's weights, read without running any code) into a registered
    backbone, strictly, and save it as a dpdm checkpoint that `dpdm eval --checkpoint` and recipes can use."""
    from dpdm.core.config.recipe import ModelConfig
    from dpdm.core.config.structure import structure
    from dpdm.core.config.yaml import parse_value
    from dpdm.core.errors import ConfigError, DpdmError
    from dpdm.core.io.checkpoint import convert_state_dict as convert
    from dpdm.core.io.checkpoint import network_spec

    try:
        dims = [int(d) for d in shape.split(",")]
    except ValueError:
        dims = []
    if not dims or min(dims) < 1:
        raise DpdmError(f"--shape: expected positive integers separated by commas (3,32,32 or 2), got {shape!r}")
    try:
        model = structure(ModelConfig, {"backbone": parse_value(backbone), "precond": parse_value(precond)}, path="-")
    except ConfigError as exc:  # "-.backbone.name: ..." -> "--backbone.name: ..."
        raise DpdmError("; ".join(p.replace("-.", "--", 1) for p in exc.problems)) from None
    spec = network_spec(model.backbone.as_dict(), model.precond.as_dict(), dims, label_dim)
    net = convert(src, dst, spec)
    params = sum(p.numel() for p in net.parameters())
    console.print(f"{escape(src)}: {params:,} parameters into {spec['backbone']['name']}, shape {dims}, label_dim "
                  f"{label_dim}\nwrote {escape(dst)}", highlight=False)

app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")


def main() -> None:
    die_with_parent()  # a worker of `--nproc`: no orphan when its torchrun agent dies
    app(args=command_argv(), prog_name="dpdm")


if __name__ == "__main__":
    sys.exit(main())
