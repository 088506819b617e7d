"""Training cost of DPDM against teacher training: time per iteration and peak memory (issue #6).

Two jobs on the same backbone, per-step batch and precision, both built from the engine's own objects, with
the EMA on as in a real run:

- ``teacher``: one ``teacher.TeacherJob`` iteration = one EDM-loss optimizer step (forward+backward, Adam, EMA).
- ``dpdm``: one ``distill.DistillJob`` iteration with ``fake_updates=1`` and ``order="student-first"`` (DMD2's
  order) = one student step (student forward+backward, teacher and fake forwards without gradients, Adam, EMA)
  + one fake-score step on the student step's detached outputs (fake forward+backward, Adam). It consumes one
  batch of real data. Algorithm 1's own order (``fake-first``, the recipes' default) makes the fake score's
  data with one more student forward without gradients, so its floor is ``2 + 3·fwd/teacher`` (3× by the
  count below); that order is not what this benchmark times.

**Time**: the median of ``--iters`` timed iterations after ``--warmup`` untimed ones (``torch.cuda.synchronize``
on GPUs); for DPDM also the medians of its two steps. ``fwd`` is one forward of the denoiser without gradients
(eval mode, same precision). A DPDM iteration is 2 optimizer steps of the same network plus 2 no-grad forwards
(teacher and fake in the student step), so ``floor = 2 + 2·fwd/teacher`` is what the algorithm costs with
nothing wasted (by the 1 forward : 2 backward count: 8/3).

**Memory**, honestly stated. Every job runs in a fresh subprocess, so no job sees another's allocations.

- CUDA: ``torch.cuda.max_memory_allocated`` over the timed iterations (peak stats reset after the warm-up):
  ``total`` (weights, EMA, Adam states, gradients, activations, temporaries) and ``growth``, the same minus
  what was allocated just before the first (warm-up) step (models, EMA and batches built; Adam's states are
  created by the first step, so they are part of the growth).
- CPU: torch's allocations are invisible to tracemalloc, so the process's peak resident set (``ru_maxrss``)
  is used: ``growth`` from just before the first step to the end (as ``backbones.py``), ``total`` = the peak
  minus the resident set after importing torch and dpdm and one throwaway step of a tiny model (the kernels'
  libraries loaded, no model built: the analogue of the CUDA total), and ``process`` = the whole process's peak
  (interpreter and libraries included). glibc keeps freed blocks below its (self-raising) mmap threshold in
  its heap, so by default the resident set over-counts by a few hundred MiB, by a different amount per job,
  which makes the default ratio unreliable (1.10-1.13× for ``small`` in our runs, where the allocations give
  1.19×). So on CPU each job runs twice: a timing pass with the default allocator (its RSS numbers are kept as
  ``rss_default``), and a memory pass of ``--warmup`` + 1 iterations with ``MALLOC_MMAP_THRESHOLD_=65536``
  (every tensor above 64 KiB gets its own mapping, returned to the system when freed), whose resident set
  follows the live tensors; the memory columns and the verdict come from that pass.

The memory target (≤ 1.15×) is judged on ``total``. Nothing is tuned: a missed target prints "NOT met".

    python benchmarks/train_step.py [--backbone small|cifar10|mlp ...] [--big] [--batch N]
                                    [--precision fp32|bf16|fp16] [--iters N] [--warmup 1] [--device cpu|cuda]
                                    [--threads N] [--out benchmarks/results/train_step-<device>.json]

Defaults: on CPU ``small`` at batch 32 (``--big`` adds ``cifar10`` at batch 8), fp32; on CUDA ``cifar10`` at
batch 128 in bf16 (``python benchmarks/train_step.py --device cuda --precision bf16``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

TIME_TARGET = 2.9  # DPDM iteration / teacher step (issue #6)
MEM_TARGET = 1.15  # DPDM / teacher peak memory (the paper reports 1.09x for consistency distillation)

SONG_CIFAR10 = dict(model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.13,
                    embedding_type="positional", encoder_type="standard", decoder_type="standard",
                    channel_mult_noise=1, resample_filter=[1, 1])  # EDM's cifar10 ddpmpp (benchmarks/backbones.py)
SONG_SMALL = dict(model_channels=64, channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[16], dropout=0.0)

# preset: (backbone, item shape, label_dim, options, default batch on CPU, default batch on CUDA)
PRESETS = {
    "cifar10": ("edm-songunet", (3, 32, 32), 0, SONG_CIFAR10, 8, 128),
    "small": ("edm-songunet", (3, 32, 32), 0, SONG_SMALL, 32, 128),
    "mlp": ("mlp", (2,), 0, {}, 32, 128),
}
ITERS = {"mlp": 20, "small": 5, "cifar10": 3}  # default timed iterations on CPU (on CUDA: 20)
EMA_HALFLIFE_NIMG = 500_000  # EDM's cifar10 ema_halflife_kimg=500
TEACHER_OPTIM = dict(lr=1e-3, betas=(0.9, 0.999))  # EDM's cifar10 teacher
STUDENT_OPTIM = dict(lr=1e-4, betas=(0.0, 0.99))  # dpdm's TrainConfig defaults (fake score: the same)
TIGHT_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # CPU memory pass: freed tensors leave the resident set


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _median_ms(times: list[tuple[float, float]], which: int = 0) -> float:
    """Median in ms of the wall (0) or CPU (1) times."""
    return 1000 * statistics.median(t[which] for t in times)


def _runtime_warmup(torch, dev, precision: str) -> None:
    """A throwaway conv/norm/linear forward+backward and Adam step of a tiny model, so that what torch loads on
    first use (oneDNN and BLAS kernels and threads, the CUDA context) sits in the baseline, not in the jobs."""
    from torch import nn

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU(), nn.Flatten(),
                        nn.Linear(8 * 8 * 8, 4)).to(dev)
    opt = torch.optim.Adam(net.parameters())
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.autocast(dev.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = net(torch.randn(2, 3, 8, 8, device=dev)).float().square().mean()
    loss.backward()
    opt.step()


def measure(job_kind: str, preset: str, *, device: str, batch: int, precision: str, iters: int, warmup: int,
            forward: bool = True) -> dict:
    """One job (``teacher`` or ``dpdm``) in this process; see the module doc for what is reported.
    ``forward``: also time the no-grad forward (teacher job only)."""
    import torch

    from dpdm.core.train.distill import DistillJob
    from dpdm.core.train.distributed import Dist
    from dpdm.core.losses import EDMLoss
    from dpdm.core.train.precision import Precision
    from dpdm.core.plugins.registry import get
    from dpdm.core.sigmas import SigmaDist
    from dpdm.core.train.teacher import TeacherJob

    backbone_name, shape, label_dim, options, _, _ = PRESETS[preset]
    factory, precond = get("backbone", backbone_name), get("preconditioning", "edm")
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    _runtime_warmup(torch, dev, precision)
    rss_import = _maxrss_mib()  # torch, dpdm, the plugins and kernel libraries loaded; no model built

    torch.manual_seed(0)
    denoiser = precond(backbone=factory(shape=shape, label_dim=label_dim, **options), label_dim=label_dim).to(dev)
    params = sum(p.numel() for p in denoiser.parameters())
    prec, dist = Precision(precision, dev), Dist(device=dev)
    if job_kind == "teacher":
        job = TeacherJob(denoiser, EDMLoss(), **TEACHER_OPTIM, ema_halflife_nimg=EMA_HALFLIFE_NIMG,
                         precision=prec, dist=dist)
    else:
        sigma = SigmaDist("log-uniform", min=0.002, max=80.0)  # dpdm's TrainConfig default
        job = DistillJob(denoiser, get("divergence", "smoothed-kl")(sigma=sigma), EDMLoss(sigma=sigma),
                         **STUDENT_OPTIM, fake_updates=1, order="student-first", ema_halflife_nimg=EMA_HALFLIFE_NIMG,
                         precision=prec, dist=dist)
    generator = torch.Generator(dev).manual_seed(0)
    pool = [torch.randn(batch, *shape, generator=generator, device=dev).clamp(-1, 1) for _ in range(2)]  # (B, ...)
    served = [0]

    def next_batch():
        served[0] += 1
        return pool[served[0] % 2], None

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    split = {"fake": [], "student": []}  # DPDM's two steps, timed by instance wrappers (the engine is untouched)
    if job_kind == "dpdm":
        for name in split:
            def timed(*a, _inner=getattr(job, f"{name}_step"), _times=split[name], **k):
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                out = _inner(*a, **k)
                sync()
                _times.append((time.perf_counter() - t0, time.process_time() - c0))
                return out

            setattr(job, f"{name}_step", timed)

    sync()
    rss0 = _maxrss_mib()  # just before the first step: models, EMA and batches built, no Adam state yet
    base = torch.cuda.memory_allocated(dev) if cuda else 0
    for _ in range(warmup):
        job.iteration(next_batch, generator)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    for step_times in split.values():
        step_times.clear()
    times = []  # (wall, CPU time of this process) per iteration, s
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        stats = job.iteration(next_batch, generator)
        sync()
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    if cuda:
        peak = torch.cuda.max_memory_allocated(dev)
        mem = {"total_mib": peak / 2**20, "growth_mib": (peak - base) / 2**20,
               "kind": "cuda max_memory_allocated over the timed iterations; growth: minus before the first step"}
    else:
        peak = _maxrss_mib()
        mem = {"total_mib": peak - rss_import, "growth_mib": peak - rss0, "process_mib": peak,
               "kind": "ru_maxrss; total: minus after imports, growth: minus before the first step"}
    out = {"ms": _median_ms(times), "cpu_ms": _median_ms(times, 1), "times_ms": [1000 * t for t, _ in times],
           "params_m": params / 1e6, "loss": {k: v for k, v in stats.items() if k.endswith("loss")}, **mem}
    if job_kind == "dpdm":
        out.update({f"{name}_ms": _median_ms(ts) for name, ts in split.items()})
        out.update({f"{name}_cpu_ms": _median_ms(ts, 1) for name, ts in split.items()})
    elif forward:  # one no-grad forward of the denoiser in eval mode: the unit of the floor
        model = job.trainable.module.eval()
        fwd = []
        with torch.no_grad():
            for i in range(min(max(iters, 2), 5) + 1):
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                with prec.autocast():
                    model(pool[0], torch.full((batch,), 1.0, device=dev))
                sync()
                if i:  # the first is a warm-up
                    fwd.append((time.perf_counter() - t0, time.process_time() - c0))
        out["fwd_ms"], out["fwd_cpu_ms"] = _median_ms(fwd), _median_ms(fwd, 1)
    return out


def run_case(job_kind: str, preset: str, args, device: str, batch: int, iters: int, tight: bool = False) -> dict:
    """``measure`` in a fresh interpreter (ru_maxrss is a process high-water mark; CUDA caches stay apart);
    ``tight``: the CPU memory pass (``TIGHT_MALLOC``, ``--warmup`` + 1 iterations, no forward timing)."""
    cmd = [sys.executable, __file__, "--_job", job_kind, "--backbone", preset, "--device", device,
           "--batch", str(batch), "--precision", args.precision, "--iters", str(1 if tight else iters),
           "--warmup", str(args.warmup)] + (["--threads", str(args.threads)] if args.threads else [])
    env = {**os.environ, **TIGHT_MALLOC} if tight else None
    proc = subprocess.run(cmd + (["--_no_forward"] if tight else []), capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(teacher: dict, dpdm: dict, batch: int) -> dict:
    """Ratios DPDM/teacher and the verdicts against the issue's targets."""
    tm, dm = teacher["mem"], dpdm["mem"]
    out = {"time_ratio": dpdm["ms"] / teacher["ms"],
           "cpu_time_ratio": dpdm["cpu_ms"] / teacher["cpu_ms"],  # robust to other processes with 1 thread
           "floor_ratio": 2 + 2 * teacher["fwd_ms"] / teacher["ms"],
           "cpu_floor_ratio": 2 + 2 * teacher["fwd_cpu_ms"] / teacher["cpu_ms"],
           "teacher_img_s": 1000 * batch / teacher["ms"],
           "dpdm_img_s": 1000 * batch / dpdm["ms"],  # real images per second (one batch per iteration)
           "mem_ratio": dm["total_mib"] / tm["total_mib"],
           "growth_ratio": dm["growth_mib"] / tm["growth_mib"]}
    if "process_mib" in tm:
        out["process_ratio"] = dm["process_mib"] / tm["process_mib"]
        out["rss_default_ratio"] = dpdm["rss_default"]["total_mib"] / teacher["rss_default"]["total_mib"]
    # what the jobs hold by construction (fp32 weights), computed: teacher = model + EMA + Adam (2 moments),
    # DPDM = teacher + student + fake + EMA + 2 x Adam; plus one model's gradients at a time in both
    p_mib = teacher["params_m"] * 1e6 * 4 / 2**20
    out["state_mib"] = {"teacher": 4 * p_mib, "dpdm": 8 * p_mib, "grads": p_mib}
    out["time_met"] = out["time_ratio"] <= TIME_TARGET
    out["cpu_time_met"] = out["cpu_time_ratio"] <= TIME_TARGET
    out["mem_met"] = out["mem_ratio"] <= MEM_TARGET
    return out


