"""The paper's claims checked on a run's numbers (``report.json``'s ``checks``); ``report`` writes them.

Checks (recorded, never assumed):
- ``student_vs_teacher``: for each student NFE k and each teacher sampler, the student's distance
  against the teacher's at the smallest NFE ≥ k that sampler reached (Heun only reaches odd
  NFEs, so at k = 2 it gets 3: the comparison never gives the teacher fewer evaluations).
- ``student_vs_best_teacher``: for each student NFE k, the student against the best teacher value over all
  teacher samplers at NFE ≤ 3k (Table 2: DPDM at 5 NFE, 3.85, beats EDM's ODE sampler at 15 NFE, 5.62), with
  the sampler and NFE that were best.
- ``student_vs_undistilled``: for each student NFE k, the student against the undistilled teacher with the
  same sampler and schedule (Section 5.2: the DPDM sampler on the undistilled model is worse).
- ``recovery_ratio``: student / teacher recovery distance per σ (the paper's Table 1 effect), and
  ``recovery_student_better_everywhere``: the student's distance is below the teacher's at every σ.
- ``cross_use`` (when ``report["cross"]``): Figure 6's order at one NFE — the student with the DPDM sampler best, the
  teacher with the ODE sampler (Heun) second, the two cross-uses worst — and whether it holds.
- ``gap_to_best_teacher``: the student at each K against the teacher's best value at any NFE (the paper, CIFAR-10:
  the student at 8 NFE, 2.68, sits between EDM at 18 NFE, 3.24, and at 35, 1.97), as a ratio.
- ``noise`` (when ``report["noise"]``): the two real halves' spread (``noise_level``); every comparison above then
  carries ``margin``, its own ``noise`` (``point_noise``: that spread or the compared points' spreads over the
  evaluation seeds, whichever is largest) and ``beyond_noise``.
- ``summary``: the three claims as booleans (None where nothing could be compared) and a one-line ``verdict``;
  a run with ``train.steps: 0`` (``report["train_steps"]``) ran no distillation, which the verdict says.
"""

from __future__ import annotations

PAPER_RECOVERY = {"0.02": (0.40, 0.13), "0.05": (1.94, 0.37), "0.1": (4.28, 0.65), "0.2": (7.90, 1.08),
                  "0.5": (15.77, 2.46), "0.75": (21.66, 4.40), "1": (28.46, 7.11), "2": (61.94, 23.59),
                  "5": (161.63, 100.86), "7.5": (205.44, 155.98), "10": (229.71, 192.47)}
# The paper's gap to the teacher's best (Table 2, CIFAR-10): DPDM at 8 NFE 2.68, EDM at 18 NFE 3.24, at 35 NFE 1.97
PAPER_GAP = {"student_8": 2.68 / 1.97, "edm_18": 3.24 / 1.97}
NFE_FACTOR = 3  # student_vs_best_teacher: the teacher may use up to 3× the student's NFE (Table 2: 5 vs 15)


def _better(a, b) -> bool | None:
    """``a < b`` (lower is better), None when either is missing or not a number."""
    if a is None or b is None or a != a or b != b:
        return None
    return bool(a < b)


def _all(flags) -> bool | None:
    """True when every comparison holds, False when one fails, None when there was nothing to compare."""
    flags = [f for f in flags if f is not None]
    return all(flags) if flags else None


def best_teacher(teacher: dict, max_nfe: int) -> dict | None:
    """The lowest value over all teacher samplers at NFE ≤ ``max_nfe``: ``{"sampler", "nfe", "value"}`` (ties go
    to the smaller NFE, then the sampler listed first), None when no sampler reached such an NFE."""
    best = None
    for sampler, values in teacher.items():
        for n, v in values.items():
            if int(n) <= max_nfe and v == v:
                key = (v, int(n))
                if best is None or key < (best["value"], best["nfe"]):
                    best = {"sampler": sampler, "nfe": int(n), "value": v}
    return best


def _failing(per_key: dict) -> str:
    """`` (not at NFE 1, 2)`` for the keys whose comparison failed, '' when none did."""
    bad = [k for k, c in per_key.items() if (c.get("student_better") if isinstance(c, dict) else c) is False]
    return f" (not at {', '.join(bad)})" if bad else ""


