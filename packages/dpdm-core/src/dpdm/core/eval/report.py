"""``report.json`` and ``report.md`` of a run, with the paper's claims checked on the numbers.

The sweep (``report["sweep"]``) has one entry per role, ``{role: {sampler: {nfe: value}}}``: ``student`` (the
distilled model with its sampler and schedule), ``teacher`` (the teacher with each ODE/SDE sampler and the
teacher schedule) and ``undistilled`` (the teacher sampled with exactly the student's sampler and schedule at
the student's step counts: what the sampler alone does, without distillation; Section 5.2, Figure 6).

The paper's claims are checked on the numbers in ``claims`` (``checks``, ``verdict``, ``cross_order``; importable
from here as before).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import DpdmError
from .claims import (  # noqa: F401  (the checks were part of this module)
    NFE_FACTOR,
    PAPER_GAP,
    PAPER_RECOVERY,
    best_teacher,
    checks,
    cross_order,
    noise_level,
    point_noise,
    verdict,
)
from .recovery import PROTOCOL_TEXT


def metric_note(metric: str) -> str:
    """What a metric's numbers are, for report headers: the ``note`` it was registered with."""
    from ..plugins.registry import entry

    try:
        e = entry("metric", metric)
    except DpdmError:
        return "a metric no installed plugin registers"
    note = e.meta.get("note")
    if note and "family_option" in e.meta:
        option, value = e.meta["family_option"]
        note = note.replace("{" + option + "}", value)
    return note or "see the metric plugin"


ROLE_ORDER = ("student", "undistilled", "teacher")
# The paper's Table 1 (CIFAR-10 recovery FID, the paper's protocol): σ -> (EDM, DPDM); ratios are compared, not values

def role_label(role: str, sampler: str) -> str:
    """How a sweep column / curve is labelled: ``undistilled`` reads as the teacher with the student's sampler."""
    if role == "undistilled":
        return f"undistilled teacher {sampler} (student's schedule)"
    return f"{role} {sampler}"


def sweep_roles(sweep: dict) -> list[str]:
    """The roles of a sweep in table order: student, undistilled, teacher, then any others."""
    return [r for r in ROLE_ORDER if r in sweep] + [r for r in sweep if r not in ROLE_ORDER]


REACH_NOTE = ("— : the sampler cannot take exactly that many evaluations (Heun's NFE is 2 × steps − 1, so it "
              "reaches only odd NFEs).")


def sweep_table(sweep: dict) -> list[str]:
    """Markdown rows: one line per NFE, one column per (model, sampler); — where a sampler cannot reach that NFE."""
    columns = [(m, s) for m in sweep_roles(sweep) for s in sweep[m]]
    nfes = sorted({int(n) for by in sweep.values() for v in by.values() for n in v})
    lines = ["| NFE | " + " | ".join(role_label(m, s) for m, s in columns) + " |", "|---" * (len(columns) + 1) + "|"]
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
    lines += [""] + [f"**Warning: {w}.**" for w in result["warnings"]] if result.get("warnings") else []
    caption = ["", REACH_NOTE] if any("heun" in by for by in result["sweep"].values()) else []
    claims = []
    c = result.get("checks")
    if c:
        claims = ["", "| student NFE K | best teacher at ≤ 3K NFE | student | teacher | better | undistilled "
                      "(student's sampler) | better |", "|---|---|---|---|---|---|---|"]
        for k, b in c["student_vs_best_teacher"].items():
            u = c["student_vs_undistilled"].get(k, {})
            where = f"{b['teacher_sampler']} ({b['teacher_nfe']})" if b["teacher_sampler"] else "—"
            claims.append(f"| {k} | {where} | {_fmt(b['student'])} | {_fmt(b['teacher'])} | "
                          f"{_yes(b['student_better'])} | {_fmt(u.get('undistilled'))} | "
                          f"{_yes(u.get('student_better'))} |")
    return "\n".join(lines + [""] + sweep_table(result["sweep"]) + caption + claims) + "\n"


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.4g}"


def _yes(flag) -> str:
    return "—" if flag is None else ("yes" if flag else "no")


