"""``dpdm data``: make EDM dataset ZIPs (``prepare``), describe datasets (``info``), fetch the official files
(``download``).

The work happens in ``dpdm.data.prepare``, ``dpdm.data.info`` and ``dpdm.data.download``, imported inside the
commands so that ``dpdm --help`` stays fast. Progress bars go to stderr, reports to stdout (``--json`` for machines).
"""

from __future__ import annotations

import json
from typing import List, Optional

import typer
from rich.markup import escape

from .common import console, err, user_errors

data_app = typer.Typer(no_args_is_help=True, help="Prepare EDM dataset ZIPs, describe datasets, download official "
                                                  "dataset files.")

SHOWN_SKIPPED = 100  # skipped files listed in the text report (--json lists them all)
SHOWN_UNREADABLE = 5  # unreadable files named by `data info` (--json lists them all)


def _print_report(report) -> None:
    """The human-readable summary of a ``dpdm.data.prepare.Report``."""
    console.print(f"wrote {escape(report.dst)}", highlight=False)
    console.print(f"  source    {report.kind} {escape(report.src)}", highlight=False)
    console.print(f"  images    {report.count}, {report.resolution}x{report.resolution}, {report.channels} "
                  f"channel{'s' if report.channels != 1 else ''}", highlight=False)
    if report.label_dim:
        names = f" ({escape(', '.join(report.classes))})" if report.classes else ""
        console.print(f"  labels    label_dim {report.label_dim}{names}", highlight=False)
    else:
        console.print("  labels    none", highlight=False)
    if report.skipped:
        n = len(report.skipped)
        console.print(f"  skipped   {n} file{'s' if n != 1 else ''}:", highlight=False)
        for name, reason in report.skipped[:SHOWN_SKIPPED]:
            console.print(f"    {escape(name)}: {escape(reason)}", highlight=False)
        if len(report.skipped) > SHOWN_SKIPPED:
            console.print(f"    ... and {len(report.skipped) - SHOWN_SKIPPED} more (--json lists them all)",
                          highlight=False)
    else:
        console.print("  skipped   none", highlight=False)
    for note in report.notes:
        console.print(f"  [yellow]note:[/] {escape(note)}", highlight=False)


@data_app.command("prepare")
@user_errors
def prepare(
    src: str = typer.Argument(..., help="Image folder (flat or one subfolder per class), zip of images, "
                                        "cifar-10-python.tar.gz, MNIST IDX folder or .npz; a path or fsspec URL"),
    dst: str = typer.Argument(..., help="The EDM dataset ZIP to write, a path or fsspec URL ending in .zip"),
    resolution: Optional[str] = typer.Option(None, "--resolution", "-r",
                                             help="Output size: 64 (64x64); WxH for center-crop-wide. "
                                                  "Needed when the images differ in size"),
    transform: str = typer.Option("none", "--transform",
                                  help="none | center-crop (EDM, LANCZOS) | center-crop-wide (EDM) | "
                                       "center-crop-adm (ADM: BOX halving, BICUBIC)"),
    source: Optional[str] = typer.Option(None, "--source",
                                         help="Force the source kind: folder | zip | cifar10 | mnist | "
                                              "fashion-mnist | npz (default: detected from SRC)"),
    split: Optional[str] = typer.Option(None, "--split", help="train (default) or test, for cifar10, mnist, npz"),
    labels: Optional[bool] = typer.Option(None, "--labels/--no-labels",
                                          help="Write class labels (default: when the source has them)"),
    channels: Optional[int] = typer.Option(None, "--channels",
                                           help="1 (grayscale) or 3 (RGB); default: the source's own, RGB for "
                                                "image files"),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="Stop after this many images"),
    workers: Optional[int] = typer.Option(None, "--workers",
                                          help="Decoding processes (default: min(8, CPUs), one per 64 images at most)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace DST if it exists"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON"),
):
    """Convert images into an EDM dataset ZIP (uncompressed PNGs and dataset.json).

    As EDM's dataset_tool.py does; ImageNet 64x64, for instance, is
    `dpdm data prepare train/ imagenet-64x64.zip --resolution 64 --transform center-crop`.
    Corrupt and non-image files are skipped and listed in the report; DST appears only when complete."""
    from dpdm.core.progress import RichProgress
    from dpdm.data.prepare import prepare as run_prepare

    from dpdm.core.train.signals import Interrupted, stop_on_signals

    try:  # SIGTERM and Ctrl-C unwind: the worker pool is shut down and the temporary ZIP removed (exit 143 / 130)
        with stop_on_signals():
            report = run_prepare(src, dst, resolution=resolution, transform=transform, kind=source, split=split,
                                 labels=labels, channels=channels, max_images=max_images, workers=workers,
                                 overwrite=overwrite, progress=RichProgress(err))
    except Interrupted as exc:
        err.print(f"[yellow]{escape(exc.describe())}: nothing was written to {escape(dst)}[/]", highlight=False)
        raise typer.Exit(exc.status) from None
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        _print_report(report)


