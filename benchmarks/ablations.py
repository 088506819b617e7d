"""Ablations of the DPDM design choices on an embedded recipe (the prototype's findings, re-measured).

Trains the recipe's teacher once, then distills one student per variant from that same teacher
and prints a table (student distance at NFE 1/2/4, one step from σ_max = 80, recovery ratios),
also written as JSON.

    python benchmarks/ablations.py [--recipe recipes/toy2d.yaml] [--out benchmarks/results/ablations-toy2d.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from dpdm.core.config import load_recipe
from dpdm.core.run import run

VARIANTS = {
    "recipe (same σ, log-uniform, 5 fake, normaliser, EMA)": [],
    "renoise at an independent σ": ["train.divergence.renoise=independent"],
    "student σ log-normal (EDM's)": ["train.sigma={kind: lognormal, P_mean: -1.2, P_std: 1.2, min: 0.002, max: 80.0}"],
    "1 fake update per student update": ["train.fake_updates=1"],
    "no per-sample normaliser": ["train.divergence.normalize=false"],
    "no student EMA": ["train.ema_halflife_nimg=null"],
    "lr 1e-3": ["train.lr=1e-3", "train.fake_lr=1e-3"],
    "ikl (Diff-Instruct, data-free)": ["train.divergence={name: ikl, weighting: diffusion, normalize: true}"],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/toy2d.yaml")
    parser.add_argument("--out", default=None)
    parser.add_argument("--set", action="append", default=[], help="extra overrides for every variant")
    parser.add_argument("--only", action="append", default=None, help="run only variants containing this text")
    args = parser.parse_args()
    base = load_recipe(args.recipe, args.set)
    out = Path(args.out or f"benchmarks/results/ablations-{base.name}.json")
    work = Path(tempfile.mkdtemp(prefix="dpdm-ablations-"))

    # The shared teacher: the first variant trains it; the others load its checkpoint.
    rows = {}
    teacher_ckpt = None
    for label, overrides in VARIANTS.items():
        if args.only and not any(o in label for o in args.only):
            continue
        extra = [f"teacher.checkpoint={teacher_ckpt}"] if teacher_ckpt else []
        recipe = load_recipe(args.recipe, args.set + overrides + extra)
        t0 = time.perf_counter()
        report = run(recipe, work / f"v{len(rows)}")
        if teacher_ckpt is None:
            teacher_ckpt = str(work / "v0" / "checkpoints" / "teacher.safetensors")
        student = next(iter(report["sweep"]["student"].values()))
        rows[label] = {
            "overrides": overrides,
            "student": {k: student.get(k) for k in ("1", "2", "4", "8")},
            "one_step_sigma80": report["one_step"]["validation"].get("80.0"),
            "recovery_ratio": report["checks"]["recovery_ratio"],
            "seconds": time.perf_counter() - t0,
        }
        print(f"done: {label} ({rows[label]['seconds']:.0f}s)", flush=True)

    metric = report["metric"]
    head = f"{'variant':<55} {'NFE1':>9} {'NFE2':>9} {'NFE4':>9} {'1@σ80':>9}  recovery student/teacher at σ"
    print(f"\n{base.name}: {metric} (lower is better)\n{head}")
    for label, r in rows.items():
        s = r["student"]
        ratios = " ".join(f"{k}:{v:.3f}" if v is not None else f"{k}:—" for k, v in r["recovery_ratio"].items())
        print(f"{label:<55} {s['1']:>9.4g} {s['2']:>9.4g} {s['4']:>9.4g} {r['one_step_sigma80']:>9.4g}  {ratios}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"recipe": base.name, "metric": metric, "variants": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