def markdown(report: dict) -> str:
    metric = report["metric"]
    lines = [f"# Report: {report.get('recipe', '')}", ""]
    lines += [f"**Warning: {w}.**" for w in report.get("warnings", [])] + ([""] if report.get("warnings") else [])
    if report.get("train_steps") == 0:
        lines += ["**No distillation ran (`train.steps: 0`): the \"student\" is the network distillation would "
                  "have started from (the teacher itself unless `train.student` names another network), so its "
                  "numbers are not a DPDM result.**", ""]
    lines += [f"Metric: **{metric}** — {metric_note(metric)}.", ""]
    summary = report["checks"].get("summary")
    if summary:
        lines += [f"Verdict: {summary['verdict']}.", "",
                  "| claim | holds |", "|---|---|",
                  f"| student beats the best teacher sampler at ≤{NFE_FACTOR}× its NFE (Table 2) | "
                  f"{_yes(summary['student_beats_best_teacher'])} |",
                  f"| student recovers better than the teacher at every σ (Table 1) | "
                  f"{_yes(summary['recovery_student_better_everywhere'])} |",
                  f"| student beats the undistilled teacher with the same sampler and schedule (Section 5.2) | "
                  f"{_yes(summary['student_beats_undistilled'])} |", ""]
    if report.get("detector"):
        acc = report.get("detector_test_accuracy")
        lines += [f"Detector: `{report['detector']}`" + (f" (classifier test accuracy {acc:.4f})" if acc else "") + ".",
                  ""]
    lines += noise_markdown(report)
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
              "| σ | noisy | teacher | student | student / teacher | the paper's DPDM / EDM (Table 1, FID) | "
              "beyond noise |", "|---|---|---|---|---|---|---|"]
    ratio = report["checks"]["recovery_ratio"]
    paper = report["checks"].get("recovery_paper_ratio", {})
    margins = report["checks"].get("recovery_margin", {})
    for s, v in report["recovery"].items():
        lines.append(f"| {s} | {_fmt(v.get('noisy'))} | {_fmt(v['teacher'])} | {_fmt(v['student'])} | "
                     f"{_fmt(ratio[s])} | {_fmt(paper.get(s))} | {_yes(margins.get(s, {}).get('beyond_noise'))} |")
    lines += ["", "## Student vs teacher at matched NFE", "",
              "| student NFE | teacher sampler (NFE) | student | teacher | student better |", "|---|---|---|---|---|"]
    for k, row in report["checks"]["student_vs_teacher"].items():
        for sampler, c in row.items():
            lines.append(f"| {k} | {sampler} ({c['teacher_nfe']}) | {_fmt(c['student'])} | {_fmt(c['teacher'])} | "
                         f"{'yes' if c['student_better'] else 'no'} |")
    best = report["checks"].get("student_vs_best_teacher")
    if best:
        lines += ["", f"## Student vs the best teacher at up to {NFE_FACTOR}× the NFE (Table 2)", "",
                  "| student NFE | best teacher sampler (NFE) | student | teacher | student better | noise | "
                  "beyond noise |", "|---|---|---|---|---|---|---|"]
        for k, c in best.items():
            where = f"{c['teacher_sampler']} ({c['teacher_nfe']})" if c["teacher_sampler"] else \
                f"— (no teacher NFE ≤ {c['max_teacher_nfe']})"
            lines.append(f"| {k} | {where} | {_fmt(c['student'])} | {_fmt(c['teacher'])} | "
                         f"{_yes(c['student_better'])} | {_fmt(c.get('noise'))} | {_yes(c.get('beyond_noise'))} |")
    und = report["checks"].get("student_vs_undistilled")
    if und:
        lines += ["", "## Student vs the undistilled teacher with the student's sampler and schedule (Section 5.2)",
                  "", "| NFE | student | undistilled teacher | student better | noise | beyond noise |",
                  "|---|---|---|---|---|---|"]
        for k, c in und.items():
            lines.append(f"| {k} | {_fmt(c['student'])} | {_fmt(c['undistilled'])} | {_yes(c['student_better'])} | "
                         f"{_fmt(c.get('noise'))} | {_yes(c.get('beyond_noise'))} |")
    gap = report["checks"].get("gap_to_best_teacher")
    if gap:
        lines += ["", "## How far the student is from the teacher's best", "",
                  f"The paper (Table 2, CIFAR-10 FID): the student at 8 NFE is {PAPER_GAP['student_8']:.2f}× EDM's "
                  f"best (35 NFE); EDM at 18 NFE is {PAPER_GAP['edm_18']:.2f}×.", "",
                  "| student NFE | student | teacher's best (sampler, NFE) | teacher | student / teacher |",
                  "|---|---|---|---|---|"]
        for k, c in gap.items():
            lines.append(f"| {k} | {_fmt(c['student'])} | {c['teacher_sampler']} ({c['teacher_nfe']}) | "
                         f"{_fmt(c['teacher'])} | {_fmt(c['ratio'])} |")
    cross = report.get("cross")
    if cross:
        order = report["checks"]["cross_use"]
        samplers = list(dict.fromkeys(c for row in cross["cells"].values() for c in row))
        lines += ["", f"## Models × samplers at NFE {cross['nfe']} (Section 5.2, Figure 6)", "",
                  "| model | " + " | ".join(f"{c} sampler" for c in samplers) + " |", "|---" * (len(samplers) + 1) + "|"]
        for model, row in cross["cells"].items():
            lines.append(f"| {model} | " + " | ".join(f"{_fmt(row[c]['value'])} (NFE {row[c]['nfe']})"
                                                     for c in samplers) + " |")
        lines += ["", f"Ranking (best first): {', '.join(order['ranking'])}. The paper's order (DPDM with its sampler "
                      f"best, the teacher with the ODE sampler second, cross-uses worst) "
                      f"{'holds' if order['paper_order_holds'] else 'does not hold' if order['paper_order_holds'] is False else 'was not measured'}."]
    if "timings" in report:
        lines += ["", "## Timings (s)", ""]
        if report.get("resumed"):
            lines += ["This process resumed the run from its snapshots: the training phases' times below are what "
                      "was left to do, not what the run took.", ""]
        lines += [f"- {k}: {v:.1f}" for k, v in report["timings"].items()]
    return "\n".join(lines) + "\n"


