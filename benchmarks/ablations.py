"""Ablations of the DPDM design choices on an embedded recipe, over several seeds.

Trains the recipe's teacher once, then distills one student per (variant, seed) from that same teacher
(``seed`` changes the student's training draws and the evaluation's noise; the teacher is shared) and prints a
table of mean ± standard deviation over the seeds: the student's distance at each NFE of the recipe,
one step from σ_max = 80, and the recovery ratio student/teacher at each σ. Everything is written as JSON.

A difference between two rows smaller than their spreads is not an effect: with 3 seeds, single-seed
differences under 2x were shown to be noise on these problems.

    python benchmarks/ablations.py [--recipe recipes/toy2d.yaml] [--seeds 0 1 2] [--only weighting]
                                   [--group design|lora]
                                   [--out benchmarks/results/ablations-toy2d.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

from dpdm.core.config.recipe import load_recipe
from dpdm.core.pipeline.run import run

# Each variant is a list of overrides on top of the recipe (which carries the paper's reading: w = σ², no
# normaliser, fake-first, the ρ = 40 schedule). The rows first.
VARIANTS = {
    "recipe": [],
    "weighting edm (EDM's training weight), log-uniform σ": ["train.divergence.weighting=edm"],
    # EDM's own pair, the other reading of "the same weighting as diffusion training": its weight and its σ law
    "EDM's pair: weighting edm, σ log-normal": [
        "train.divergence.weighting=edm",
        "train.sigma={kind: lognormal, P_mean: -1.2, P_std: 1.2, min: 0.002, max: 80.0}"],
    "DMD normaliser on": ["train.divergence.normalize=true"],
    "order student-first (DMD2's)": ["train.order=student-first"],
    "before issue 12: normaliser, student-first": ["train.divergence.normalize=true", "train.order=student-first"],
    "renoise at an independent σ": ["train.divergence.renoise=independent"],
    "student σ log-normal (EDM's)": ["train.sigma={kind: lognormal, P_mean: -1.2, P_std: 1.2, min: 0.002, max: 80.0}"],
    "1 fake update per student update": ["train.fake_updates=1"],
    "no student EMA": ["train.ema_halflife_nimg=null"],
    "ikl (Diff-Instruct, data-free)": ["train.divergence={name: ikl, weighting: diffusion, normalize: false}"],
}
# Issue 16: the fake score as low-rank adapters on the frozen teacher (train.fake_lora) against the full copy, at
# the fake score's own learning rate (the recipe's fake_lr); `--group lora`.
LORA_VARIANTS = {
    "full fake (recipe)": [],
    "fake_lora rank 4": ["train.fake_lora={rank: 4}"],
    "fake_lora rank 16": ["train.fake_lora={rank: 16}"],
    "fake_lora rank 64": ["train.fake_lora={rank: 64}"],
    # adapters often want a larger learning rate than full fine-tuning: ten times the recipe's, and the full fake
    # score at the same, so that an effect of the rate alone is seen as such
    "fake_lora rank 16, fake_lr x10": ["train.fake_lora={rank: 16}", "train.fake_lr=1e-3"],
    "full fake, fake_lr x10": ["train.fake_lr=1e-3"],
}
GROUPS = {"design": VARIANTS, "lora": LORA_VARIANTS}
# ρ only enters sampling: benchmarks/schedule_rho.py compares ρ = 40 with EDM's 7 on the same trained students.
# The evaluation each variant needs: the student's sweep, one step, recovery; the teacher's sweep is not read.
EVAL_ONLY_WHAT_IS_READ = ["eval.teacher_samplers=[heun]", "eval.teacher_nfe=[35]"]


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{m:.3g}±{s:.2g}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/toy2d.yaml")
    parser.add_argument("--out", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], help="extra overrides for every variant")
    parser.add_argument("--only", action="append", default=None, help="run only variants containing this text")
    parser.add_argument("--group", choices=sorted(GROUPS), default="design",
                        help="design: the design choices (issue 12); lora: the fake score as adapters (issue 16)")
    args = parser.parse_args()
    base = load_recipe(args.recipe, args.set)
    suffix = "" if args.group == "design" else f"-{args.group}"
    out = Path(args.out or f"benchmarks/results/ablations-{base.name}{suffix}.json")
    work = Path(tempfile.mkdtemp(prefix="dpdm-ablations-"))
    chosen = {k: v for k, v in GROUPS[args.group].items() if not args.only or any(o in k for o in args.only)}

    # The shared teacher, trained once with the recipe's seed.
    teacher_run = run(load_recipe(args.recipe, args.set + EVAL_ONLY_WHAT_IS_READ + ["train.steps=1"]),
                      work / "teacher")
    teacher_ckpt = str(work / "teacher" / "checkpoints" / "teacher.safetensors")
    metric = teacher_run["metric"]

    rows = {}
    t_all = time.perf_counter()
    for label, overrides in chosen.items():
        runs = []
        for seed in args.seeds:
            recipe = load_recipe(args.recipe, args.set + EVAL_ONLY_WHAT_IS_READ + overrides +
                                 [f"teacher.checkpoint={teacher_ckpt}", f"seed={seed}"])
            t0 = time.perf_counter()
            report = run(recipe, work / f"v{len(rows)}-s{seed}")
            student = next(iter(report["sweep"]["student"].values()))
            runs.append({"seed": seed, "student": student,
                         "one_step_sigma80": report["one_step"]["validation"].get("80.0"),
                         "recovery_ratio": report["checks"]["recovery_ratio"],
                         "seconds": time.perf_counter() - t0})
            print(f"done: {label}, seed {seed} ({runs[-1]['seconds']:.0f}s)", flush=True)
        rows[label] = {"overrides": overrides, "runs": runs}

    nfes = list(rows[next(iter(rows))]["runs"][0]["student"])
    sigmas = list(rows[next(iter(rows))]["runs"][0]["recovery_ratio"])
    load = os.getloadavg()
    print(f"\n{base.name}: {metric}, lower is better; mean ± std over seeds {args.seeds} "
          f"(load average {load[0]:.1f} at the end)")
    head = f"{'variant':<36}" + "".join(f"{'NFE ' + n:>13}" for n in nfes) + f"{'1 step σ80':>13}"
    head += "".join(f"{'rec σ=' + s:>13}" for s in sigmas)
    print(head)
    for label, r in rows.items():
        line = f"{label:<36}"
        line += "".join(f"{fmt([x['student'].get(n) for x in r['runs']]):>13}" for n in nfes)
        line += f"{fmt([x['one_step_sigma80'] for x in r['runs']]):>13}"
        line += "".join(f"{fmt([x['recovery_ratio'].get(s) for x in r['runs']]):>13}" for s in sigmas)
        print(line)
        r["summary"] = {
            "student": {n: mean_std([x["student"].get(n) for x in r["runs"]]) for n in nfes},
            "one_step_sigma80": mean_std([x["one_step_sigma80"] for x in r["runs"]]),
            "recovery_ratio": {s: mean_std([x["recovery_ratio"].get(s) for x in r["runs"]]) for s in sigmas},
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"recipe": base.name, "metric": metric, "seeds": args.seeds,
                               "summary_format": "[mean, std over seeds]", "overrides_for_all": args.set,
                               "seconds": time.perf_counter() - t_all, "load_average_end": load,
                               "variants": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
