"""Ablations of the DPDM design choices on an embedded recipe, over several seeds.

Trains the recipe's teacher once, then distills one student per (variant, seed) from that same teacher
(``seed`` changes the student's training draws and the evaluation's noise; the teacher is shared) and prints a
table of mean ± standard deviation over the seeds: the student's distance at each NFE of the recipe,
one step from σ_max = 80, and the recovery ratio student/teacher at each σ. Everything is written as JSON.

A difference between two rows smaller than their spreads is not an effect: with 3 seeds, single-seed
differences under 2x were shown to be noise on these problems.

    python benchmarks/ablations.py [--recipe recipes/toy2d.yaml] [--seeds 0 1 2] [--only weighting]
                                   [--group design|lora] [--work DIR]
                                   [--out benchmarks/results/ablations-toy2d.json]

With ``--work DIR`` the study can be stopped and continued, also by several processes at once: the teacher is
trained into DIR once and reused, and each (variant, seed) result is kept in DIR/results and not run again
(a kept result is used only if it was made with the same recipe, overrides and evaluation). ``--kept`` runs
nothing and tabulates what DIR holds, naming what is missing. The recipe's baselines are not trained: the
ablations do not read them.

The JSON records the teacher's weights (``teacher_sha256``, of its tensors). ``--adopt FILE`` continues a study
whose folder is gone (another machine) from the JSON it wrote: the teacher is trained again (the same recipe and
seed train it to the bit), and when its weights hash the same, FILE's results are kept in DIR as if run there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dpdm.core.config.recipe import load_recipe
from dpdm.core.pipeline.run import run

# Each variant is a list of overrides on top of the recipe (which carries the paper's reading: w = σ², no
# normaliser, fake-first, the ρ = 40 schedule), each a string or a function of the recipe that makes one. The
# issue's rows first.
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


def ten_times_fake_lr(recipe) -> str:
    """The override that sets the fake score's learning rate to ten times the recipe's (``fake_lr``, else ``lr``)."""
    return f"train.fake_lr={10 * (recipe.train.fake_lr or recipe.train.lr):g}"


# Issue 16: the fake score as low-rank adapters on the frozen teacher (train.fake_lora) against the full copy, at
# the fake score's own learning rate (the recipe's fake_lr); `--group lora`.
LORA_VARIANTS = {
    "full fake (recipe)": [],
    "fake_lora rank 4": ["train.fake_lora={rank: 4}"],
    "fake_lora rank 16": ["train.fake_lora={rank: 16}"],
    "fake_lora rank 64": ["train.fake_lora={rank: 64}"],
    # adapters often want a larger learning rate than full fine-tuning: ten times the recipe's, and the full fake
    # score at the same, so that an effect of the rate alone is seen as such
    "fake_lora rank 16, fake_lr x10": ["train.fake_lora={rank: 16}", ten_times_fake_lr],
    "full fake, fake_lr x10": [ten_times_fake_lr],
}
GROUPS = {"design": VARIANTS, "lora": LORA_VARIANTS}
# ρ only enters sampling: benchmarks/schedule_rho.py compares ρ = 40 with EDM's 7 on the same trained students.
# The evaluation each variant needs: the student's sweep, one step, recovery; the teacher's sweep is not read.
EVAL_ONLY_WHAT_IS_READ = ["eval.teacher_samplers=[heun]", "eval.teacher_nfe=[35]", "baselines={}"]


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{m:.3g}±{s:.2g}"


def run_key(recipe_path: str, overrides: list[str]) -> str:
    """What a kept (variant, seed) result was made from: the recipe file's text and every override."""
    text = Path(recipe_path).read_text()
    return hashlib.sha256(json.dumps([text, overrides]).encode()).hexdigest()[:16]


def kept_or_run(path: Path, key: str, make) -> dict | None:
    """The result kept at ``path`` when it was made from ``key``; else ``make()``, written atomically there
    (``make`` None: None)."""
    if path.exists():
        kept = json.loads(path.read_text())
        if kept.get("key") == key:
            return kept["result"]
        print(f"{path} was made from another recipe or overrides" + (": running it again" if make else ""),
              flush=True)
    if make is None:
        return None
    result = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "result": result}, indent=2))
    os.replace(tmp, path)
    return result


