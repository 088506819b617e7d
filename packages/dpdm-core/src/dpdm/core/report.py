"""``report.json`` and ``report.md`` of a run, with the paper's claims checked on the numbers.

Checks (recorded, never assumed):
- ``student_vs_teacher``: for each student NFE k and each teacher sampler, the student's distance
  against the teacher's at the smallest NFE ≥ k that sampler reached (Heun only reaches odd
  NFEs, so at k = 2 it gets 3: the comparison never gives the teacher fewer evaluations).
- ``recovery_ratio``: student / teacher recovery distance per σ (the paper's Table 1 effect).
"""

from __future__ import annotations

import json
from pathlib import Path

from .recovery import PROTOCOL_TEXT

METRIC_NOTES = {
    "energy": "squared energy distance (Székely & Rizzo), U-statistic estimate, in model space; lower is better",
    "sliced-wasserstein": "sliced 2-Wasserstein distance over random projections, in model space; lower is better",
    "fid": "Fréchet Inception Distance (Inception-v3 pool features, as EDM computes it); lower is better",
}


def metric_note(metric: str) -> str:
    """What a metric's numbers are, for report headers."""
    if metric in METRIC_NOTES:
        return METRIC_NOTES[metric]
    if metric.startswith("fd-"):
        return (f"Fréchet distance in the features of a small classifier trained on {metric[3:]} (a substitute for FID, "
                f"not comparable with published FIDs); lower is better")
    return "see the metric plugin"


REACH_NOTE = ("— : the sampler cannot take exactly that many evaluations (Heun's NFE is 2 × steps − 1, so it "
              "reaches only odd NFEs).")


def sweep_table(sweep: dict) -> list[str]:
    """Markdown rows: one line per NFE, one column per (model, sampler); — where a sampler cannot reach that NFE."""
    columns = [(m, s) for m in ("student", "teacher") for s in sweep.get(m, {})]
    nfes = sorted({int(n) for by in sweep.values() for v in by.values() for n in v})
    lines = ["| NFE | " + " | ".join(f"{m} {s}" for m, s in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for n in nfes:
        lines.append(f"| {n} | " + " | ".join(_fmt(sweep[m][s].get(str(n))) for m, s in columns) + " |")
    return lines


def sweep_markdown(result: dict) -> str:
    """``dpdm eval sweep``'s ``sweep.md``: the metric vs NFE table (the paper's Table 4 layout)."""
    metric = result["metric"]
    lines = [f"# NFE sweep: {result.get('run', '')}", "",
             f"Metric: **{metric}** — {metric_note(metric)}. {result['num']} samples per entry, seed {result['seed']}, "
             f"reference: {result.get('ref')}."]
    if result.get("detector_test_accuracy") is not None:
        lines[-1] += f" Classifier test accuracy: {result['detector_test_accuracy']:.4f}."
    caption = ["", REACH_NOTE] if any("heun" in by for by in result["sweep"].values()) else []
    return "\n".join(lines + [""] + sweep_table(result["sweep"]) + caption) + "\n"


def checks(report: dict) -> dict:
    student = next(iter(report["sweep"]["student"].values()))
    vs = {}
    for k, value in student.items():
        row = {}
        for sampler, values in report["sweep"]["teacher"].items():
            candidates = sorted(int(n) for n in values if int(n) >= int(k))
            if candidates:
                n = candidates[0]
                row[sampler] = {"teacher_nfe": n, "teacher": values[str(n)], "student": value,
                                "student_better": value < values[str(n)]}
        vs[k] = row
    ratio = {s: (v["student"] / v["teacher"] if v["teacher"] > 0 else None) for s, v in report["recovery"].items()}
    return {"student_vs_teacher": vs, "recovery_ratio": ratio}


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.4g}"


def markdown(report: dict) -> str:
    metric = report["metric"]
    lines = [f"# Report: {report.get('recipe', '')}", "",
             f"Metric: **{metric}** — {metric_note(metric)}.", ""]
    if report.get("detector"):
        acc = report.get("detector_test_accuracy")
        lines += [f"Detector: `{report['detector']}`" + (f" (classifier test accuracy {acc:.4f})" if acc else "") + ".",
                  ""]
    lines += ["## Sampling quality vs NFE", ""]
    lines += sweep_table(report["sweep"])
    if any("heun" in by for by in report["sweep"].values()):
        lines += ["", REACH_NOTE]
    one = report.get("one_step")
    if one:
        lines += ["", f"One step from the best σ_max (chosen on validation data): σ_max = {one['best_sigma_max']:g}, "
                      f"{metric} = {_fmt(one['value'])}.", "",
                  "| σ_max | validation " + metric + " |", "|---|---|"]
        lines += [f"| {s} | {_fmt(v)} |" for s, v in one["validation"].items()]
    protocol = report.get("recovery_protocol", "heldout")
    lines += ["", f"## Recovery (Section 5.1), protocol {protocol}: distance of denoised data to real data", "",
              f"Protocol `{protocol}`: {PROTOCOL_TEXT[protocol]}"
              + (f" ({report['recovery_num']} items; reference: {report['recovery_reference']})"
                 if report.get("recovery_reference") else "")
              + f". The clean items themselves score {_fmt(report.get('recovery_floor'))} (the estimator's floor).",
              "",
              "| σ | noisy | teacher | student | student / teacher |", "|---|---|---|---|---|"]
    ratio = report["checks"]["recovery_ratio"]
    for s, v in report["recovery"].items():
        lines.append(f"| {s} | {_fmt(v.get('noisy'))} | {_fmt(v['teacher'])} | {_fmt(v['student'])} | "
                     f"{_fmt(ratio[s])} |")
    lines += ["", "## Student vs teacher at matched NFE", "",
              "| student NFE | teacher sampler (NFE) | student | teacher | student better |", "|---|---|---|---|---|"]
    for k, row in report["checks"]["student_vs_teacher"].items():
        for sampler, c in row.items():
            lines.append(f"| {k} | {sampler} ({c['teacher_nfe']}) | {_fmt(c['student'])} | {_fmt(c['teacher'])} | "
                         f"{'yes' if c['student_better'] else 'no'} |")
    if "timings" in report:
        lines += ["", "## Timings (s)", ""] + [f"- {k}: {v:.1f}" for k, v in report["timings"].items()]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    report["checks"] = checks(report)
    (Path(out) / "report.json").write_text(json.dumps(report, indent=2))
    (Path(out) / "report.md").write_text(markdown(report))