def verdict(summary: dict, train_steps: int | None, where: dict | None = None) -> str:
    """One line saying which of the paper's claims the numbers reproduce; ``where``: per claim, the per-NFE / per-σ
    comparisons, so that a failed claim names where it failed."""
    if train_steps == 0:
        return "no distillation ran (train.steps = 0): the student is not a DPDM result"
    where = where or {}
    names = {"student_beats_best_teacher": f"student beats the best teacher at ≤{NFE_FACTOR}× NFE",
             "recovery_student_better_everywhere": "student recovers better at every σ",
             "student_beats_undistilled": "student beats the undistilled teacher with the same sampler"}
    unit = {"student_beats_best_teacher": "NFE ", "student_beats_undistilled": "NFE ",
            "recovery_student_better_everywhere": "σ = "}
    names = {k: v + (_failing({unit[k] + str(n): c for n, c in where.get(k, {}).items()})
                     if summary.get(k) is False else "") for k, v in names.items()}
    held = [names[k] for k in names if summary.get(k) is True]
    failed = [names[k] for k in names if summary.get(k) is False]
    missing = [names[k] for k in names if summary.get(k) is None]
    if not failed and not missing:
        return "all claims hold: " + "; ".join(held)
    parts = []
    if failed:
        parts.append("not reproduced: " + "; ".join(failed))
    if held:
        parts.append("holds: " + "; ".join(held))
    if missing:
        parts.append("not measured: " + "; ".join(missing))
    return " — ".join(parts)


def checks(report: dict) -> dict:
    """The paper's claims on a report's numbers (module docstring); ``report`` needs ``sweep`` and ``recovery``,
    ``sweep["undistilled"]`` and ``train_steps`` are optional."""
    sweep = report["sweep"]
    student = next(iter(sweep["student"].values()))
    teacher = sweep.get("teacher", {})
    vs = {}
    for k, value in student.items():
        row = {}
        for sampler, values in teacher.items():
            candidates = sorted(int(n) for n in values if int(n) >= int(k))
            if candidates:
                n = candidates[0]
                row[sampler] = {"teacher_nfe": n, "teacher": values[str(n)], "student": value,
                                "student_better": value < values[str(n)]}
        vs[k] = row
    vs_best = {}
    for k, value in student.items():
        best = best_teacher(teacher, NFE_FACTOR * int(k))
        vs_best[k] = {"max_teacher_nfe": NFE_FACTOR * int(k), "student": value,
                      "teacher_sampler": best and best["sampler"], "teacher_nfe": best and best["nfe"],
                      "teacher": best and best["value"], "student_better": _better(value, best and best["value"])}
    undistilled = next(iter(sweep.get("undistilled", {}).values()), {})
    vs_undistilled = {k: {"student": value, "undistilled": undistilled.get(k),
                          "student_better": _better(value, undistilled.get(k))}
                      for k, value in student.items()}
    recovery = report.get("recovery", {})
    ratio = {s: (v["student"] / v["teacher"] if v["teacher"] > 0 else None) for s, v in recovery.items()}
    per_sigma = {s: _better(v["student"], v["teacher"]) for s, v in recovery.items()}
    flags = list(per_sigma.values())  # every σ must be compared for "everywhere" to hold
    everywhere = False if False in flags else (True if flags and None not in flags else None)
    noise = noise_level(report)
    s_sampler = next(iter(sweep["student"]))
    for k, c in vs_best.items():
        _margin(c, c["student"], c["teacher"], point_noise(report, ("student", s_sampler, k),
                                                           ("teacher", c["teacher_sampler"], c["teacher_nfe"])))
    for k, c in vs_undistilled.items():
        _margin(c, c["student"], c["undistilled"], point_noise(report, ("student", s_sampler, k),
                                                               ("undistilled", s_sampler, k)))
    rec_margin = {s: _margin({}, v["student"], v["teacher"], noise) for s, v in recovery.items()}
    top = max((int(n) for by in teacher.values() for n in by), default=0)
    overall = best_teacher(teacher, top)
    gap = {k: {"student": v, "teacher_sampler": overall and overall["sampler"],
               "teacher_nfe": overall and overall["nfe"], "teacher": overall and overall["value"],
               "ratio": (v / overall["value"]) if overall and overall["value"] > 0 else None}
           for k, v in student.items()}
    summary = {"student_beats_best_teacher": _all(c["student_better"] for c in vs_best.values()),
               "recovery_student_better_everywhere": everywhere,
               "student_beats_undistilled": _all(c["student_better"] for c in vs_undistilled.values()),
               "distilled": report.get("train_steps") != 0}
    summary["verdict"] = verdict(summary, report.get("train_steps"),
                                 {"student_beats_best_teacher": vs_best, "student_beats_undistilled": vs_undistilled,
                                  "recovery_student_better_everywhere": per_sigma})
    inside = [f"NFE {k} vs the best teacher" for k, c in vs_best.items() if c.get("beyond_noise") is False]
    inside += [f"NFE {k} vs the undistilled teacher" for k, c in vs_undistilled.items()
               if c.get("beyond_noise") is False]
    inside += [f"recovery at σ = {s}" for s, m in rec_margin.items() if m.get("beyond_noise") is False]
    summary["inside_noise"] = inside
    if inside and noise is not None:
        summary["verdict"] += ("; differences inside the estimator's noise (the two real halves' spread, or the "
                               "spread of the compared points over evaluation seeds), not claimed either way: "
                               + ", ".join(inside))
    out = {"summary": summary, "student_vs_teacher": vs, "student_vs_best_teacher": vs_best,
           "student_vs_undistilled": vs_undistilled, "recovery_ratio": ratio,
           "recovery_paper_ratio": {s: PAPER_RECOVERY[s][1] / PAPER_RECOVERY[s][0] for s in recovery
                                    if s in PAPER_RECOVERY},
           "recovery_margin": rec_margin,
           "recovery_student_better": per_sigma, "recovery_student_better_everywhere": everywhere,
           "gap_to_best_teacher": gap, "noise": noise}
    if report.get("cross"):
        out["cross_use"] = cross_order(report["cross"]["cells"])
        summary["cross_use_paper_order"] = out["cross_use"]["paper_order_holds"]
    return out