def weights_sha256(path: Path) -> str:
    """A hash of a checkpoint's tensors (names, dtypes, shapes, bytes; not its metadata)."""
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for name, tensor in sorted(load_file(str(path)).items()):
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def adopt(path: Path, teacher_sha: str, kept_path, key_of) -> int:
    """Keep the results of an earlier study's JSON (``path``) as this study's, if its teacher hashes as this one
    (``teacher_sha``); ``kept_path(label, seed)`` and ``key_of(label, overrides, seed)`` say where and under which
    key. Results already kept are left. Returns how many were adopted."""
    earlier = json.loads(path.read_text())
    if earlier.get("teacher_sha256") != teacher_sha:
        raise SystemExit(f"--adopt {path}: its teacher ({earlier.get('teacher_sha256') or 'not recorded'}) is not "
                         f"this study's ({teacher_sha}); run those variants again instead")
    adopted = 0
    for label, row in earlier["variants"].items():
        for result in row["runs"]:
            target = kept_path(label, result["seed"])
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": key_of(label, row["overrides"], result["seed"]), "result": result},
                                      indent=2))
            os.replace(tmp, target)
            adopted += 1
    return adopted


def record(report: dict) -> dict:
    """What a study reads from one run's report: the student's sweep (and at each evaluation seed, the
    estimator's noise, None where the recipe measures none), one step from σ = 80, the recovery ratios."""
    noise = report.get("noise", {}).get("sweep", {}).get("student")
    return {"student": next(iter(report["sweep"]["student"].values())),
            "one_step_sigma80": report["one_step"]["validation"].get("80.0"),
            "recovery_ratio": report["checks"]["recovery_ratio"],
            "student_eval_seeds": next(iter(noise.values())) if noise else None}


