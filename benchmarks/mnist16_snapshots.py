"""How much the last stretch of each phase of a finished mnist16 run changes its model: each phase's previous
snapshot (the run keeps the last two) against its final weights, scored with fd-mnist on the run's reference at 2
evaluation seeds. Used in docs/results.md to size the recipe (does the teacher still improve over its last 250
steps? the student over its last 200 iterations?) and to ask whether the student is still improving.

- teacher: EMA weights, DPM-Solver++(2M) at 15 and 35 NFE and Heun at 35 (the teacher's best points);
- student: EMA weights, the dpdm sampler and the paper's schedule at 3, 4, 5 and 8 steps;
- each baseline (Diff-Instruct keeps no EMA): sampled as the run's report samples it (its steps, from its
  ``sigma_max`` or its divergence's ``generator_sigma``).

    python benchmarks/mnist16_snapshots.py runs/mnist16 [--num 1000] [--seeds 0 1]
                                           [--phases teacher student baseline-diff-instruct]
                                           [--out benchmarks/results/mnist16_snapshots.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path



def snapshot_model(final, path: Path, prefix: str):
    """A copy of ``final`` (a loaded denoiser) with the ``prefix.``-weights of a training snapshot."""
    import copy

    from safetensors.torch import load_file

    state = {k[len(prefix) + 1:]: v for k, v in load_file(str(path)).items() if k.startswith(prefix + ".")}
    model = copy.deepcopy(final)
    model.load_state_dict(state, strict=True)
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--phases", nargs="+", default=None, help="default: every phase; rows of others are kept")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/mnist16_snapshots.json"))
    args = p.parse_args()

    from mnist16_schedule import scoring_setup

    from dpdm.core.eval import protocols as ev
    from dpdm.core.io.checkpoint import load_denoiser

    recipe, teacher, student, metric, reference, common = scoring_setup(args.run, args.num)
    ckpts = args.run / "checkpoints"
    s_sampler, s_schedule = recipe.eval.student_sampler, recipe.eval.student_schedule.as_dict()
    t_schedule = recipe.eval.teacher_schedule

    def snapshots(phase: str) -> list[Path]:
        return sorted((ckpts / "train" / phase).glob("ckpt-*"))

    def score_teacher(model, seed):
        out = {}
        for spec, nfes in (({"name": "dpmpp-2m"}, [15, 35]), ({"name": "heun"}, [35])):
            vals, _ = ev.sweep_teacher(model, metric, reference, samplers=[spec], schedule=t_schedule, nfes=nfes,
                                       seed=seed, keep=0, **common)
            out.update({f"{spec['name']}@{n}": v for n, v in vals[spec["name"]].items()})
        return out

    def score_student(model, steps, seed, schedule=s_schedule):
        vals, _ = ev.sweep_student(model, metric, reference, sampler=s_sampler, schedule=schedule, steps=steps,
                                   seed=seed, keep=0, **common)
        return {f"K={k}": v for k, v in vals.items()}

    phases = [("teacher", teacher, "ema", score_teacher),
              ("student", student, "ema", lambda m, s: score_student(m, [3, 4, 5, 8], s))]
    for name, base in recipe.baselines.items():
        model = load_denoiser(str(ckpts / f"{name}.safetensors"))
        smax = base.sigma_max if base.sigma_max is not None else base.train.divergence.options.get("generator_sigma")
        schedule = {**s_schedule, **({"sigma_max": smax} if smax is not None else {})}
        phases.append((f"baseline-{name}", model, "student",
                       lambda m, s, steps=list(base.steps), sch=schedule: score_student(m, steps, s, sch)))
    old = json.loads(args.out.read_text())["rows"] if args.phases and args.out.exists() else []
    rows = [r for r in old if r["phase"] not in args.phases] if args.phases else []
    for phase, final, prefix, score in phases:
        if args.phases and phase not in args.phases:
            continue
        snaps = snapshots(phase)
        if len(snaps) < 2:
            print(f"{phase}: fewer than two snapshots, skipped")
            continue
        previous = snaps[-2]
        for label, model in ((previous.name, snapshot_model(final, previous / "weights.safetensors", prefix)),
                             ("final", final)):
            t0 = time.perf_counter()
            by_seed = [score(model, seed) for seed in args.seeds]
            values = {k: [d[k] for d in by_seed] for k in by_seed[0]}
            rows.append({"phase": phase, "weights": label, "values": values, "seconds": time.perf_counter() - t0})
            print(f"{phase} {label}: " + ", ".join(f"{k} " + "/".join(f"{v:.2f}" for v in vs)
                                                    for k, vs in values.items()), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"run": str(args.run), "num": args.num, "seeds": args.seeds, "rows": rows},
                                   indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
