"""``dpdm``: run recipes, evaluate recovery, sample, list plugins, convert official EDM snapshots.

Heavy imports (torch, the registries) happen inside the commands so ``dpdm --help`` is fast.
User errors (``DpdmError``: bad files, keys, names, values) print one message and exit 1.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
import typer.core
from rich.console import Console
from rich.markup import escape

# Options that take several values after one flag (`--steps 4 5 6 7 8`, `--sigma 0.5 1 2`): click options take one
# value each, so the values up to the next option are joined with commas before parsing (`--steps 4,5,6,7,8`);
# repeating the flag and writing commas work too.
LIST_OPTIONS = frozenset({"--steps", "--sigma", "--student-nfe", "--teacher-nfe", "--teacher-sampler",
                          "--figure-sigma"})


def join_list_options(args: list[str]) -> list[str]:
    """``[..., "--steps", "4", "5", "--num", "8"]`` → ``[..., "--steps", "4,5", "--num", "8"]``."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        out.append(arg)
        i += 1
        if arg in LIST_OPTIONS:
            values = []
            while i < len(args) and not args[i].startswith("--"):
                values.append(args[i])
                i += 1
            if values:
                out.append(",".join(values))
    return out


class _Group(typer.core.TyperGroup):
    def parse_args(self, ctx, args):
        return super().parse_args(ctx, join_list_options(list(args)))


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Data-Prediction Denoising Models: distill EDM teachers into few-step denoisers.")
console = Console()
err = Console(stderr=True)


def user_errors(fn):
    """Turn ``DpdmError`` into one red line on stderr and exit code 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from dpdm.core.errors import DpdmError

        try:
            return fn(*args, **kwargs)
        except DpdmError as exc:  # the message is text, not markup: "expected list[int]" must keep "[int]"
            err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def _floats(values: List[str], option: str) -> list[float]:
    from dpdm.core.errors import DpdmError

    out = []
    for v in values:
        for part in str(v).split(","):
            if part.strip():
                try:
                    out.append(float(part))
                except ValueError:
                    raise DpdmError(f"{option}: expected a number, got {part!r}") from None
    return out


@app.command(context_settings={"allow_extra_args": False})
@user_errors
def run(
    recipe: Path = typer.Argument(..., help="YAML recipe, e.g. recipes/toy2d.yaml"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a key: --set train.lr=2e-5 (repeatable)"),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: runs/<name>-<timestamp>)"),
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
        _launch(nproc)
    from dpdm.core.config.structure import dump_yaml, unstructure

    from dpdm.core.config.recipe import read_recipe
    from dpdm.core.pipeline.preflight import preflight

    # bounds, then every build (data, nets, divergence, metric, schedules): all problems in one error, before any work
    resolved, _ = read_recipe(str(recipe), list(set_ or []))
    plan = preflight(resolved, str(recipe))
    if dry_run:
        console.out(dump_yaml(unstructure(resolved)), highlight=False, end="")  # raw: no wrapping, markup or emoji
        err.print(f"[green]recipe {escape(str(recipe))} is valid[/]")
        return
    from dpdm.core.train.distributed import init_dist
    from dpdm.core.progress import RichProgress
    from dpdm.core.pipeline.run import run as run_recipe

    dist = init_dist(resolved.device)
    finished = False
    try:
        out_dir = dist.broadcast_object(_run_dir(resolved, out, resume) if dist.is_main else None)
        if dist.is_main:
            err.print(f"{'resuming' if resume else 'run directory'}: [bold]{escape(str(out_dir))}[/]"
                      + (f" ({dist.world_size} processes, {dist.backend})" if dist.distributed else ""))
        run_recipe(plan, out_dir, progress=RichProgress(err), dist=dist, resume=resume is not None)
        if dist.is_main:
            from rich.markdown import Markdown

            console.print(Markdown((Path(out_dir) / "report.md").read_text()))
            err.print(f"[green]done:[/] {escape(str(out_dir))}/report.json, report.md, figures/")
        finished = True
    finally:
        dist.destroy(sync=finished)  # no barrier when a rank failed: the others may never reach it


def _run_dir(recipe, out: Optional[Path], resume: Optional[str]) -> Path:
    """The run directory: a new one, ``--out``, or for ``--resume`` an existing one whose training settings
    match ``recipe`` (the keys that differ are named)."""
    from dpdm.core.errors import DpdmError
    from dpdm.core.pipeline.rundir import new_run_dir, resolve_run, update_latest

    if resume is None:
        if out is not None:
            return out
        path = new_run_dir(recipe.name)
        update_latest(path)
        return path
    if resume == "latest":
        path = resolve_run(out)
    else:
        if out is not None and Path(out).resolve() != Path(resume).resolve():
            raise DpdmError(f"--resume {resume} and --out {out} name different directories; give one of them")
        path = resolve_run(Path(resume))
    from dpdm.core.config.recipe import load_recipe
    from dpdm.core.config.identity import config_changes, training_config

    saved = load_recipe(str(path / "config.yaml"))
    changed = config_changes(training_config(saved), training_config(recipe))
    if changed:
        raise DpdmError(f"cannot resume {path}: the recipe differs from the one it was started with in "
                        f"{', '.join(changed)}; resume with the same recipe and --set overrides, or start a new run")
    return path


def _launch(nproc: int) -> None:
    """Re-run this command under ``torchrun --standalone --nproc_per_node N`` (without ``--nproc``); exits with
    torchrun's status."""
    import os
    import subprocess

    from dpdm.core.errors import DpdmError

    if "RANK" in os.environ:
        raise DpdmError("--nproc inside a torchrun job: launch either with torchrun or with --nproc, not both")
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        argv.append(arg)
    # The command's own arguments travel in DPDM_ARGV, not on torchrun's command line: torchrun's parser takes
    # abbreviations of its options anywhere (`--num` would clash with `--numa-binding`, `--run` would become
    # `--run-path`).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "dpdm.cli"]
    err.print(f"launching: {escape(' '.join(cmd[1:] + argv))}")
    raise typer.Exit(subprocess.call(cmd, env={**os.environ, ARGV_ENV: json.dumps(argv)}))


