"""Training cost of DPDM against teacher training: time per iteration and peak memory (issues #6 and #16).

Jobs on the same backbone, per-step batch and precision, all built from the engine's own objects, each with the
student's (or teacher's) EMA on, as in a real run, and off (``--ema both``, the default; ``on`` or ``off`` for one):

- ``teacher``: one ``teacher.TeacherJob`` iteration = one EDM-loss optimizer step (forward+backward, Adam, EMA).
- ``dpdm`` (the full fake score): one ``distill.DistillJob`` iteration with ``fake_updates=1`` and
  ``order="student-first"`` (DMD2's order) = one student step (student forward+backward, teacher and fake forwards
  without gradients, Adam, EMA) + one fake-score step on the student step's detached outputs (fake
  forward+backward, Adam). It consumes one batch of real data. Algorithm 1's own order (``fake-first``, the
  recipes' default) makes the fake score's data with one more student forward without gradients, so its floor
  is ``2 + 3·fwd/teacher`` (3× by the count below); that order is not what this benchmark times.
- ``lora<r>`` (issue #16; ``--lora-ranks``, default 4,16,64): the same with ``fake_lora={"rank": r}``, the fake
  score as the frozen teacher's own tensors plus adapters on every weight matrix (only they train; ``lora.py``).
- ``both<r>`` (``--both-ranks``, default 16): the student too as adapters (``student_lora={"rank": r}``; its EMA
  averages the adapters alone), so the teacher's weights are the only full copy. No target: ratios only.
- ``…-c<k>`` (``--score-chunks``, default 0,8: every DPDM job whole and with k = 8): the student step evaluates
  teacher and fake score ``k`` samples at a time (``score_chunk``, recipe ``engine.score_chunk``), so that their
  no-grad activations never sit beside the whole student graph; 0 is the whole batch in one call.

**Time**: the median of ``--iters`` timed iterations after ``--warmup`` untimed ones (``torch.cuda.synchronize``
on GPUs); for DPDM also the medians of its two steps. With ``--rounds R`` every job is timed R times, round
after round, and each median is the median of the rounds' (a machine whose speed drifts then slows every job
alike; on our shared 2-core machine one job ran at 7.4 s and at 9.3 s per iteration within one run). ``fwd`` is
one forward of the denoiser without gradients (eval mode, same precision). A DPDM iteration is 2 optimizer steps of
the same network plus 2 no-grad forwards (teacher and fake in the student step), so ``floor = 2 + 2·fwd/teacher``
is what the algorithm costs with nothing wasted (by the 1 forward : 2 backward count: 8/3). On CPU the ratios of process CPU times are shown too.

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
  follows the live tensors; the memory columns and the verdicts come from that pass.
- Counted (``--count``, any device; no timing): each job's peak of live tensor storage over ``--warmup`` + 1
  iterations, counted per op by ``dpdm.core.train.memory.TensorMemory`` (the tensors alive before the first step,
  found by the garbage collector, plus each one an op makes until it is freed): what CUDA's
  ``max_memory_allocated`` counts, but on a CPU, exact and the same at any load. Slow (Python sees every op), so
  batches too large to run here can be predicted instead: ``--batches 2,4 --predict 128`` records the MiB alive
  after every op at each batch (the same ops run at any batch), fits each op's value as ``fixed + per_item · batch``
  (activations grow with the batch; weights, optimizer states and EMA do not) and takes the largest of those lines
  at 128; fitting the peak itself would not do, because which op peaks changes with the batch (at a small batch,
  the optimizer step; at a large one, the backward). Written to ``results/train_step-count-<device>.json``.
- Adapters: an adapted layer computes ``W' = W + BA`` on each forward; in a training forward autograd would keep
  ``W'`` for the backward (in fp32 one more copy of the adapted weights, printed under the tables), which
  ``lora.RecomputeMerged`` avoids by remaking it there; under bf16/fp16 autocast the layer's op keeps the
  half-precision cast, as it does for the full fake score's weights.

**Targets** (ratios to the jobs with the same EMA setting; memory on ``total``, time on the wall clock, flagged
where the CPU-time ratio disagrees; nothing is tuned, a missed target prints "NOT met"): the full fake score's
iteration ≤ 2.9× the teacher step, and its memory ≤ 1.15× with EMA (issue #6); the adapters' memory ≤ 1.05× the
teacher step's without EMA and ≤ 1.10× with it, and their iteration no slower than the full fake score's (#16).

    python benchmarks/train_step.py [--backbone small|cifar10|mlp ...] [--big] [--batch N]
                                    [--precision fp32|bf16|fp16] [--iters N] [--warmup 1] [--rounds 1]
                                    [--device cpu|cuda]
                                    [--lora-ranks 4,16,64] [--both-ranks 16] [--score-chunks 0,8]
                                    [--ema both|on|off] [--threads N]
                                    [--count [--batches 2,4,8 [--predict 128]]]
                                    [--out benchmarks/results/train_step-<device>.json]

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
LORA_MEM_TARGETS = {False: 1.05, True: 1.10}  # adapter DPDM / teacher peak memory, without / with EMA (issue #16)
LORA_TIME_TARGET = 1.0  # adapter DPDM iteration / full-fake DPDM iteration (issue #16)
LORA_RANKS = (4, 16, 64)
SCORE_CHUNKS = (0, 8)  # DPDM jobs with teacher and fake evaluated whole (0) and 8 samples at a time
BOTH_RANKS = (16,)  # student and fake score both as adapters (no target)

SONG_CIFAR10 = {"model_channels": 128, "channel_mult": [2, 2, 2], "num_blocks": 4, "attn_resolutions": [16],
                "dropout": 0.13, "embedding_type": "positional", "encoder_type": "standard",
                "decoder_type": "standard", "channel_mult_noise": 1, "resample_filter": [1, 1]}  # EDM's cifar10 ddpmpp
SONG_SMALL = {"model_channels": 64, "channel_mult": [1, 2, 2], "num_blocks": 2, "attn_resolutions": [16], "dropout": 0.0}

# preset: (backbone, item shape, label_dim, options, default batch on CPU, default batch on CUDA)
PRESETS = {
    "cifar10": ("edm-songunet", (3, 32, 32), 0, SONG_CIFAR10, 8, 128),
    "small": ("edm-songunet", (3, 32, 32), 0, SONG_SMALL, 32, 128),
    "mlp": ("mlp", (2,), 0, {}, 32, 128),
}
ITERS = {"mlp": 20, "small": 5, "cifar10": 3}  # default timed iterations on CPU (on CUDA: 20)
EMA_HALFLIFE_NIMG = 500_000  # EDM's cifar10 ema_halflife_kimg=500
TEACHER_OPTIM = {"lr": 1e-3, "betas": (0.9, 0.999)}  # EDM's cifar10 teacher
STUDENT_OPTIM = {"lr": 1e-4, "betas": (0.0, 0.99)}  # dpdm's TrainConfig defaults (fake score: the same)
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


def job_name(kind: str, rank: int | None, ema: bool, both: bool = False, chunk: int = 0) -> str:
    """``teacher``, ``dpdm`` (full fake score), ``lora<rank>`` or ``both<rank>`` (student adapted too), with
    ``-c<chunk>`` when teacher and fake are evaluated in chunks and ``-noema`` when the EMA is off."""
    return ((kind if rank is None else f"{'both' if both else 'lora'}{rank}") + (f"-c{chunk}" if chunk else "")
            + ("" if ema else "-noema"))


def measure(job_kind: str, preset: str, *, device: str, batch: int, precision: str, iters: int, warmup: int,
            forward: bool = True, ema: bool = True, lora_rank: int | None = None, both: bool = False,
            score_chunk: int = 0, count: bool = False, timeline: str | None = None) -> dict:
    """One job (``teacher`` or ``dpdm``; ``lora_rank``: the fake score as adapters, ``both``: the student too;
    ``score_chunk``: teacher and fake evaluated that many samples at a time, 0: whole) in this process; see the
    module doc for what is reported. ``forward``: also time the no-grad forward (teacher job only). ``count``:
    no timing; the peak of the live tensors over ``warmup + iters`` iterations, counted (``TensorMemory``), and
    with ``timeline`` (a path) the MiB alive after each op saved there."""
    import torch
    from dpdm.core.losses import EDMLoss
    from dpdm.core.plugins.registry import get
    from dpdm.core.sigmas import SigmaDist
    from dpdm.core.train.distill import DistillJob
    from dpdm.core.train.distributed import Dist
    from dpdm.core.train.lora import adapted_layers, adapter_parameters
    from dpdm.core.train.precision import Precision
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
    prec, dist, halflife = Precision(precision, dev), Dist(device=dev), EMA_HALFLIFE_NIMG if ema else None
    fake = {"trained_m": params / 1e6}
    if job_kind == "teacher":
        job = TeacherJob(denoiser, EDMLoss(), **TEACHER_OPTIM, ema_halflife_nimg=halflife, precision=prec, dist=dist)
    else:
        sigma = SigmaDist("log-uniform", min=0.002, max=80.0)  # dpdm's TrainConfig default
        job = DistillJob(denoiser, get("divergence", "smoothed-kl")(sigma=sigma), EDMLoss(sigma=sigma),
                         **STUDENT_OPTIM, fake_updates=1, order="student-first", ema_halflife_nimg=halflife,
                         fake_lora={"rank": lora_rank} if lora_rank else None,
                         student_lora={"rank": lora_rank} if both else None, score_chunk=score_chunk or None,
                         precision=prec, dist=dist)
        if lora_rank:  # what the fake step trains, and the adapted weights W' (computed anew on each forward)
            model, named = job.fake.module, dict(job.fake.module.named_modules())
            fake = {"trained_m": sum(p.numel() for p in adapter_parameters(model)) / 1e6, "adapted_m": sum(
                named[n].parametrizations.weight.original.numel() for n in adapted_layers(model)) / 1e6}
            if both:
                fake["student_trained_m"] = sum(p.numel() for p in adapter_parameters(job.student.module)) / 1e6
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
        for name, step_times in split.items():
            inner = getattr(job, f"{name}_step")

            def timed(*a, _inner=inner, _times=step_times, **k):
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                out = _inner(*a, **k)
                sync()
                _times.append((time.perf_counter() - t0, time.process_time() - c0))
                return out

            setattr(job, f"{name}_step", timed)

    if count:  # from just before the first step (models, EMA and batches built) to the end of the last
        from dpdm.core.train.memory import TensorMemory

        with TensorMemory(dev, timeline=timeline is not None) as counter:
            for _ in range(warmup + iters):
                stats = job.iteration(next_batch, generator)
        if timeline is not None:  # MiB alive after each op, for the fit in the batch (``counted``)
            torch.save(torch.tensor(counter.timeline, dtype=torch.float64) / 2**20, timeline)
        return {"params_m": params / 1e6, **fake, "loss": {k: v for k, v in stats.items() if k.endswith("loss")},
                "counted": {"peak_mib": counter.peak / 2**20, "start_mib": counter.start / 2**20,
                            "ops": len(counter.timeline or []), "iterations": warmup + iters}}
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
           "params_m": params / 1e6, **fake, "loss": {k: v for k, v in stats.items() if k.endswith("loss")}, **mem}
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


def run_case(spec: tuple, preset: str, args, device: str, batch: int, iters: int, tight: bool = False,
             count: bool = False, timeline: str | None = None) -> dict:
    """``measure`` of the job ``spec = (kind, lora rank, ema, both, score chunk)`` in a fresh interpreter
    (ru_maxrss is a process high-water mark; CUDA caches stay apart); ``tight``: the CPU memory pass
    (``TIGHT_MALLOC``, ``--warmup`` + 1 iterations, no forward timing); ``count``: the counted pass (``--count``,
    ``--warmup`` + 1 iterations)."""
    kind, rank, ema, both, chunk = spec
    cmd = [sys.executable, __file__, "--_job", kind, "--backbone", preset, "--device", device,
           "--batch", str(batch), "--precision", args.precision, "--iters", str(1 if tight or count else iters),
           "--warmup", str(args.warmup)] + (["--threads", str(args.threads)] if args.threads else [])
    cmd += (["--_lora", str(rank)] if rank else []) + ([] if ema else ["--_no_ema"]) + (["--_both"] if both else [])
    cmd += (["--_chunk", str(chunk)] if chunk else []) + (["--count"] if count else [])
    cmd += ["--_timeline", timeline] if timeline else []
    env = {**os.environ, **TIGHT_MALLOC} if tight else None
    proc = subprocess.run(cmd + (["--_no_forward"] if tight else []), capture_output=True, text=True, env=env,
                          check=False)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def merge_rounds(results: list[dict]) -> dict:
    """One job's timing passes over ``--rounds`` rounds as one result: every median (``ms``, ``cpu_ms``,
    ``fwd_ms``, …) the median of the rounds' medians, ``times_ms`` all timed iterations, ``rounds_ms`` each round's
    median (their spread is the drift of the machine between rounds); the rest from the first round."""
    ok = [r for r in results if "ms" in r]
    if len(ok) < len(results):
        return next(r for r in results if "ms" not in r)  # an error: reported as such
    out = dict(ok[0])
    for key, value in ok[0].items():
        if key.endswith("ms") and isinstance(value, float):
            out[key] = statistics.median(r[key] for r in ok)
    out["times_ms"] = [t for r in ok for t in r["times_ms"]]
    out["rounds_ms"] = [r["ms"] for r in ok]
    return out


def _done(res: dict | None) -> bool:
    return res is not None and "ms" in res and "total_mib" in res["mem"]


def state_mib(res: dict) -> tuple[float, float]:
    """What a job holds by construction (fp32), computed, and one model's gradients (held in both steps): teacher
    = model + Adam (2 moments) + EMA; DPDM = teacher + student + fake + Adam of both + EMA; with adapters, the fake
    is the teacher's tensors plus adapters ``a`` with their Adam; ``both``: so is the student (adapters ``s``, its
    Adam and EMA), and the gradients are the larger adapter set's."""
    p, a = (res[k] * 1e6 * 4 / 2**20 for k in ("params_m", "trained_m"))
    if res.get("student_lora"):
        s = res["student_trained_m"] * 1e6 * 4 / 2**20
        return p + 3 * a + (3 + res["ema"]) * s, max(a, s)
    kind = "teacher" if res["job"] == "teacher" else "full" if res["lora_rank"] is None else "lora"
    return {"teacher": 3 * p, "full": 7 * p, "lora": 4 * p + 3 * a}[kind] + res["ema"] * p, p