def noise_markdown(report: dict) -> list[str]:
    """The estimator's noise, stated before any number it qualifies."""
    noise = report.get("noise")
    if not noise:
        return []
    real = noise.get("real") or {}
    lines = ["## The estimator's noise", ""]
    if real:
        lines.append(f"- Real data scored as samples are: two disjoint sets of {real['num']} training items give "
                     f"{_fmt(real['a'])} and {_fmt(real['b'])} (no model can do better at this sample size; their "
                     f"difference, {_fmt(real['spread'])}, is the estimator's spread).")
    if noise.get("seeds"):
        lines.append(f"- Evaluation seeds {noise['seeds']}: the claims' points move by up to "
                     f"{_fmt(noise['seed_spread'])} between seeds.")
        for role, by in noise["sweep"].items():
            for sampler, vals in by.items():
                cells = ", ".join(f"NFE {n}: " + " / ".join(_fmt(v) for v in vs) for n, vs in vals.items())
                lines.append(f"  - {role_label(role, sampler)}: {cells}")
    if report["checks"].get("noise") is not None:
        lines.append("- A comparison is claimed only when its difference exceeds the larger of the real halves' "
                     "spread and the seed spread of the two points compared (column \"noise\" below).")
    return lines + [""]


# a score this many times the real data's (the larger of its two halves' scores and their spread) is no sampling
# error: normal toy2d runs stay below 2e5x (the teacher's Heun at 3 NFE, whose samples are far off), a student
# trained with lr 1e3 scored 1e12x
ABSURD = 1e7


def warnings(report: dict) -> list[str]:
    """What says the samples themselves are broken: a non-finite score (NaN/Inf samples), or one ``ABSURD`` times the
    real data's own; each names the model, sampler and NFE."""
    real = (report.get("noise") or {}).get("real") or {}
    scale = max((abs(real[k]) for k in ("a", "b", "spread") if isinstance(real.get(k), (int, float))), default=0)
    points = [(f"{role_label(m, s)} at NFE {n}", v) for m, by in report.get("sweep", {}).items()
              for s, vals in by.items() for n, v in vals.items()]
    points.append(("the one-step student", (report.get("one_step") or {}).get("value")))
    out = []
    for where, v in points:
        if not isinstance(v, (int, float)):
            continue
        if not math.isfinite(v):
            out.append(f"{where} scores {v}: its samples are non-finite (NaN/Inf), the model diverged")
        elif scale > 0 and abs(v) > ABSURD * scale:
            out.append(f"{where} scores {v:.3g}, {abs(v) / scale:.1e}x real data's {scale:.3g}: its samples are far "
                       "off the data (a diverged model?)")
    return out


def write_report(report: dict, json_path: str | Path, md_path: str | Path) -> None:
    """Add the checks of the paper's claims (``claims.checks``) and ``warnings`` to ``report`` and write it as JSON
    and Markdown (local paths: a run's are ``RunDir.report_json``/``report_md``)."""
    report["checks"] = checks(report)
    report["warnings"] = warnings(report)
    Path(json_path).write_text(json.dumps(report, indent=2))
    Path(md_path).write_text(markdown(report))