PAPER_SIGMAS = [0.02, 0.05, 0.1, 0.2, 0.5, 0.75, 1.0, 2.0, 5.0, 7.5, 10.0]  # Table 1 of the DPDM paper


def figure_sigmas(sigmas: list[float], count: int = 4) -> list[float]:
    """``count`` of ``sigmas`` spread over the list (its first and last included), for the Figure 4 panels."""
    if len(sigmas) <= count:
        return list(sigmas)
    ordered = sorted(sigmas)
    return [ordered[round(i * (len(ordered) - 1) / (count - 1))] for i in range(count)]


@app.command()
@user_errors
def recover(
    sigma: Optional[List[str]] = typer.Option(None, "--sigma", help="Noise levels: --sigma 0.5 1 2 (default: the "
                                                                     "paper's Table 1 list, 0.02 ... 10)"),
    run: Optional[Path] = typer.Option(None, "--run", help="Run directory (default: runs/latest)"),
    protocol: str = typer.Option("paper", "--protocol", metavar="paper|heldout",
                                 help="paper (Section 5.1): a random subset of the training split, compared with the "
                                      "full training set (the recipe's eval.ref for fid); heldout: the first test "
                                      "items, compared with data independent of them"),
    num: Optional[int] = typer.Option(None, "--num", help="Items noised (default: the recipe's eval.recovery_num; "
                                                          "at most the split's size)"),
    metric: Optional[str] = typer.Option(None, "--metric", help="fid, fd-<dataset>, energy, ... (default: the recipe's)"),
    detector: Optional[str] = typer.Option(None, "--detector", help="FID Inception-v3 file or URL (metric fid)"),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON"),
    out: Optional[Path] = typer.Option(None, "--out", help="JSON result (default: RUN/eval/recover.json)"),
    figure: Optional[Path] = typer.Option(None, "--figure", help="Where to save the panels (default: RUN/figures/recover.png)"),
    figure_sigma: Optional[List[str]] = typer.Option(None, "--figure-sigma", help="σ shown in the figure (default: "
                                                                                  "4 spread over --sigma)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seeds the subset (paper) and each item's noise at each "
                                                            "σ (default: the recipe's seed, as the run's report)"),
    device: str = typer.Option("cpu", "--device"),
):
    """Section 5.1 / Table 1 of the paper: noise data at each σ, denoise once with student and teacher, and measure
    each recovered set's distance to real data; a table (σ in columns), JSON, and a Figure-4-style panel (rows
    clean / noisy / teacher / student)."""
    from dpdm.core.errors import DpdmError
    from dpdm.core.eval.recovery import check_protocol
    from dpdm.core.pipeline.rundir import resolve_run

    check_protocol(protocol)
    sigmas = _floats(sigma, "--sigma") if sigma else list(PAPER_SIGMAS)
    if not sigmas or any(s <= 0 for s in sigmas):
        raise DpdmError(f"--sigma: noise levels must be positive, got {sigmas}")
    shown = _floats(figure_sigma, "--figure-sigma") if figure_sigma else figure_sigmas(sigmas)
    missing = [s for s in shown if s not in sigmas]
    if missing:
        raise DpdmError(f"--figure-sigma {missing} are not among --sigma {sigmas}")
    run_dir = resolve_run(run)

    import torch

    from dpdm.core.eval import evaluate as ev
    from dpdm.core.eval import recovery as rec
    from dpdm.core.pipeline.run import load_run, make_dataset, recovery_setup
    from dpdm.core.train.distributed import resolve_device

    from .evaluation import resolve_metric

    dev = resolve_device(device)
    recipe, teacher, student = load_run(run_dir, device=dev)
    train_set, test_set = make_dataset(recipe.data, "train"), make_dataset(recipe.data, "test")
    n = num or recipe.eval.recovery_num
    seed = recipe.seed if seed is None else seed
    if n < 2:
        raise DpdmError(f"--num must be at least 2, got {n}")
    from dpdm.core.progress import RichProgress

    progress = RichProgress(err)
    metric_name, metric_fn = resolve_metric(metric, detector, recipe, dev, progress)
    items, reference, ref_name, note = recovery_setup(recipe, protocol, train_set, test_set, metric_fn, n, seed,
                                                      progress=progress)
    if note:
        err.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    kind = test_set.kind
    keep = 8 if kind == "image" else None
    with torch.no_grad():
        table, examples = ev.recovery(student, teacher, metric_fn, items, None, sigmas, reference, seed=seed,
                                      device=dev, keep=keep)
    clean = rec.first(items, keep if keep is not None else len(items))
    fig_path = figure or run_dir / "figures" / "recover.png"
    try:
        from dpdm.core.eval import figures

        Path(fig_path).parent.mkdir(parents=True, exist_ok=True)
        m = min(8, len(clean)) if kind == "image" else len(clean)
        figures.recovery_figure(clean[:m], {s: {k: v[:m] for k, v in examples[s].items()} for s in shown},
                                kind, fig_path)
    except ImportError:
        fig_path = None
    det = getattr(metric_fn, "detector", None)
    result = {"run": str(run_dir), "metric": metric_name, "recovery_protocol": protocol,
              "protocol": rec.PROTOCOL_TEXT[protocol], "num": len(items), "seed": seed, "ref": ref_name,
              "floor": rec.distance(metric_fn, items, reference),
              "recovery": {f"{s:g}": {**v, "ratio": v["student"] / v["teacher"] if v["teacher"] > 0 else None}
                           for s, v in table.items()},
              "figure": str(fig_path) if fig_path else None}
    if note:
        result["note"] = note
    if det is not None and getattr(det, "accuracy", None) is not None:
        result["detector_test_accuracy"] = det.accuracy
    out_path = out or run_dir / "eval" / "recover.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))
    if as_json:
        print(json.dumps(result, indent=2))
        return
    console.print(recovery_table(result))
    console.print(f"wrote {escape(str(out_path))}" + (f", figure {escape(str(fig_path))}" if fig_path else ""),
                  highlight=False)


