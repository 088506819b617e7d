"""Backbone cost: forward+backward time and peak memory per registered backbone and size.

Each case builds the backbone through the registry (so plugins such as ``dit`` and ``stylegan2`` are
measured when they are installed), runs ``--warmup`` untimed and ``--iters`` timed training-like steps
(forward, ``out.square().mean().backward()``) at ``--batch``, and reports the median step time.

Memory, honestly stated:
- CUDA: ``torch.cuda.max_memory_allocated`` over the timed steps, minus the allocation before them
  (activations + gradients + temporaries; parameters excluded). Also bf16 autocast and torch.compile.
- CPU: torch's CPU allocations are invisible to tracemalloc, so each case runs in its own subprocess and
  reports the growth of the process's peak resident set (``ru_maxrss``) from just before the first (warm-up)
  step (model and input built) to the end: activations, gradients and allocator caching, in MiB. It is a
  high-water mark of the whole process, so it over-counts rather than under-counts.

    python benchmarks/backbones.py [--device cpu|cuda] [--batch 64] [--iters 5] [--only NAME] [--big]
                                   [--out benchmarks/results/backbones-<device>.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SONG_SMALL = dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
SONG_CIFAR10 = dict(model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.13,
                    embedding_type="positional", encoder_type="standard", decoder_type="standard",
                    channel_mult_noise=1, resample_filter=[1, 1])  # EDM's cifar10 ddpmpp
DHARIWAL_SMALL = dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
DHARIWAL_IMAGENET64 = dict(model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3,
                           attn_resolutions=[32, 16, 8], dropout=0.0)  # EDM's imagenet64 adm (label_dim 1000)

# (case name, backbone, item shape, label_dim, options, big_only)
CASES = [
    ("mlp-2", "mlp", (2,), 0, {}, False),
    ("mlp-1x8x8", "mlp", (1, 8, 8), 0, {}, False),
    ("unet-small-1x8x8", "unet-small", (1, 8, 8), 0, {}, False),
    ("unet-small-3x32x32", "unet-small", (3, 32, 32), 0, {}, False),
    ("edm-songunet-small-3x16x16", "edm-songunet", (3, 16, 16), 0, SONG_SMALL, False),
    ("edm-songunet-cifar10-ddpmpp", "edm-songunet", (3, 32, 32), 0, SONG_CIFAR10, False),
    ("edm-dhariwal-small-3x16x16", "edm-dhariwal", (3, 16, 16), 0, DHARIWAL_SMALL, False),
    ("edm-dhariwal-imagenet64", "edm-dhariwal", (3, 64, 64), 1000, DHARIWAL_IMAGENET64, True),
    ("dit-S-3x32x32", "dit", (3, 32, 32), 0, {"size": "S"}, False),  # measured only if registered
    ("stylegan2-3x32x32", "stylegan2", (3, 32, 32), 0, {}, False),  # measured only if registered
]


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(name, backbone, shape, label_dim, options, *, device, batch, iters, warmup, dtype, compile_):
    """One case in this process: ``{"ms": median step time, "mem_mib": peak memory (see module doc), ...}``."""
    import torch

    from dpdm.core.plugins.registry import get

    try:
        factory = get("backbone", backbone)
    except Exception as exc:  # not registered (e.g. dit/stylegan2 before their plugin lands)
        return {"skipped": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    if backbone == "dit":  # the dit factory's size option may be named differently; fall back to defaults
        import inspect

        if "size" not in inspect.signature(factory).parameters:
            options = {}
    torch.manual_seed(0)
    dev = torch.device(device)
    net = factory(shape=shape, label_dim=label_dim, **options).to(dev).train()
    params = sum(p.numel() for p in net.parameters())
    model = torch.compile(net) if compile_ else net
    x = torch.randn(batch, *shape, device=dev)
    noise = torch.randn(batch, device=dev)
    labels = (torch.nn.functional.one_hot(torch.arange(batch, device=dev) % label_dim, label_dim).float()
              if label_dim else None)
    cuda = dev.type == "cuda"

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = model(x, noise, class_labels=labels)
        out.float().square().mean().backward()
        net.zero_grad(set_to_none=True)

    rss0 = _maxrss_mib()  # before the first step: the warm-up's peak counts (later steps reuse its memory)
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    mem = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else _maxrss_mib() - rss0
    return {"ms": 1000 * statistics.median(times), "mem_mib": mem, "params_m": params / 1e6,
            "mem_kind": "cuda max_memory_allocated delta" if cuda else "ru_maxrss growth (process)"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--only", action="append", default=[], help="backbone or case name (repeatable)")
    p.add_argument("--big", action="store_true", help="include the full-size imagenet64 ADM")
    p.add_argument("--out", default=None)
    p.add_argument("--_case", help=argparse.SUPPRESS)  # internal: run one CPU case, print JSON
    p.add_argument("--_variant", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args._case:
        case = next(c for c in CASES if c[0] == args._case)
        dtype, compile_ = args._variant.split("+")[0], args._variant.endswith("+compile")
        print(json.dumps(measure(*case[:5], device=device, batch=args.batch, iters=args.iters,
                                 warmup=args.warmup, dtype=dtype, compile_=compile_)))
        return

    variants = ["fp32", "fp32+compile", "bf16", "bf16+compile"] if device.startswith("cuda") else ["fp32"]
    cases = [c for c in CASES if (args.big or not c[5]) and (not args.only or c[0] in args.only or c[1] in args.only)]
    results = []
    print(f"device {device}, batch {args.batch}, median of {args.iters} forward+backward steps after {args.warmup} "
          f"warm-up; memory: {'CUDA max_memory_allocated delta' if device.startswith('cuda') else 'peak RSS growth'}")
    print(f"{'case':32} {'variant':14} {'params (M)':>10} {'ms/step':>10} {'mem (MiB)':>10}")
    for name, backbone, shape, label_dim, options, _ in cases:
        for variant in variants:
            # a fresh interpreter per case: ru_maxrss is a process high-water mark, and compile caches stay apart
            cmd = [sys.executable, __file__, "--_case", name, "--_variant", variant, "--device", device,
                   "--batch", str(args.batch), "--iters", str(args.iters), "--warmup", str(args.warmup)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                row = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
            else:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            row = {"case": name, "backbone": backbone, "shape": list(shape), "options": options,
                   "variant": variant, **row}
            results.append(row)
            if "ms" in row:
                print(f"{name:32} {variant:14} {row['params_m']:>10.3f} {row['ms']:>10.1f} {row['mem_mib']:>10.1f}",
                      flush=True)
            else:
                print(f"{name:32} {variant:14} {row.get('skipped') or row.get('error')}", flush=True)
            if "skipped" in row:
                break
    out = Path(args.out or Path(__file__).parent / "results" / f"backbones-{device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "batch": args.batch, "iters": args.iters, "warmup": args.warmup,
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
