"""The student of a finished mnist16 run at 1 and 2 steps with other σ levels than the paper's schedule gives it
(an investigation of docs/results.md: at 2 steps the dpdm schedule is [80, 0.3, 0], whose second step barely moves
the one-step sample). Scores fd-mnist on the run's reference (the test split's statistics) at 2 evaluation seeds.

    python benchmarks/mnist16_schedule.py runs/mnist16 [--num 1000] [--out benchmarks/results/mnist16_schedule.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def scoring_setup(run: Path, num: int):
    """``(recipe, teacher, student, metric, reference, common)`` of a finished run: its fd metric, the test split's
    cached reference statistics, and the keyword arguments the sweeps share (CPU, generation batch 128)."""
    from dpdm.core.eval.metrics import make_metric
    from dpdm.core.eval.references import dataset_key
    from dpdm.core.pipeline.run import load_run, make_dataset
    from dpdm.core.eval.references import cached_dataset_stats

    recipe, teacher, student = load_run(run)
    test = make_dataset(recipe.data, "test")
    metric = make_metric(recipe.eval.metric.name, dict(recipe.eval.metric.options),
                         data=(recipe.data.name, recipe.data.options))
    reference = cached_dataset_stats(dataset_key(recipe.data, "test"), test, metric.detector)
    common = dict(num=num, shape=tuple(test.shape), label_dim=0, device="cpu", batch_size=128)
    return recipe, teacher, student, metric, reference, common


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/mnist16_schedule.json"))
    args = p.parse_args()

    from dpdm.core.eval import generation
    from dpdm.core.eval import protocols as ev

    recipe, teacher, student, metric, reference, common = scoring_setup(args.run, args.num)
    sampler = {"name": "dpdm"}
    # (steps, schedule options): the paper's schedule and other first/last levels
    cases = [(1, {}), (1, {"sigma_max": 10.0}), (2, {}), (2, {"sigma_min": 1.0}), (2, {"sigma_min": 2.5}),
             (2, {"sigma_min": 5.0}), (2, {"sigma_max": 10.0, "sigma_min": 1.0}), (3, {}), (3, {"sigma_min": 1.0})]
    rows = []
    for steps, options in cases:
        schedule = {"name": "dpdm", **options}
        sigmas = generation.sigmas_for(student, schedule, steps)
        values = []
        for seed in args.seeds:
            t0 = time.perf_counter()
            vals, _ = ev.sweep_student(student, metric, reference, sampler=sampler, schedule=schedule, steps=[steps],
                                       seed=seed, keep=0, **common)
            values.append(next(iter(vals.values())))
        rows.append({"steps": steps, "schedule": options, "sigmas": [round(float(s), 4) for s in sigmas],
                     "values": values, "seconds": time.perf_counter() - t0})
        print(f"{steps} steps, σ = {rows[-1]['sigmas']}: fd-mnist " + " / ".join(f"{v:.2f}" for v in values),
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"run": str(args.run), "num": args.num, "seeds": args.seeds, "rows": rows},
                                   indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