def recovery_table(result: dict):
    """The paper's Table 1 layout: one column per σ; rows noisy, teacher, student and their ratio (student /
    teacher). Compact (3 significant digits, light borders) so the paper's 11 σ fit 80 columns."""
    from rich import box
    from rich.table import Table

    protocol = result.get("recovery_protocol", "heldout")
    split = "training" if protocol == "paper" else "held-out"
    t = Table(title=f"Recovery, {protocol} protocol ({result['metric']}, {result['num']} {split} items) — lower is "
                    f"better",
              caption=f"reference: {result.get('ref')}; ratio = student / teacher; the clean items score "
                      f"{result['floor']:.3g} (the floor)",
              box=box.SIMPLE_HEAD, padding=(0, 0, 0, 1), pad_edge=False)
    t.add_column("σ")
    for s in result["recovery"]:
        t.add_column(s, justify="right")
    for row in ("noisy", "teacher", "student"):
        t.add_row(row, *[f"{v[row]:.3g}" for v in result["recovery"].values()])
    t.add_row("ratio", *["—" if v["ratio"] is None else f"{v['ratio']:.2f}" for v in result["recovery"].values()])
    return t


@app.command()
@user_errors
def sample(
    run: Optional[Path] = typer.Option(None, "--run", help="Run directory (default: runs/latest)"),
    steps: int = typer.Option(4, "--steps", min=1, help="Number of sampling steps"),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="Sampler (default: the recipe's student sampler, "
                                                                  "dpdm, for the student; heun for the teacher)"),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="Schedule (default: the sampler's: the recipe's "
                                                                    "student schedule for dpdm, its teacher schedule, "
                                                                    "karras, for heun and the other ODE samplers)"),
    model: str = typer.Option("student", "--model", help="student or teacher"),
    num: Optional[int] = typer.Option(None, "--num", help="Samples (default: 64 images or 2000 points)"),
    sigma_max: Optional[float] = typer.Option(None, "--sigma-max", help="Start of the schedule (default: the recipe's)"),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(..., "--out", help="Output PNG"),
):
    """Draw samples from a run's student (or teacher) and save them as a PNG grid or scatter."""
    from dpdm.core.errors import DpdmError
    from dpdm.core.pipeline.rundir import resolve_run

    if model not in ("student", "teacher"):
        raise DpdmError(f"--model must be 'student' or 'teacher', got {model!r}")
    run_dir = resolve_run(run)
    from dpdm.core.eval import evaluate as ev
    from dpdm.core.eval import figures
    from dpdm.core.pipeline.run import load_run, make_dataset
    from dpdm.core.eval.scoring import sampler_and_schedule

    from .evaluation import _sampling

    recipe, teacher, student = load_run(run_dir)
    net = student if model == "student" else teacher
    sampler_spec, schedule_spec = _sampling(recipe, model, sampler, schedule, sigma_max)
    # the schedule clamped to the network's σ range, as on every evaluation route (EDM's generate.py)
    sample_fn, nfe_of, sigmas_of = sampler_and_schedule(sampler_spec, schedule_spec, net)
    try:
        sigmas = sigmas_of(steps)
    except ValueError as exc:
        given = f" and --sigma-max {sigma_max:g}" if sigma_max is not None else ""
        raise DpdmError(f"--schedule {schedule_spec['name']} with --steps {steps}{given}: {exc}") from None
    ds = make_dataset(recipe.data, "test")
    n = num or (64 if ds.kind == "image" else 2000)
    x = ev.generate(net, sample_fn, sigmas, n, tuple(ds.shape), label_dim=ds.label_dim, seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    what = f"{sampler_spec['name']} sampler, {schedule_spec['name']} schedule"
    figures.samples_figure({f"{model}, {what}, NFE {nfe_of(steps)}": x}, ds.kind, out, max_images=n)
    console.print(f"wrote {escape(str(out))} ({n} samples, {what}, {steps} steps, NFE {nfe_of(steps)})")


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
    console.print(t)


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


from .data import data_app  # noqa: E402  (data.py imports user_errors and the consoles from here)

app.add_typer(data_app, name="data")

from .evaluation import eval_app  # noqa: E402

app.add_typer(eval_app, name="eval")


ARGV_ENV = "DPDM_ARGV"  # set by --nproc for the processes torchrun starts (a JSON list of arguments)


def main() -> None:
    argv = sys.argv[1:]
    if not argv and os.environ.get(ARGV_ENV):
        argv = json.loads(os.environ[ARGV_ENV])
    app(args=argv, prog_name="dpdm")


if __name__ == "__main__":
    sys.exit(main())