def continued(recipe, out: Path) -> dict:
    """``run`` into ``out``, resumed from its newest snapshot when an interrupted study left one there."""
    return run(recipe, out, resume=out.exists())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/toy2d.yaml")
    parser.add_argument("--out", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], help="extra overrides for every variant")
    parser.add_argument("--only", action="append", default=None,
                        help="run only variants containing this text (a variant's whole name: that one alone)")
    parser.add_argument("--group", choices=sorted(GROUPS), default="design",
                        help="design: the design choices (issue 12); lora: the fake score as adapters (issue 16)")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the teacher and each result here, to continue the study later (default: a "
                             "new temporary folder)")
    parser.add_argument("--kept", action="store_true", help="run nothing: tabulate the results kept in --work")
    parser.add_argument("--adopt", type=Path, default=None,
                        help="an earlier study's JSON: keep its results in --work when its teacher is this one")
    args = parser.parse_args()
    if (args.kept or args.adopt) and args.work is None:
        parser.error("--kept and --adopt use the results kept in a study's folder: give it with --work DIR")
    base = load_recipe(args.recipe, args.set)
    suffix = "" if args.group == "design" else f"-{args.group}"
    out = Path(args.out or f"benchmarks/results/ablations-{base.name}{suffix}.json")
    work = args.work or Path(tempfile.mkdtemp(prefix="dpdm-ablations-"))
    variants = GROUPS[args.group]
    exact = [o for o in args.only or [] if o in variants]
    chosen = {k: v for k, v in variants.items()
              if not args.only or k in exact or any(o in k for o in args.only if o not in exact)}

    # The shared teacher, trained once with the recipe's seed (and kept in --work).
    teacher_overrides = args.set + EVAL_ONLY_WHAT_IS_READ + ["train.steps=1"]
    teacher_ckpt = str(work / "teacher" / "checkpoints" / "teacher.safetensors")

    def train_teacher():
        return {"metric": continued(load_recipe(args.recipe, teacher_overrides), work / "teacher")["metric"]}

    teacher = kept_or_run(work / "teacher.json", run_key(args.recipe, teacher_overrides),
                          None if args.kept else train_teacher)
    if teacher is None:
        raise SystemExit(f"{work} holds no teacher for this recipe and these overrides: run the study without --kept")
    metric = teacher["metric"]
    teacher_sha = weights_sha256(Path(teacher_ckpt)) if Path(teacher_ckpt).exists() else None

    def kept_path(label: str, seed: int) -> Path:
        return work / "results" / f"v{hashlib.sha256(label.encode()).hexdigest()[:8]}-s{seed}.json"

    def run_overrides_of(overrides: list[str], seed: int) -> list[str]:
        return args.set + EVAL_ONLY_WHAT_IS_READ + overrides + [f"teacher.checkpoint={teacher_ckpt}", f"seed={seed}"]

    def key_of(overrides: list[str], seed: int) -> str:
        # the teacher's key joins the run's: a result kept from another teacher is not reused
        return run_key(args.recipe, teacher_overrides + ["|"] + run_overrides_of(overrides, seed))

    if args.adopt:
        n = adopt(args.adopt, teacher_sha, kept_path, lambda label, overrides, seed: key_of(overrides, seed))
        print(f"adopted {n} results of {args.adopt} (the same teacher, {teacher_sha[:12]})", flush=True)

    rows, missing = {}, []
    t_all = time.perf_counter()
    for label, overrides in chosen.items():
        overrides = [o(base) if callable(o) else o for o in overrides]  # made from the recipe (and --set)
        runs = []
        slug = hashlib.sha256(label.encode()).hexdigest()[:8]
        for seed in args.seeds:
            def one(run_overrides=run_overrides_of(overrides, seed), seed=seed, slug=slug):
                t0 = time.perf_counter()
                report = continued(load_recipe(args.recipe, run_overrides), work / f"v{slug}-s{seed}")
                return {"seed": seed, **record(report),
                        "seconds": time.perf_counter() - t0, "load_average_end": os.getloadavg()}

            result = kept_or_run(kept_path(label, seed), key_of(overrides, seed), None if args.kept else one)
            if result is None:
                missing.append(f"{label}, seed {seed}")
                continue
            runs.append(result)
            print(f"done: {label}, seed {seed} ({result['seconds']:.0f}s)", flush=True)
        if runs:
            rows[label] = {"overrides": overrides, "runs": runs}
    if missing:
        print("not kept, left out: " + "; ".join(missing))
    if not rows:
        raise SystemExit(f"{work} holds no result of the chosen variants and seeds")

    nfes = list(rows[next(iter(rows))]["runs"][0]["student"])
    sigmas = list(rows[next(iter(rows))]["runs"][0]["recovery_ratio"])
    load = os.getloadavg()
    print(f"\n{base.name}: {metric}, lower is better; mean ± std over seeds {args.seeds} "
          f"(load average {load[0]:.1f} at the end)")
    head = f"{'variant':<36}{'seeds':>6}" + "".join(f" {'NFE ' + n:>12}" for n in nfes) + f" {'1 step σ80':>12}"
    head += "".join(f" {'rec σ=' + s:>12}" for s in sigmas)
    print(head)
    for label, r in rows.items():
        line = f"{label:<36}{len(r['runs']):>6}"
        line += "".join(f" {fmt([x['student'].get(n) for x in r['runs']]):>12}" for n in nfes)
        line += f" {fmt([x['one_step_sigma80'] for x in r['runs']]):>12}"
        line += "".join(f" {fmt([x['recovery_ratio'].get(s) for x in r['runs']]):>12}" for s in sigmas)
        print(line)
        r["summary"] = {
            "student": {n: mean_std([x["student"].get(n) for x in r["runs"]]) for n in nfes},
            "one_step_sigma80": mean_std([x["one_step_sigma80"] for x in r["runs"]]),
            "recovery_ratio": {s: mean_std([x["recovery_ratio"].get(s) for x in r["runs"]]) for s in sigmas},
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"recipe": base.name, "metric": metric, "teacher_sha256": teacher_sha,
                               "seeds": args.seeds,
                               "summary_format": "[mean, std over seeds]", "overrides_for_all": args.set,
                               "seconds": time.perf_counter() - t_all, "load_average_end": load,
                               "not_kept": missing, "variants": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