def compare(jobs: dict[str, dict]) -> dict[str, dict]:
    """Per DPDM job, its ratios to the teacher step of the same EMA setting (adapters: also to the full fake
    score's iteration with the same score chunk) and the verdicts against the targets (where the issues state
    one)."""
    out = {}
    for name, d in jobs.items():
        ema, rank, both = bool(d.get("ema")), d.get("lora_rank"), d.get("student_lora")
        chunk = d.get("score_chunk", 0)
        t, f = jobs.get(job_name("teacher", None, ema)), jobs.get(job_name("dpdm", None, ema, chunk=chunk))
        if d.get("job") != "dpdm" or not (_done(d) and _done(t)):
            continue
        dm, tm = d["mem"], t["mem"]
        c = {"time_ratio": d["ms"] / t["ms"], "cpu_time_ratio": d["cpu_ms"] / t["cpu_ms"],
             "floor_ratio": 2 + 2 * t["fwd_ms"] / t["ms"], "cpu_floor_ratio": 2 + 2 * t["fwd_cpu_ms"] / t["cpu_ms"],
             "mem_ratio": dm["total_mib"] / tm["total_mib"], "growth_ratio": dm["growth_mib"] / tm["growth_mib"],
             "state_mib": state_mib(d)[0], "grads_mib": state_mib(d)[1]}
        if "process_mib" in tm:
            c["process_ratio"] = dm["process_mib"] / tm["process_mib"]
            c["rss_default_ratio"] = d["rss_default"]["total_mib"] / t["rss_default"]["total_mib"]
        ref, target = (t, TIME_TARGET) if rank is None else (f, LORA_TIME_TARGET)  # adapters: against the full fake
        if rank and _done(f):
            c["full_time_ratio"], c["full_cpu_time_ratio"] = d["ms"] / f["ms"], d["cpu_ms"] / f["cpu_ms"]
        if _done(ref) and not both:  # no target for student adapters
            c["time_target"], c["time_met"] = target, d["ms"] / ref["ms"] <= target
            c["cpu_time_met"] = d["cpu_ms"] / ref["cpu_ms"] <= target
        mem_target = LORA_MEM_TARGETS[ema] if rank else MEM_TARGET if ema else None  # issue #6's: with the EMA
        mem_target = None if both else mem_target
        if mem_target:
            c["mem_target"], c["mem_met"] = mem_target, c["mem_ratio"] <= mem_target
        out[name] = c
    return out


