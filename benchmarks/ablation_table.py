"""Mean ± standard deviation over seeds of finished runs, one row per variant: the table of ``ablations.py``
built from run directories (each holding a ``report.json``), e.g. when rows were produced by separate
``ablations.py`` invocations that share one teacher (the same recipe and seed train the same teacher, bit for
bit on CPU).

    python benchmarks/ablation_table.py --row "recipe=/tmp/dpdm-ablations-x/v0-s*" --row "w=σ²=/tmp/.../v1-s*" \\
        [--title toy2d] [--out benchmarks/results/ablations-toy2d.json] [--markdown]

A row is ``LABEL=GLOB[,GLOB...]``; the label may itself contain '=' and ','; the globs are what follows the
last '='.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import statistics
from pathlib import Path

from ablations import record  # benchmarks/ is on the path when this script runs


def mean_std(values) -> tuple[float, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt(ms: tuple[float, float]) -> str:
    return f"{ms[0]:.3g} ± {ms[1]:.2g}"


def row(paths: list[str]) -> dict:
    runs = []
    for p in sorted(paths):
        report = json.loads((Path(p) / "report.json").read_text())
        runs.append({"run": p, **record(report), "recovery_protocol": report.get("recovery_protocol", "heldout")})
    nfes = list(runs[0]["student"])
    sigmas = list(runs[0]["recovery_ratio"])
    summary = {"student": {n: mean_std([r["student"].get(n) for r in runs]) for n in nfes},
               "one_step_sigma80": mean_std([r["one_step_sigma80"] for r in runs]),
               "recovery_ratio": {s: mean_std([r["recovery_ratio"].get(s) for r in runs]) for s in sigmas}}
    return {"runs": runs, "summary": summary}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--row", action="append", required=True, help="LABEL=GLOB[,GLOB...] of run directories")
    parser.add_argument("--title", default="")
    parser.add_argument("--metric", default="energy")
    parser.add_argument("--out", default=None)
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    rows = {}
    for spec in args.row:
        label, _, pattern = spec.rpartition("=")
        paths = [p for pat in pattern.split(",") for p in glob.glob(pat)
                 if (Path(p) / "report.json").exists()]  # finished runs only
        if not label or not paths:
            raise SystemExit(f"--row {spec!r}: expected LABEL=GLOB matching finished run directories")
        rows[label] = row(paths)
    first = next(iter(rows.values()))["summary"]
    nfes, sigmas = list(first["student"]), list(first["recovery_ratio"])
    head = ["variant", "seeds"] + [f"NFE {n}" for n in nfes] + ["1 step σ80"] + [f"rec. ratio σ={s}" for s in sigmas]
    lines = []
    for label, r in rows.items():
        s = r["summary"]
        cells = [label, str(len(r["runs"]))] + [fmt(s["student"][n]) for n in nfes] + [fmt(s["one_step_sigma80"])]
        cells += [fmt(s["recovery_ratio"][x]) for x in sigmas]
        lines.append(cells)
    print(f"{args.title}: {args.metric} of the student's samples (lower is better) and recovery ratio student/teacher "
          f"(lower is better), mean ± std over seeds")
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for cells in lines:
            print("| " + " | ".join(cells) + " |")
    else:
        for cells in [head] + lines:
            print("  ".join(f"{c:<44}" if i == 0 else f"{c:>16}" for i, c in enumerate(cells)))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"title": args.title, "metric": args.metric,
                                              "summary_format": "[mean, std over seeds]", "variants": rows},
                                             indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