@data_app.command("info")
@user_errors
def info(
    path: Optional[str] = typer.Argument(None, help="Dataset ZIP or folder (or cifar10 / MNIST / .npz source), "
                                                    "a path or fsspec URL"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Registered dataset name (default: from PATH)"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Dataset option: --set xflip=true (repeatable)"),
    split: str = typer.Option("train", "--split", help="Split to describe"),
    grid: Optional[str] = typer.Option(None, "--grid", help="Write a PNG grid of sample images here"),
    num: int = typer.Option(64, "--num", help="Images in the grid"),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON"),
):
    """Describe a dataset: count, resolution, channels, label_dim and classes.

    --grid OUT.png writes a grid of --num images spread evenly over the dataset."""
    from dpdm.core.config.structure import parse_value
    from dpdm.core.errors import DpdmError
    from dpdm.core.progress import RichProgress
    from dpdm.data import info as di

    options = {}
    for item in set_ or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise DpdmError(f"--set {item!r}: expected key=value, e.g. --set xflip=true")
        options[key.strip()] = parse_value(value)
    name, ds = di.open_dataset(path, dataset, split, options)
    facts = di.describe(name, ds, path, progress=RichProgress(err), labels=options.get("labels", True) is not False)
    if grid:
        di.save_png(di.sample_grid(ds, num), grid)
        facts["grid"] = grid
    if as_json:
        print(json.dumps(facts, indent=2))
        return
    console.print(f"{escape(path or name)}: {name}, split {split}", highlight=False)
    console.print(f"  count       {facts['count']}", highlight=False)
    bad = facts.get("unreadable") or []
    if bad:
        shown = ", ".join(bad[:SHOWN_UNREADABLE]) + (", ..." if len(bad) > SHOWN_UNREADABLE else "")
        console.print(f"  unreadable  {len(bad)} file{'s' if len(bad) != 1 else ''} that cannot be decoded, not "
                      f"counted: {escape(shown)} (--json lists them all)", highlight=False)
    if facts["kind"] == "image":
        console.print(f"  resolution  {facts['resolution']}", highlight=False)
        console.print(f"  channels    {facts['channels']}", highlight=False)
    else:
        console.print(f"  shape       {tuple(facts['shape'])} ({facts['kind']})", highlight=False)
    console.print(f"  label_dim   {facts['label_dim']}", highlight=False)
    if facts.get("labels_from") == "class folders":
        console.print("  labels      from the class folders, as `dpdm data prepare` writes them (the image-folder "
                      "dataset reads labels from dataset.json only: prepare a ZIP to train with them)",
                      highlight=False)
    if facts["histogram"] is not None:
        names = facts["classes"] or []
        for i, n in enumerate(facts["histogram"]):
            label = f" {escape(names[i])}" if i < len(names) else ""
            console.print(f"    {i:>4}{label}: {n}", highlight=False)
    if grid:
        console.print(f"  grid        {escape(grid)}", highlight=False)


@data_app.command("download")
@user_errors
def download(
    name: str = typer.Argument(..., help="cifar10, mnist or fashion-mnist"),
    dest: str = typer.Argument(..., help="Folder to download into, a path or fsspec URL"),
    mirror: Optional[str] = typer.Option(None, "--mirror", help="Base URL or folder to fetch the files from instead"),
):
    """Download a dataset's official files into DEST and check their md5 sums."""
    from dpdm.core.progress import RichProgress
    from dpdm.data.download import data_path
    from dpdm.data.download import download as fetch

    for written in fetch(name, dest, mirror=mirror, progress=RichProgress(err)):
        console.print(escape(written), highlight=False)
    console.print(f"data.path: {escape(data_path(name, dest))}", highlight=False)