def _verdict(wall_met: bool, cpu_met: bool) -> str:
    """The verdict on the wall-clock ratio; flagged when the CPU-time ratio disagrees (a noisy machine)."""
    verdict = "met" if wall_met else "NOT met"
    return verdict if wall_met == cpu_met else f"{verdict} (wall only; CPU time: {'met' if cpu_met else 'NOT met'})"


def _judged(c: dict, which: str, cpu: bool) -> str:
    """``target: verdict`` of the time or memory ratio, or nothing where no target is stated."""
    if which == "time" and "time_met" in c:
        vs = "full" if "full_time_ratio" in c else "teacher"
        return f"≤{c['time_target']:g}× {vs}: {_verdict(c['time_met'], c['cpu_time_met'] if cpu else c['time_met'])}"
    return f"≤{c['mem_target']:.2f}×: {'met' if c['mem_met'] else 'NOT met'}" if which == "mem" and "mem_met" in c else ""


def _cells(j: dict, c: dict, cpu: bool) -> tuple[list[str], list[str]]:
    """One job's cells of the time table and of the memory table (``c``: its comparison, empty for a teacher)."""
    teacher = j["job"] == "teacher"
    if teacher:
        split, vs = f"fwd {j['fwd_ms']:.1f}", f"1 (DPDM floor {2 + 2 * j['fwd_ms'] / j['ms']:.2f}×)"
    else:
        split, vs = f"{j['student_ms']:.1f} + {j['fake_ms']:.1f}", f"{c['time_ratio']:.2f}×" if c else "?"
    full = f"{c['full_time_ratio']:.2f}×" if "full_time_ratio" in c else ""
    cpu_ratio = (f"{c['cpu_time_ratio']:.2f}×" if c else "") + (f" / {c['full_cpu_time_ratio']:.2f}×" if full else "")
    times = ["" if teacher else f"{j['trained_m']:.3g}", f"{j['ms']:.1f}", split, vs, full,
             *([cpu_ratio] if cpu else []), _judged(c, "time", cpu)]
    m, state, ratio = j["mem"], state_mib(j), lambda key: f" ({c[key]:.2f}×)" if key in c else ""
    mems = [f"{m['total_mib']:.0f}", "1" if teacher else f"{c['mem_ratio']:.2f}×" if c else "?", _judged(c, "mem", cpu),
            f"{m['growth_mib']:.0f}" + ratio("growth_ratio"),
            *([f"{m['process_mib']:.0f}" + ratio("process_ratio"),
               f"{j['rss_default']['total_mib']:.0f}" + ratio("rss_default_ratio")] if cpu else []),
            f"{state[0]:.0f} (+{state[1]:.0f})"]
    return times, mems