def noise_level(report: dict) -> float | None:
    """The estimator's noise at the real data's level: the spread of two disjoint real sets scored like samples
    (``report["noise"]["real"]``), None when the report has none."""
    return ((report.get("noise") or {}).get("real") or {}).get("spread")


def point_noise(report: dict, *points) -> float | None:
    """The noise of a comparison between sweep ``points`` (``(role, sampler, nfe)``): the largest of the real
    halves' spread and each point's own spread over the evaluation seeds (``report["noise"]["sweep"]``; a metric's
    noise grows with its value, so one point's spread does not stand for another's). None when nothing was
    measured."""
    noise = report.get("noise") or {}
    parts = [noise_level(report)]
    by_role = noise.get("sweep") or {}
    for role, sampler, nfe in points:
        values = (by_role.get(role) or {}).get(sampler, {}).get(str(nfe))
        if values and len(values) > 1:
            parts.append(max(values) - min(values))
    parts = [p for p in parts if p is not None]
    return max(parts) if parts else None


def _margin(row: dict, student, other, noise) -> dict:
    """Add ``margin`` (other − student: positive when the student is better), the comparison's ``noise`` and
    ``beyond_noise`` to ``row``."""
    if student is None or other is None or student != student or other != other:
        row.update(margin=None, noise=noise, beyond_noise=None)
    else:
        row.update(margin=other - student, noise=noise,
                   beyond_noise=None if noise is None else abs(other - student) > noise)
    return row


def cross_order(cells: dict) -> dict:
    """Figure 6's ranking: ``cells[model][sampler]["value"]`` with models student/teacher and samplings dpdm/heun.
    The paper's order: student+dpdm best, teacher+heun (the ODE sampler) second, both cross-uses worse than both."""
    values = {f"{m}+{c}": cell["value"] for m, row in cells.items() for c, cell in row.items()}
    ranking = sorted(values, key=lambda k: values[k] if values[k] == values[k] else float("inf"))
    need = {"student+dpdm", "teacher+heun", "student+heun", "teacher+dpdm"}
    holds = None
    if need <= set(values):
        holds = ranking[:2] == ["student+dpdm", "teacher+heun"]
    return {"values": values, "ranking": ranking, "paper_order": ["student+dpdm", "teacher+heun",
                                                                  "cross-uses (student+heun, teacher+dpdm)"],
            "paper_order_holds": holds}
