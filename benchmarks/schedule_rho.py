"""The DPDM schedule's ρ (Appendix B.1: 40; EDM's ODE schedule: 7) on trained students: evaluation only.

ρ only enters sampling, so the same students are sampled with each ρ (same evaluation seed, same reference as
their run's report) and scored at each step count; the table gives mean ± standard deviation over the runs
(e.g. the 3 seeds of an ablation row), and the paired difference per run.

    python benchmarks/schedule_rho.py RUN_DIR [RUN_DIR ...] [--rho 40 7] [--steps 1 2 4 8] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--rho", type=float, nargs="+", default=[40.0, 7.0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from dpdm.core.eval import protocols as ev
    from dpdm.core.eval.metrics import make_metric
    from dpdm.core.pipeline.run import load_run, make_dataset, references

    values = {rho: {n: [] for n in args.steps} for rho in args.rho}
    for run_dir in args.runs:
        recipe, _, student = load_run(run_dir)
        train, test = make_dataset(recipe.data, "train"), make_dataset(recipe.data, "test")
        reference, _ = references(recipe, train, test, recipe.eval.num_samples)
        metric = make_metric(recipe.eval.metric.name, dict(recipe.eval.metric.options),
                             data=(recipe.data.name, recipe.data.options))
        sampler = recipe.eval.student_sampler
        for rho in args.rho:
            schedule = {**recipe.eval.student_schedule.as_dict(), "rho": rho}
            got, _ = ev.sweep_student(student, metric, reference, sampler=sampler, schedule=schedule,
                                      steps=args.steps, num=recipe.eval.num_samples, shape=tuple(test.shape),
                                      label_dim=test.label_dim, seed=recipe.seed, device="cpu", keep=0)
            for n, v in zip(args.steps, got.values()):
                values[rho][n].append(float(v))
        print(f"done: {run_dir}", flush=True)

    def ms(xs):
        return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)

    print(f"\n{len(args.runs)} students, {recipe.eval.metric.name} (lower is better), mean ± std over the students")
    print(f"{'ρ':>6}" + "".join(f"{'steps ' + str(n):>20}" for n in args.steps))
    for rho in args.rho:
        print(f"{rho:>6g}" + "".join(f"{'%.3g ± %.2g' % ms(values[rho][n]):>20}" for n in args.steps))
    base = args.rho[0]
    for rho in args.rho[1:]:
        wins = {n: sum(a < b for a, b in zip(values[base][n], values[rho][n])) for n in args.steps}
        print(f"ρ={base:g} better than ρ={rho:g} in " + ", ".join(f"{w}/{len(args.runs)} at {n} steps"
                                                                for n, w in wins.items()))
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": args.runs, "metric": recipe.eval.metric.name,
                                              "values": {str(r): {str(n): v for n, v in by.items()}
                                                         for r, by in values.items()}}, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