def _md(header: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(x) + " |" for x in lines]


def table(rows: list[dict], device: str) -> str:
    """The results as two markdown tables (time, memory) and a line of state sizes per backbone."""
    cpu = not device.startswith("cuda")
    time_rows, mem_rows, notes = [], [], []
    for r in rows:
        jobs = r["jobs"]
        for name, j in jobs.items():
            if not _done(j):
                notes.append(f"{r['backbone']} {name}: " + j.get("error", f"memory pass: {j.get('mem', {}).get('error')}"))
                continue
            label = "full" if j["job"] == "dpdm" and not j["lora_rank"] else j["job"]
            label = f"{'both' if j.get('student_lora') else 'lora'} r={j['lora_rank']}" if j["lora_rank"] else label
            key = [r["backbone"], str(r["batch"]), "on" if j["ema"] else "off",
                   label + (f", chunk {j['score_chunk']}" if j.get("score_chunk") else "")]
            times, mems = _cells(j, r["cmp"].get(name, {}), cpu)
            time_rows.append(key + times)
            mem_rows.append(key + mems)
        if any("params_m" in j for j in jobs.values()):
            p = next(j["params_m"] for j in jobs.values() if "params_m" in j)
            ranks = {j["lora_rank"]: j["trained_m"] for j in jobs.values() if j["lora_rank"] and "trained_m" in j}
            adapters = ", ".join(f"r={rank} {a:.3g} M" for rank, a in ranks.items())
            adapted = next((j["adapted_m"] for j in jobs.values() if "adapted_m" in j), None)
            notes.append(f"{r['backbone']}: p = {p:.3g} M parameters ({p * 4e6 / 2**20:.1f} MiB in fp32); state by "
                         "construction = teacher 4p (3p without EMA), DPDM full 8p (7p), adapters 5p + 3a (4p + 3a), "
                         "both p + 7a (p + 6a)"
                         + (f"; adapter parameters a: {adapters}" if adapters else "")
                         + (f"; adapted weights (one W' copy, not kept: recomputed): {adapted * 4e6 / 2**20:.1f} MiB" if adapted else ""))
    head = ("memory pass, peak RSS: total = minus after imports, growth = minus before the first step, process = "
            "whole process; default malloc = the timing pass's total" if cpu else
            "max_memory_allocated: total, and growth = minus the allocation before the first step")
    lines = ["Time per iteration (median ms; ratios to the teacher step with the same EMA; adapters also to the full "
             "fake score's iteration" + ("; CPU time: the same ratios of process CPU time" if cpu else "") + "):", ""]
    lines += _md(["backbone", "batch", "EMA", "job", "fake trains (M)", "ms", "student + fake", "× teacher", "× full"]
                 + (["CPU time × teacher / full"] if cpu else []) + ["target: verdict"], time_rows)
    lines += ["", f"Memory (MiB; {head}; state = weights + Adam + EMA (+ one model's gradients) by construction):",
              ""]
    lines += _md(["backbone", "batch", "EMA", "job", "total", "× teacher", "target: verdict", "growth"]
                 + (["process", "default malloc"] if cpu else []) + ["state (+grads)"], mem_rows)
    return "\n".join(lines + [""] + notes)


