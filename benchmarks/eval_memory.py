"""Peak memory of a run does not grow with the size of its image ZIP (issue 14, item 2).

Builds two EDM-format ZIPs of random 32×32 RGB PNGs (2k and 24k images) in a temporary folder and runs the same
short real run on each (``dpdm run``: a tiny teacher and student for a few steps, then the whole in-run evaluation —
NFE sweeps, one-step σ_max search, the estimator's noise, recovery — with a data metric), each in a fresh
process that reports its own peak RSS (``ru_maxrss``). Evaluation reads its references, validation sets and recovery
items as seeded subsets, item by item (``eval/references.py``); a data metric's reference is at most
``eval.num_samples`` items. The goal: the 24k run within 1.25× of the 2k run's peak. 0.1 read both splits whole
(``run.references`` called ``.tensors()``): 0.72 GB → 2.2 GB for a 24k ZIP in a full run.

    python benchmarks/eval_memory.py [--small 2000] [--large 24000] [--out benchmarks/results/eval_memory.json]
                                     [--pythonpath PATHS]   # e.g. another checkout's packages/*/src, for a before

Prints a table and writes JSON with both peaks, their ratio and the load average while it ran.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOAL = 1.25  # the largest ratio of the two peaks that passes


def make_zip(path: Path, n: int, size: int = 32, seed: int = 0) -> Path:
    """An EDM dataset ZIP of ``n`` random ``size``×``size`` RGB PNGs (no labels), written image by image."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="png",
                                                                                       compress_level=0)
            z.writestr(f"{i // 1000:05d}/img{i:08d}.png", buf.getvalue())
        z.writestr("dataset.json", json.dumps({"labels": None}))
    return path


def recipe_for(zip_path: Path, folder: Path) -> Path:
    """``recipes/digits.yaml`` on the ZIP, shrunk to seconds of training; evaluation keeps its shape (every
    protocol runs) with ``eval.num_samples`` 256 and the sliced Wasserstein distance (a data metric whose cost is
    linear in the reference, so that 0.1, which compared with the whole test split, can be measured too)."""
    import yaml

    recipe = yaml.safe_load((ROOT / "recipes" / "digits.yaml").read_text())
    recipe["name"] = f"eval-memory-{zip_path.stem}"
    recipe["data"] = {"name": "image-zip", "path": str(zip_path), "labels": False}
    recipe["model"]["backbone"] = {"name": "mlp", "hidden": 64, "depth": 1, "emb_dim": 32}
    recipe["teacher"]["train"].update(steps=2, batch_size=16)
    recipe["train"].update(steps=2, batch_size=16)
    recipe["eval"].update(metric={"name": "sliced-wasserstein"}, num_samples=256, student_steps=[1, 2],
                          teacher_samplers=["euler"], teacher_nfe=[1, 2],
                          one_step_sigma_max=[80.0, 5.0], recovery_sigmas=[1.0], recovery_num=64, figure_samples=16,
                          batch_size=128)
    path = folder / f"{zip_path.stem}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def child(recipe: str, out: str) -> None:
    """Run ``recipe`` into ``out`` in this process and print its peak RSS in MB as JSON (``--child``)."""
    import torch

    torch.set_num_threads(1)
    from dpdm.cli.main import main

    sys.argv = ["dpdm", "run", recipe, "--out", out]
    try:
        main()
    except SystemExit as exc:
        if exc.code:
            raise
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure(recipe: Path, out: Path, pythonpath: str | None) -> float:
    env = dict(os.environ, DPDM_CACHE=str(out.parent / "cache"))
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    r = subprocess.run([sys.executable, __file__, "--child", str(recipe), str(out)], env=env, capture_output=True,
                       text=True, cwd=ROOT, check=False)
    if r.returncode:
        raise SystemExit(f"the run on {recipe.name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", type=int, default=2000)
    p.add_argument("--large", type=int, default=24000)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval_memory.json"))
    p.add_argument("--pythonpath", default=None, help="PYTHONPATH of the code to measure (default: as installed)")
    p.add_argument("--child", nargs=2, metavar=("RECIPE", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(*args.child)
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        peaks = {}
        start, load_before = time.time(), os.getloadavg()
        for n in (args.small, args.large):
            recipe = recipe_for(make_zip(tmp / f"images-{n}.zip", n), tmp)
            peaks[n] = measure(recipe, tmp / f"run-{n}", args.pythonpath)
        seconds = time.time() - start
    ratio = peaks[args.large] / peaks[args.small]
    result = {"images": [args.small, args.large], "peak_rss_mb": {str(k): round(v, 1) for k, v in peaks.items()},
              "ratio": round(ratio, 3), "goal": GOAL, "passes": ratio <= GOAL, "seconds": round(seconds, 1),
              "load_average": {"start": [round(x, 2) for x in load_before],
                               "end": [round(x, 2) for x in os.getloadavg()]},
              "cpus": os.cpu_count(),
              "pythonpath": args.pythonpath or os.environ.get("PYTHONPATH")}
    print(f"{'images':>8} | {'peak RSS (MB)':>13}")
    for n, mb in peaks.items():
        print(f"{n:>8} | {mb:>13.1f}")
    print(f"ratio {ratio:.3f} (goal ≤ {GOAL}); load average (1, 5, 15 min) at the start {load_before}, at the end "
          f"{os.getloadavg()} on {os.cpu_count()} CPUs")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
