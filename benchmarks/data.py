"""Data-loading throughput against what training consumes: does loading ever starve a training step?

Builds an EDM-format dataset zip of 32×32 RGB PNGs (real CIFAR-10 pixels from ``../shared/data`` when that
copy is there, else random images, which are the worst case for PNG decoding), puts it on each storage and
times ``dpdm.data.loader.Loader`` (``image-zip``, lazy per-item decoding) at each worker count:

- ``local``: a zip on the local disk;
- ``s3``: the same zip in a bucket of an S3 endpoint: by default a moto server started here in its own
  process on 127.0.0.1 (a real HTTP S3 API, so every read is a ranged GET, but no network latency);
  ``--s3-url s3://bucket/prefix`` uses a real endpoint instead (credentials and ``AWS_ENDPOINT_URL`` from
  the environment).

Consumption: one DPDM iteration (``fake_updates`` fake-score steps + one student step, each on its own batch)
with a small ``edm-songunet`` (the size of a MNIST/CIFAR recipe that trains on one machine) at the same batch
size on this machine, timed as ``fake_updates`` × the fastest fake step + the fastest student step; it
consumes ``(fake_updates + 1) · batch`` images per iteration. The goal is loading
at more than 5× that rate.

    python benchmarks/data.py [--images 4096] [--batch 128] [--workers 0 2] [--batches 20] [--s3-url URL]
                              [--out benchmarks/results/data-cpu.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CIFAR_NPZ = ROOT.parent / "shared" / "data" / "cifar10" / "cifar10_exact_partial.npz"
SMALL_SONGUNET = dict(model_channels=64, channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[16], dropout=0.0)


def images(n: int) -> tuple[np.ndarray, str]:
    """``n`` uint8 (32, 32, 3) images and where they come from."""
    if CIFAR_NPZ.is_file():
        with np.load(CIFAR_NPZ) as f:
            x = f["x_train_partial"]
        return np.concatenate([x] * (n // len(x) + 1))[:n], "CIFAR-10 (exact partial copy, repeated)"
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), "random pixels"


def dataset_zip(pixels: np.ndarray) -> bytes:
    """EDM's dataset format (``dataset_tool.py``): stored PNGs at 00000/img00000000.png, labels null."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        for i, a in enumerate(pixels):
            png = io.BytesIO()
            Image.fromarray(a).save(png, format="png", compress_level=0)
            z.writestr(f"{i:08d}"[:5] + f"/img{i:08d}.png", png.getvalue())
        z.writestr("dataset.json", json.dumps({"labels": None}))
    return buf.getvalue()


def loader_rate(path: str, batch: int, workers: int, batches: int) -> dict:
    """Images/s of ``Loader`` over the zip at ``path`` (after one untimed warm-up batch, which also starts
    the workers and opens each one's zip handle)."""
    from dpdm.data.image_folder import image_zip
    from dpdm.data.loader import Loader

    ds = image_zip(path=path)
    loader = Loader(ds, batch, seed=0, num_workers=workers, persistent_workers=workers > 0)
    next(loader)
    t0 = time.perf_counter()
    for _ in range(batches):
        x, _ = next(loader)
    dt = time.perf_counter() - t0
    return {"images_per_s": batches * batch / dt, "batch_ms": 1000 * dt / batches, "shape": list(x.shape)}


