"""``dpdm recover``: Section 5.1 / Table 1 of the paper, noise data at each σ and denoise it once with a run's
student and teacher."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from .common import console, err, floats, local_path, show_table, user_errors
from .eval_inputs import metric_spec, resolve_metric

PAPER_SIGMAS = [0.02, 0.05, 0.1, 0.2, 0.5, 0.75, 1.0, 2.0, 5.0, 7.5, 10.0]  # Table 1 of the DPDM paper


def figure_sigmas(sigmas: list[float], count: int = 4) -> list[float]:
    """``count`` of ``sigmas`` spread over the list (its first and last included), for the Figure 4 panels."""
    if len(sigmas) <= count:
        return list(sigmas)
    ordered = sorted(sigmas)
    return [ordered[round(i * (len(ordered) - 1) / (count - 1))] for i in range(count)]


@user_errors
def recover(
    sigma: Optional[List[str]] = typer.Option(None, "--sigma", help="Noise levels: --sigma 0.5 1 2 (default: the "
                                                                     "paper's Table 1 list, 0.02 ... 10)"),
    run: Optional[str] = typer.Option(None, "--run", help="Run directory, a path or URL (default: runs/latest)"),
    protocol: str = typer.Option("paper", "--protocol", metavar="paper|heldout",
                                 help="paper (Section 5.1): a random subset of the training split, compared with the "
                                      "full training set (the recipe's eval.ref for fid); heldout: the first test "
                                      "items, compared with data independent of them"),
    num: Optional[int] = typer.Option(None, "--num", help="Items noised (default: the recipe's eval.recovery_num; "
                                                          "at most the split's size)"),
    metric: Optional[str] = typer.Option(None, "--metric", help="fid, fd-<dataset>, energy, ... (default: the recipe's)"),
    detector: Optional[str] = typer.Option(None, "--detector", help="FID Inception-v3 file or URL (metric fid)"),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON"),
    out: Optional[Path] = typer.Option(None, "--out", callback=local_path,
                                       help="JSON result (default: RUN/eval/recover.json)"),
    figure: Optional[Path] = typer.Option(None, "--figure", callback=local_path,
                                          help="Where to save the panels (default: RUN/figures/recover.png)"),
    figure_sigma: Optional[List[str]] = typer.Option(None, "--figure-sigma", help="σ shown in the figure (default: "
                                                                                  "4 spread over --sigma)"),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="Seeds the subset (paper) and each item's noise at each "
                                                            "σ (default: the recipe's seed, as the run's report)"),
    device: str = typer.Option("cpu", "--device"),
):
    """Section 5.1 / Table 1 of the paper: noise data at each σ, denoise once with student and teacher, and measure
    each recovered set's distance to real data; a table (σ in columns), JSON, and a Figure-4-style panel (rows
    clean / noisy / teacher / student)."""
    from dpdm.core.errors import DpdmError
    from dpdm.core.eval.figures import check_format
    from dpdm.core.eval.recovery import check_protocol
    from dpdm.core.io.storage import check_destination
    from dpdm.core.pipeline.rundir import EVAL, FIGURES, resolve_run

    check_protocol(protocol)
    sigmas = floats(sigma, "--sigma") if sigma else list(PAPER_SIGMAS)
    if not sigmas or any(s <= 0 for s in sigmas):
        raise DpdmError(f"--sigma: noise levels must be positive, got {sigmas}")
    shown = floats(figure_sigma, "--figure-sigma") if figure_sigma else figure_sigmas(sigmas)
    missing = [s for s in shown if s not in sigmas]
    if missing:
        raise DpdmError(f"--figure-sigma {missing} are not among --sigma {sigmas}")
    if num is not None and num < 2:
        raise DpdmError(f"--num must be at least 2, got {num}")
    if figure is not None:
        check_format(figure, "--figure")
    run_dir = resolve_run(run)
    # where the results go, before anything is loaded or computed
    check_destination(str(out) if out else run_dir.file(EVAL, "recover.json"), what="--out " if out else "")
    check_destination(str(figure) if figure else run_dir.file(FIGURES, "recover.png"),
                      what="--figure " if figure else "")

    import torch
    from dpdm.core.eval import protocols as ev
    from dpdm.core.eval import recovery as rec
    from dpdm.core.pipeline.run import load_run, make_dataset, recovery_setup
    from dpdm.core.train.distributed import resolve_device

    dev = resolve_device(device)
    recipe = run_dir.recipe()
    train_set, test_set = make_dataset(recipe.data, "train"), make_dataset(recipe.data, "test")
    metric_spec(metric, detector, recipe, test_set.kind)  # a metric that does not apply: refused before loading
    recipe, teacher, student = load_run(run_dir, device=dev)
    n = num if num is not None else recipe.eval.recovery_num
    seed = recipe.seed if seed is None else seed
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
    broken = sorted({role for v in table.values() for role in ("student", "teacher")
                     if not math.isfinite(v[role])})
    for role in broken:  # finite weights (checked at load) can still overflow: say so, not a silent nan
        sigmas_off = [f"{s:g}" for s, v in table.items() if not math.isfinite(v[role])]
        err.print(f"[yellow]warning:[/] the {role} ({escape(run_dir.checkpoint(role))}) gave non-finite outputs "
                  f"(NaN/Inf) at σ = {', '.join(sigmas_off)}: its scores there are not numbers; the model diverged",
                  highlight=False, soft_wrap=True)
    clean = rec.first(items, keep if keep is not None else len(items))
    fig_path = figure or run_dir.figures / "recover.png"
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
              "figure": run_dir.final(fig_path) if fig_path else None}
    if note:
        result["note"] = note
    if det is not None and getattr(det, "accuracy", None) is not None:
        result["detector_test_accuracy"] = det.accuracy
    out_path = out or run_dir.eval_dir / "recover.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))
    run_dir.publish()
    out_path = run_dir.final(out_path)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    show_table(recovery_table(result))
    console.print(f"wrote {escape(str(out_path))}" + (f", figure {escape(result['figure'])}" if fig_path else ""),
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