def counted(args, presets: list[str], specs: list[tuple], device: str, batches: list[int]) -> dict:
    """``--count``: every job at every batch, its peak of live tensors counted (no timing); ratios to the teacher
    step with the same EMA and batch, the issues' memory targets; with two or more batches, the peak of each of a
    job's steps (DPDM: student, fake; teacher: its one) fitted as ``fixed + per_item · batch`` (least squares; the
    largest residual shows how linear it is) and, with ``--predict N``, the largest of those lines at batch N (which
    step peaks can change with the batch). Prints the tables and returns what the JSON holds."""
    import tempfile

    import torch

    rows, scratch = [], Path(tempfile.mkdtemp(prefix="dpdm-count-"))
    for preset in presets:
        jobs = {}
        for spec in specs:
            name = job_name(*spec)
            jobs[name] = {"job": spec[0], "lora_rank": spec[1], "ema": spec[2], "student_lora": spec[3],
                          "score_chunk": spec[4], "by_batch": {}}
            lines = {}  # batch -> MiB alive after each op
            for batch in batches:
                t0, path = time.perf_counter(), scratch / f"{preset}-{name}-{batch}.pt"
                res = run_case(spec, preset, args, device, batch, 1, count=True,
                               timeline=str(path) if len(batches) > 1 else None)
                jobs[name]["by_batch"][batch] = res
                peak = res.get("counted", {}).get("peak_mib")
                if peak is not None and path.exists():
                    lines[batch] = torch.load(path)
                    path.unlink()
                print(f"  {preset:8} batch {batch:4} {name:18} "
                      + (f"peak {peak:9.1f} MiB" if peak is not None else res.get("error", "?"))
                      + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
            if len(lines) >= 2:
                jobs[name]["fit"] = _fit(lines, args.predict)
        rows.append({"backbone": preset, "precision": args.precision, "jobs": jobs})

    def verdict(j: dict, ratio: float) -> str:
        target = (LORA_MEM_TARGETS[j["ema"]] if j["lora_rank"] else MEM_TARGET if j["ema"] else None)
        if j["job"] == "teacher" or j["student_lora"] or target is None:
            return ""
        return f"≤{target:.2f}×: {'met' if ratio <= target else 'NOT met'}"

    sizes = [(b, str(b)) for b in batches] + ([(args.predict, f"{args.predict} (fit)")] if args.predict else [])
    lines = ["Peak of the live tensors (MiB, counted per op over the warm-up and one iteration; × the teacher step "
             "with the same EMA and batch; the issues' memory targets):", ""]
    header = ["backbone", "EMA", "job"] + [f"batch {label}" for _, label in sizes] + ["target at the largest batch"]
    table_rows = []
    for r in rows:
        for name, j in r["jobs"].items():
            teacher = r["jobs"].get(job_name("teacher", None, j["ema"]))
            cells, last = [], None
            for batch, _ in sizes:
                mine, ref = (_peak_at(x, batch, args.predict) for x in (j, teacher))
                if mine is None:
                    cells.append(j["by_batch"].get(batch, {}).get("error", "–"))
                    continue
                last = mine / ref if ref else None
                cells.append(f"{mine:.1f}" + (f" ({last:.3f}×)" if ref and j is not teacher else ""))
            label = ("teacher" if j["job"] == "teacher" else "full" if not j["lora_rank"] else
                     f"{'both' if j['student_lora'] else 'lora'} r={j['lora_rank']}")
            label += f", chunk {j['score_chunk']}" if j["score_chunk"] else ""
            table_rows.append([r["backbone"], "on" if j["ema"] else "off", label] + cells
                              + [verdict(j, last) if last is not None else ""])
    lines += _md(header, table_rows)
    for r in rows:
        fits = [j["fit"] for j in r["jobs"].values() if "fit" in j]
        for name, j in r["jobs"].items():
            if "error" in j.get("fit", {}):
                lines += ["", f"{r['backbone']} {name}: {j['fit']['error']}"]
        worst = [f["max_residual_mib"] for f in fits if "error" not in f]
        if worst:
            lines += ["", f"{r['backbone']}: the MiB alive after each op fitted op by op as fixed + per item × batch "
                      f"over batches {', '.join(map(str, batches))} (largest residual {max(worst):.2f} MiB); a "
                      "predicted peak is the largest of those lines at that batch"]
    print("\n".join(lines))
    return {"batches": batches, "predict": args.predict, "results": rows}


def _fit(lines: dict, predict: int | None) -> dict:
    """Op by op, the least-squares line ``fixed + per_item · batch`` through the MiB alive after that op at each
    batch (``lines``: batch -> a tensor with one value per op; the same ops at every batch, or no fit), its largest
    residual, and with ``predict`` the largest of the lines at that batch: the predicted peak."""
    import torch

    if len({len(t) for t in lines.values()}) > 1:
        return {"error": "the ops differ between batches (" + ", ".join(f"{b}: {len(t)}" for b, t in lines.items())
                + "): no fit"}
    b = torch.tensor(list(lines), dtype=torch.float64)[:, None]  # (n, 1)
    y = torch.stack(list(lines.values()))  # (n, ops)
    db, dy = b - b.mean(), y - y.mean(0)
    per_item = (db * dy).sum(0) / db.square().sum()  # (ops,)
    fixed = y.mean(0) - per_item * b.mean()
    out = {"ops": y.shape[1], "max_residual_mib": (y - fixed - per_item * b).abs().max().item()}
    if predict:
        at = fixed + per_item * predict
        out.update({"predicted_mib": at.max().item(), "predicted_at": predict, "predicted_op": int(at.argmax())})
    return out


def _peak_at(job: dict | None, batch: int, predict: int | None) -> float | None:
    """A job's counted peak at ``batch``, or its predicted peak at the ``--predict`` batch."""
    if job is None:
        return None
    if predict is not None and batch == predict and batch not in job["by_batch"]:
        return job.get("fit", {}).get("predicted_mib")
    return job["by_batch"].get(batch, {}).get("counted", {}).get("peak_mib")


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
    p.add_argument("--rounds", type=int, default=1,
                   help="timing passes of every job, taken round after round (interleaved, so that a machine "
                        "whose speed drifts slows every job alike); times are the median of the rounds' medians")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--lora-ranks", default=",".join(map(str, LORA_RANKS)),
                   help="adapter ranks of the fake score, comma-separated ('' for none; default: %(default)s)")
    p.add_argument("--both-ranks", default=",".join(map(str, BOTH_RANKS)),
                   help="adapter ranks of student and fake score together ('' for none; default: %(default)s)")
    p.add_argument("--score-chunks", default=",".join(map(str, SCORE_CHUNKS)),
                   help="score_chunk of every DPDM job, comma-separated (0: the whole batch; default: %(default)s)")
    p.add_argument("--ema", choices=["both", "on", "off"], default="both",
                   help="run every job with the EMA on, off, or both (default: both)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--count", action="store_true",
                   help="no timing: count each job's peak of live tensors (dpdm.core.train.memory.TensorMemory), "
                        "the same number on any machine and load; with --batches and --predict, fit it in the batch")
    p.add_argument("--batches", default=None,
                   help="--count: comma-separated batches (default: --batch or the preset's)")
    p.add_argument("--predict", type=int, default=None,
                   help="--count with two or more --batches: the fitted peak at this batch (e.g. the GPU's 128)")
    p.add_argument("--out", default=None)
    p.add_argument("--_job", choices=["teacher", "dpdm"], help=argparse.SUPPRESS)  # internal: one job, JSON out
    p.add_argument("--_lora", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_both", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_chunk", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--_no_ema", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_no_forward", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_timeline", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    ranks, both_ranks = ([x.strip() for x in v.split(",") if x.strip()] for v in (args.lora_ranks, args.both_ranks))
    for opt, value, given in (("--lora-ranks", args.lora_ranks, ranks), ("--both-ranks", args.both_ranks, both_ranks)):
        if not all(x.isdigit() and int(x) > 0 for x in given):
            p.error(f"{opt} {value!r}: expected comma-separated ranks of at least 1, e.g. 4,16,64")
    ranks, both_ranks = [int(x) for x in ranks], [int(x) for x in both_ranks]
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: expected at least 1")
    chunks = [x.strip() for x in args.score_chunks.split(",") if x.strip()]
    if not chunks or not all(x.isdigit() for x in chunks):
        p.error(f"--score-chunks {args.score_chunks!r}: expected comma-separated sizes (0: the whole batch), e.g. 0,8")
    chunks = list(dict.fromkeys(int(x) for x in chunks))

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
                                 forward=not args._no_forward, ema=not args._no_ema, lora_rank=args._lora,
                                 both=args._both, score_chunk=args._chunk, count=args.count,
                                 timeline=args._timeline)))
        return

    presets = args.backbone or (["cifar10"] if cuda else ["small"])
    if args.big and "cifar10" not in presets:
        presets.append("cifar10")
    emas = {"both": (True, False), "on": (True,), "off": (False,)}[args.ema]
    dpdm = [(None, False)] + [(r, False) for r in ranks] + [(r, True) for r in both_ranks]
    specs = [(kind, rank, ema, both, chunk) for ema in emas for kind, rank, both, chunk in
             [("teacher", None, False, 0)] + [("dpdm", r, b, c) for c in chunks for r, b in dpdm]]
    if args.count:
        given = [x.strip() for x in (args.batches or "").split(",") if x.strip()]
        if not all(x.isdigit() and int(x) > 0 for x in given):
            p.error(f"--batches {args.batches!r}: expected comma-separated batch sizes, e.g. 8,16,32")
        preset_batch = PRESETS[presets[0]][5 if cuda else 4]
        batches = list(dict.fromkeys(int(x) for x in given)) or [args.batch or preset_batch]
        if args.predict is not None and len(batches) < 2:
            p.error("--predict fits the peak in the batch: give two or more --batches, e.g. --batches 4,8,16")
        print(f"device {device} ({torch.get_num_threads()} threads), {args.precision}; live tensors counted over "
              f"{args.warmup} warm-up + 1 iteration, each job in its own subprocess", flush=True)
        load0, clock = os.getloadavg(), time.perf_counter()
        result = counted(args, presets, specs, device, batches)
        out = Path(args.out or Path(__file__).parent / "results" / f"train_step-count-{device.split(':')[0]}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        command = " ".join(["python", "benchmarks/train_step.py", *(argv if argv is not None else sys.argv[1:])])
        meta = {"command": command, "device": device, "precision": args.precision, "warmup": args.warmup,
                "torch": torch.__version__, "threads": torch.get_num_threads(), "seconds": time.perf_counter() - clock,
                "loadavg_1m": {"start": load0[0], "end": os.getloadavg()[0]},
                "mem_target": MEM_TARGET, "lora_mem_targets": {"ema": LORA_MEM_TARGETS[True],
                                                               "no_ema": LORA_MEM_TARGETS[False]},
                "ema_halflife_nimg": EMA_HALFLIFE_NIMG, "teacher_optim": TEACHER_OPTIM, "student_optim": STUDENT_OPTIM}
        out.write_text(json.dumps({"meta": meta, **result}, indent=1) + "\n")
        print(f"wrote {out}")
        return
    print(f"device {device} ({torch.get_num_threads()} threads), {args.precision}, median of the timed iterations "
          f"after {args.warmup} warm-up; each job in its own subprocess"
          + ("" if cuda else ", timing pass then memory pass"), flush=True)
    rows, load0, clock = [], os.getloadavg(), time.perf_counter()
    mem_keys = ("total_mib", "growth_mib", "process_mib", "kind")
    for preset in presets:
        backbone, shape, label_dim, options, cpu_batch, cuda_batch = PRESETS[preset]
        batch = args.batch or (cuda_batch if cuda else cpu_batch)
        iters = args.iters or (20 if cuda else ITERS[preset])
        row = {"backbone": preset, "registry": backbone, "shape": list(shape), "label_dim": label_dim,
               "options": options, "batch": batch, "precision": args.precision, "iters": iters, "jobs": {}}
        timed = {spec: [] for spec in specs}  # the timing passes, round after round of every job
        for r in range(args.rounds):
            for spec in specs:
                t0 = time.perf_counter()
                timed[spec].append(run_case(spec, preset, args, device, batch, iters))
                if args.rounds > 1:
                    ms = timed[spec][-1].get("ms")
                    print(f"  round {r + 1}/{args.rounds} {job_name(*spec):18} "
                          + (f"{ms:10.1f} ms/iter" if ms else timed[spec][-1].get("error", "?"))
                          + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
        for spec in specs:
            t0, name = time.perf_counter(), job_name(*spec)
            res = {"job": spec[0], "lora_rank": spec[1], "ema": spec[2], "student_lora": spec[3],
                   "score_chunk": spec[4], **merge_rounds(timed[spec])}
            if "ms" in res:
                if cuda:
                    res["mem"] = {k: res.pop(k) for k in mem_keys if k in res}
                else:
                    res["rss_default"] = {k: res.pop(k) for k in mem_keys}
                    tight = run_case(spec, preset, args, device, batch, iters, tight=True)
                    res["mem"] = {k: tight[k] for k in (*mem_keys, "error") if k in tight}  # its times are slowed
                    res["mem"]["malloc"] = TIGHT_MALLOC
            row["jobs"][name] = res
            mem = res.get("mem", {})
            print(f"  {preset:8} batch {batch:4} {name:18} " +
                  (f"{res['ms']:10.1f} ms/iter" if "ms" in res else res["error"]) +
                  (f"  total {mem['total_mib']:7.0f} MiB  growth {mem['growth_mib']:7.0f} MiB" if "total_mib" in mem
                   else f"  memory: {mem.get('error', '-')}") + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
        row["cmp"] = compare(row["jobs"])
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
            "warmup": args.warmup, "rounds": args.rounds, "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "loadavg_1m": {"start": load0[0], "end": load1[0]},
            "time_target": TIME_TARGET, "mem_target": MEM_TARGET, "lora_time_target": LORA_TIME_TARGET,
            "lora_mem_targets": {"ema": LORA_MEM_TARGETS[True], "no_ema": LORA_MEM_TARGETS[False]},
            "lora_ranks": ranks, "both_ranks": both_ranks, "score_chunks": chunks, "ema": args.ema, "fake_updates": 1,
            "ema_halflife_nimg": EMA_HALFLIFE_NIMG, "teacher_optim": TEACHER_OPTIM, "student_optim": STUDENT_OPTIM}
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