def training_rate(batch: int, fake_updates: int, iters: int) -> dict:
    """Images/s one DPDM iteration consumes with a small edm-songunet at ``batch`` on this machine."""
    from dpdm.core import get
    from dpdm.core.train.distill import DPDM
    from dpdm.core.losses import EDMLoss
    from dpdm.core.sigmas import SigmaDist

    backbone = get("backbone", "edm-songunet")(shape=(3, 32, 32), label_dim=0, **SMALL_SONGUNET)
    teacher = get("preconditioning", "edm")(backbone=backbone, label_dim=0)
    sigma = SigmaDist("log-uniform", min=0.002, max=80.0)
    algo = DPDM(teacher, get("divergence", "smoothed-kl")(sigma=sigma), EDMLoss(), lr=1e-5,
                fake_updates=fake_updates)
    g = torch.Generator().manual_seed(0)
    data = torch.randn(batch, 3, 32, 32, generator=g).clamp(-1, 1)
    algo.fake_step(data, generator=g)  # warm-up
    fake_s, student_s = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        algo.fake_step(data, generator=g)
        t1 = time.perf_counter()
        algo.student_step(data, generator=g)
        fake_s.append(t1 - t0)
        student_s.append(time.perf_counter() - t1)
    dt = fake_updates * min(fake_s) + min(student_s)  # one iteration: fake_updates fake steps + one student step
    params = sum(p.numel() for p in teacher.parameters())
    return {"iteration_s": dt, "fake_step_s": min(fake_s), "student_step_s": min(student_s), "images_per_iteration": (fake_updates + 1) * batch,
            "images_per_s": (fake_updates + 1) * batch / dt, "params": params}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    """A moto S3 server in its own process on 127.0.0.1; returns it and its endpoint once it answers."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the moto server did not start within 30 s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--batches", type=int, default=20, help="timed batches per case")
    p.add_argument("--fake-updates", type=int, default=5, help="fake-score updates per student update")
    p.add_argument("--train-iters", type=int, default=2, help="timed fake and student steps (the fastest counts)")
    p.add_argument("--s3-url", help="s3://bucket/prefix of a real endpoint (default: a local moto server)")
    p.add_argument("--no-s3", action="store_true", help="local zip only")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data-cpu.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)

    pixels, source = images(args.images)
    blob = dataset_zip(pixels)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "bench.zip"
        local.write_bytes(blob)
        storages = [("local", str(local))]
        moto = None
        if not args.no_s3:
            import fsspec

            if args.s3_url is None:
                moto, endpoint = start_moto()
                os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                                  AWS_DEFAULT_REGION="us-east-1")
                fs, _ = fsspec.core.url_to_fs("s3://dpdm-bench")
                fs.mkdir("dpdm-bench")
                url = "s3://dpdm-bench/bench.zip"
            else:
                url = args.s3_url.rstrip("/") + "/dpdm-bench.zip"
            with fsspec.open(url, "wb") as f:
                f.write(blob)
            storages.append(("s3" if args.s3_url is None else "s3 (remote)", url))
        try:
            for name, path in storages:
                for workers in args.workers:
                    r = loader_rate(path, args.batch, workers, args.batches)
                    rows.append({"storage": name, "workers": workers, **r})
                    print(f"  {name:<12} workers={workers}: {r['images_per_s']:8.0f} images/s", file=sys.stderr)
        finally:
            if moto is not None:
                moto.kill()
    train = training_rate(args.batch, args.fake_updates, args.train_iters)
    for r in rows:
        r["x_training"] = r["images_per_s"] / train["images_per_s"]

    print(f"\nData loading vs training consumption ({os.cpu_count()} CPU cores, batch {args.batch}, "
          f"{args.images} 32x32 PNGs: {source})")
    print(f"training: DPDM iteration ({args.fake_updates} fake + 1 student step) with edm-songunet "
          f"{train['params'] / 1e6:.1f}M params: {train['iteration_s']:.2f} s, "
          f"{train['images_per_s']:.0f} images/s consumed\n")
    print("| storage | workers | images/s | ms/batch | × training |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['storage']} | {r['workers']} | {r['images_per_s']:.0f} | {r['batch_ms']:.1f} | "
              f"{r['x_training']:.1f} |")
    result = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "batch": args.batch, "images": args.images,
              "source": source, "training": train, "loading": rows,
              "goal": "loading > 5x training consumption", "met": all(r["x_training"] > 5 for r in rows)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