def _verdict(wall_met: bool, cpu_met: bool) -> str:
    """The verdict on the wall-clock ratio; flagged when the CPU-time ratio disagrees (a noisy machine)."""
    verdict = "met" if wall_met else "NOT met"
    return verdict if wall_met == cpu_met else f"{verdict} (wall only; CPU time: {'met' if cpu_met else 'NOT met'})"


def table(rows: list[dict], device: str) -> str:
    """The results as two markdown tables (time, memory)."""
    cpu = not device.startswith("cuda")
    lines = [f"| backbone | batch | prec | iters | params (M) | teacher ms | DPDM ms (student + fake) | fwd ms | "
             f"DPDM/teacher (floor) | ≤{TIME_TARGET}× |" + (" CPU-time ratio (floor) |" if cpu else "") +
             " img/s teacher / DPDM |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---|" + ("---:|" if cpu else "") + "---:|"]
    done = [r for r in rows if "cmp" in r]
    for r in done:
        t, d, c = r["teacher"], r["dpdm"], r["cmp"]
        lines.append(f"| {r['backbone']} | {r['batch']} | {r['precision']} | {r['iters']} | {t['params_m']:.2f} | "
                     f"{t['ms']:.1f} | {d['ms']:.1f} ({d['student_ms']:.1f} + {d['fake_ms']:.1f}) | "
                     f"{t['fwd_ms']:.1f} | {c['time_ratio']:.2f}× ({c['floor_ratio']:.2f}×) | "
                     f"{_verdict(c['time_met'], c['cpu_time_met'] if cpu else c['time_met'])} |" +
                     (f" {c['cpu_time_ratio']:.2f}× ({c['cpu_floor_ratio']:.2f}×) |" if cpu else "") +
                     f" {c['teacher_img_s']:.1f} / {c['dpdm_img_s']:.1f} |")
    head = ("memory pass, peak RSS: total = minus after imports, growth = minus before the first step, process = "
            "whole process; default malloc = the timing pass's total" if cpu else
            "max_memory_allocated: total, and growth = minus the allocation before the first step")
    lines += ["", f"Memory (MiB; {head}; state = weights + EMA + Adam by construction, computed):", "",
              f"| backbone | batch | teacher total | DPDM total | ratio | ≤{MEM_TARGET}× | growth teacher / DPDM |" +
              (" process teacher / DPDM | default malloc teacher / DPDM |" if cpu else "") +
              " state teacher / DPDM (+ grads) |",
              "|---|---:|---:|---:|---:|---|---:|" + ("---:|---:|" if cpu else "") + "---:|"]
    for r in done:
        t, d, c, s = r["teacher"]["mem"], r["dpdm"]["mem"], r["cmp"], r["cmp"]["state_mib"]
        line = (f"| {r['backbone']} | {r['batch']} | {t['total_mib']:.0f} | {d['total_mib']:.0f} | "
                f"{c['mem_ratio']:.2f}× | {'met' if c['mem_met'] else 'NOT met'} | "
                f"{t['growth_mib']:.0f} / {d['growth_mib']:.0f} ({c['growth_ratio']:.2f}×) |")
        if cpu:
            td, dd = r["teacher"]["rss_default"], r["dpdm"]["rss_default"]
            line += (f" {t['process_mib']:.0f} / {d['process_mib']:.0f} ({c['process_ratio']:.2f}×) |"
                     f" {td['total_mib']:.0f} / {dd['total_mib']:.0f} ({c['rss_default_ratio']:.2f}×) |")
        lines.append(line + f" {s['teacher']:.0f} / {s['dpdm']:.0f} (+{s['grads']:.0f}) |")
    for r in rows:
        if "cmp" not in r:
            errors = [f"{k}: {r[k]['error']}" for k in ("teacher", "dpdm") if "error" in r[k]]
            errors += [f"{k} memory pass: {r[k]['mem']['error']}" for k in ("teacher", "dpdm")
                       if "error" in r[k].get("mem", {})]
            lines.append(f"\n{r['backbone']} (batch {r['batch']}): " + "; ".join(errors))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", action="append", choices=sorted(PRESETS), default=None,
                   help="preset (repeatable); default: small on CPU (+ cifar10 with --big), cifar10 on CUDA")
    p.add_argument("--big", action="store_true", help="add the cifar10 DDPM++ preset")
    p.add_argument("--batch", type=int, default=None, help="per-step batch (default: per preset and device)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default: 20 on CUDA; on CPU "
                   f"{', '.join(f'{k} {v}' for k, v in ITERS.items())})")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None)
    p.add_argument("--_job", choices=["teacher", "dpdm"], help=argparse.SUPPRESS)  # internal: one job, JSON out
    p.add_argument("--_no_forward", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        p.error(f"--device {device}: this torch {torch.__version__} sees no CUDA device")
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    if args._job:
        print(json.dumps(measure(args._job, args.backbone[0], device=device, batch=args.batch,
                                 precision=args.precision, iters=args.iters, warmup=args.warmup,
                                 forward=not args._no_forward)))
        return

    presets = args.backbone or (["cifar10"] if cuda else ["small"])
    if args.big and "cifar10" not in presets:
        presets.append("cifar10")
    print(f"device {device} ({torch.get_num_threads()} threads), {args.precision}, median of the timed iterations "
          f"after {args.warmup} warm-up; each job in its own subprocess"
          + ("" if cuda else ", timing pass then memory pass"), flush=True)
    rows, load0, clock = [], os.getloadavg(), time.perf_counter()
    for preset in presets:
        backbone, shape, label_dim, options, cpu_batch, cuda_batch = PRESETS[preset]
        batch = args.batch or (cuda_batch if cuda else cpu_batch)
        iters = args.iters or (20 if cuda else ITERS[preset])
        row = {"backbone": preset, "registry": backbone, "shape": list(shape), "label_dim": label_dim,
               "options": options, "batch": batch, "precision": args.precision, "iters": iters}
        for job_kind in ("teacher", "dpdm"):
            t0 = time.perf_counter()
            res = run_case(job_kind, preset, args, device, batch, iters)
            if "ms" in res:
                mem_keys = ("total_mib", "growth_mib", "process_mib", "kind")
                if cuda:
                    res["mem"] = {k: res.pop(k) for k in mem_keys if k in res}
                else:
                    res["rss_default"] = {k: res.pop(k) for k in mem_keys}
                    tight = run_case(job_kind, preset, args, device, batch, iters, tight=True)
                    res["mem"] = {k: tight[k] for k in (*mem_keys, "error") if k in tight}  # its times are slowed
                    res["mem"]["malloc"] = TIGHT_MALLOC
            row[job_kind] = res
            mem = res.get("mem", {})
            print(f"  {preset:8} batch {batch:4} {job_kind:8} " +
                  (f"{res['ms']:10.1f} ms/iter" if "ms" in res else res["error"]) +
                  (f"  total {mem['total_mib']:7.0f} MiB  growth {mem['growth_mib']:7.0f} MiB" if "total_mib" in mem
                   else f"  memory: {mem.get('error', '-')}") + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
        if all("ms" in row[k] and "total_mib" in row[k]["mem"] for k in ("teacher", "dpdm")):
            row["cmp"] = compare(row["teacher"], row["dpdm"], batch)
        rows.append(row)
    load1 = os.getloadavg()
    print()
    print(table(rows, device))
    print(f"\n1-minute load average {load0[0]:.1f} at the start, {load1[0]:.1f} at the end ({os.cpu_count()} CPUs; "
          f"other processes slow CPU timings down); {time.perf_counter() - clock:.0f} s in all")
    out = Path(args.out or Path(__file__).parent / "results" / f"train_step-{device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", "benchmarks/train_step.py", *(argv if argv is not None else sys.argv[1:])])
    meta = {"command": command, "device": device,
            "device_name": torch.cuda.get_device_name(device) if cuda else "cpu", "precision": args.precision,
            "warmup": args.warmup, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "loadavg_1m": {"start": load0[0], "end": load1[0]},
            "time_target": TIME_TARGET, "mem_target": MEM_TARGET, "fake_updates": 1,
            "ema_halflife_nimg": EMA_HALFLIFE_NIMG, "teacher_optim": TEACHER_OPTIM, "student_optim": STUDENT_OPTIM}
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
