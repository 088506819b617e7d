"""Evaluation beyond the metrics themselves: per-item seeds, sharded generation and statistics, cached reference
statistics, and the `dpdm eval ref|fid` commands run end to end through a small detector in the official format."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dpdm.cli.common import join_list_options
from dpdm.cli.main import app
from dpdm.core.eval import detectors, fid, generation, protocols, references
from dpdm.core.io.checkpoint import build_denoiser, network_spec, save_denoiser
from dpdm.core.datasets import from_model, to_model
from dpdm.core.errors import DpdmError
from dpdm.core.plugins.registry import get

WIDE = {"COLUMNS": "1000"}
ROOT = Path(__file__).resolve().parent.parent


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env=WIDE)


def squash(text: str) -> str:
    return " ".join(text.split())


class SmallDetector(torch.nn.Module):
    """The FID detector's call signature (uint8 images, ``return_features``) with 16 features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(64, 16)

    def forward(self, x, return_features: bool = False):
        x = torch.nn.functional.adaptive_avg_pool2d(x.to(torch.float32) / 255, 8)  # (N, 3, 8, 8)
        return torch.tanh(self.proj(x[:, 0].reshape(len(x), 64)) + x.mean(dim=(1, 2, 3))[:, None])


@pytest.fixture
def small_detector(tmp_path, monkeypatch):
    """A TorchScript detector file; the Inception's 2048-feature check is lowered to its 16 features."""
    monkeypatch.setattr(detectors, "FEATURE_DIM", 16)
    monkeypatch.setenv("DPDM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "small-detector.pt"
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(SmallDetector()), buffer)
    path.write_bytes(buffer.getvalue())
    return path


def tiny_denoiser(shape=(1, 8, 8), label_dim=10, seed=0):
    torch.manual_seed(seed)
    spec = network_spec({"name": "mlp", "hidden": 32, "depth": 1}, {"name": "edm"}, shape, label_dim)
    return build_denoiser(spec).eval(), spec


# ---------------------------------------------------------------- per-item seeds


def test_item_generators_draw_per_item():
    gens = generation.ItemGenerators([5, 6, 7])
    x = gens.randn((2, 3))
    assert x.shape == (3, 2, 3)
    assert torch.equal(x[1], torch.randn((2, 3), generator=torch.Generator().manual_seed(6)))
    labels = generation.ItemGenerators([5, 6, 7]).randint(10)
    assert labels.shape == (3,) and labels.dtype == torch.int64 and bool(((labels >= 0) & (labels < 10)).all())


@pytest.mark.parametrize("sampler", ["dpdm", "euler-stochastic", "heun"])
def test_samples_do_not_depend_on_the_batch_size(sampler):
    """Item i is the same whether it is drawn alone, in a batch of 7 or in one batch of all (labels too)."""
    net, _ = tiny_denoiser()
    fn = get("sampler", sampler)
    kw = {"s_churn": 40.0} if sampler == "euler-stochastic" else {}
    sigmas = get("schedule", "karras")(3)

    def sample(d, x, s, **k):
        return fn(d, x, s, **k, **kw)

    runs = [generation.generate(net, sample, sigmas, 20, (1, 8, 8), label_dim=10, seed=3, batch_size=b)
            for b in (1, 7, 20)]
    for other in runs[1:]:
        torch.testing.assert_close(other, runs[0], rtol=0, atol=1e-5)
    assert not torch.allclose(runs[0][0], runs[0][1])  # items differ from each other
    again = generation.generate(net, sample, sigmas, 20, (1, 8, 8), label_dim=10, seed=4, batch_size=20)
    assert not torch.allclose(again, runs[0])  # and the seed matters


def test_item_seeds_of_a_stochastic_sampler_are_used():
    """dpdm re-noises between steps from the item's generator: a denoiser returning 0 exposes that noise."""
    zero = lambda x, sigma, class_labels=None: torch.zeros_like(x)  # noqa: E731
    sigmas = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    x = generation.generate(zero, get("sampler", "dpdm"), sigmas, 4, (3,), seed=1, batch_size=2)
    assert torch.equal(x, torch.zeros(4, 3))  # the last step returns the denoiser's 0
    seen = []
    record = lambda x, sigma, class_labels=None: (seen.append(x.clone()), torch.zeros_like(x))[1]  # noqa: E731
    for b in (1, 4):
        seen.clear()
        generation.generate(record, get("sampler", "dpdm"), sigmas, 4, (3,), seed=1, batch_size=b)
        second_step = torch.cat(seen[1::2]) if b == 1 else seen[1]
        if b == 1:
            ref = second_step
    torch.testing.assert_close(second_step, ref, rtol=0, atol=0)  # 1.0 · ε' of each item, bit for bit


def test_shards_partition_the_items():
    parts = [list(generation.shard(10, r, 3)) for r in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(10))
    assert parts[0] == [0, 3, 6, 9] and list(generation.shard(2, 2, 3)) == []


# ---------------------------------------------------------------- statistics of generated sets and datasets


def test_sample_feature_stats_match_a_direct_computation(small_detector):
    det = detectors.load_detector(str(small_detector))
    net, spec = tiny_denoiser()
    sampler, sigmas = get("sampler", "dpdm"), get("schedule", "dpdm")(2)
    x = generation.generate(net, sampler, sigmas, 30, (1, 8, 8), label_dim=10, seed=2, batch_size=30)
    f = det(from_model(x, "image")).double().numpy()
    stats = protocols.sample_feature_stats(net, sampler, sigmas, 30, (1, 8, 8), det, label_dim=10, seed=2,
                                           batch_size=4)
    assert stats.num_images == 30
    np.testing.assert_allclose(stats.mu, f.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats.sigma, np.cov(f, rowvar=False), rtol=1e-4, atol=1e-9)  # float32 features
    # the shards of 3 ranks, summed, give the same statistics (what all_reduce_stats does across processes)
    accs = []
    for rank in range(3):
        acc = fid.StatsAccumulator()
        for _, xb in generation.generate_items(net, sampler, sigmas, generation.shard(30, rank, 3), (1, 8, 8),
                                               label_dim=10, seed=2, batch_size=5):
            acc.update(det(from_model(xb, "image")))
        accs.append(acc)
    total = fid.StatsAccumulator()
    total.n = sum(a.n for a in accs)
    total.sum = sum(a.sum for a in accs)
    total.outer = sum(a.outer for a in accs)
    np.testing.assert_allclose(total.stats().sigma, stats.sigma, rtol=1e-4, atol=1e-9)


def test_dataset_stats_and_their_cache(small_detector, monkeypatch):
    det = detectors.load_detector(str(small_detector))
    ds = get("dataset", "digits")(split="test")
    f = det(ds.tensors()[0][:100]).double().numpy()
    stats = references.dataset_stats(ds, det, num=100, batch_size=32)
    np.testing.assert_allclose(stats.mu, f.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stats.sigma, np.cov(f, rowvar=False), rtol=1e-5, atol=1e-7)
    cached = references.cached_dataset_stats("digits-test", ds, det, num=100)
    path = fid.stats_cache_path("digits-test-n100", det.key)
    assert path.exists() and np.allclose(cached.sigma, stats.sigma)

    def boom(*a, **k):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(references, "dataset_stats", boom)
    again = references.cached_dataset_stats("digits-test", ds, det, num=100)
    np.testing.assert_array_equal(again.sigma, cached.sigma)
    with pytest.raises(AssertionError, match="recomputed"):  # another size is another entry
        references.cached_dataset_stats("digits-test", ds, det, num=50)


def test_vector_data_has_no_feature_statistics(small_detector):
    det = detectors.load_detector(str(small_detector))
    with pytest.raises(DpdmError, match="holds vectors"):
        references.dataset_stats(get("dataset", "gaussian-ring")(split="test"), det)


def test_score_streams_feature_metrics_and_gathers_the_others(small_detector):
    net, _ = tiny_denoiser()
    sampler, sigmas = get("sampler", "dpdm"), get("schedule", "dpdm")(2)
    x = generation.generate(net, sampler, sigmas, 24, (1, 8, 8), label_dim=10, seed=0)
    ref = to_model(get("dataset", "digits")(split="test").tensors()[0][:50])
    metric = get("metric", "fid")(detector=str(small_detector), batch_size=7)
    value, first = protocols.score(net, sampler, sigmas, metric, metric.prepare(ref), num=24, shape=(1, 8, 8),
                                 label_dim=10, batch_size=5, keep=6)
    assert value == pytest.approx(metric(x, ref), rel=1e-6)
    torch.testing.assert_close(first, x[:6])
    energy = get("metric", "energy")()
    value, first = protocols.score(net, sampler, sigmas, energy, ref, num=24, shape=(1, 8, 8), label_dim=10,
                                 batch_size=5, keep=30)
    assert value == pytest.approx(energy(x, ref), rel=1e-9) and len(first) == 24


# ---------------------------------------------------------------- the CLI


def test_list_options_take_several_values():
    assert join_list_options(["eval", "fid", "--steps", "4", "5", "6", "--num", "8"]) == \
        ["eval", "fid", "--steps", "4,5,6", "--num", "8"]
    assert join_list_options(["recover", "--sigma", "0.5,1", "--sigma", "2"]) == \
        ["recover", "--sigma", "0.5,1", "--sigma", "2"]
    assert join_list_options(["--steps"]) == ["--steps"]


@pytest.fixture
def digits_checkpoint(tmp_path):
    """A student checkpoint (metadata role student, as a run saves it)."""
    net, spec = tiny_denoiser()
    path = tmp_path / "tiny.safetensors"
    save_denoiser(str(path), net, spec, {"role": "student"})
    return path, net


def test_eval_ref_then_fid(small_detector, digits_checkpoint, tmp_path):
    ref = tmp_path / "ref.npz"
    r = invoke("eval", "ref", "digits", ref, "--detector", small_detector, "--split", "test", "--batch", "64")
    assert r.exit_code == 0, r.output
    assert f"wrote {ref}: fid statistics of 359 images of digits (test), 16 features" in squash(r.stdout)
    det = detectors.load_detector(str(small_detector))
    want = references.dataset_stats(get("dataset", "digits")(split="test"), det)
    got = fid.load_stats(str(ref))
    np.testing.assert_allclose(got.sigma, want.sigma, rtol=1e-12)
    assert got.num_images == 359

    ckpt, net = digits_checkpoint
    out = tmp_path / "fid.json"
    r = invoke("eval", "fid", "--checkpoint", ckpt, "--steps", "1", "2", "--num", "40", "--ref", ref,
               "--detector", small_detector, "--batch", "16", "--out", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["metric"] == "fid" and data["num"] == 40 and data["sampler"] == {"name": "dpdm"}
    assert data["schedule"] == {"name": "dpdm"} and data["role"] == "student"
    assert [row["steps"] for row in data["results"]] == [1, 2] and [row["nfe"] for row in data["results"]] == [1, 2]
    metric = get("metric", "fid")(detector=str(small_detector))
    for row in data["results"]:
        x = generation.generate(net, get("sampler", "dpdm"), get("schedule", "dpdm")(row["steps"]), 40, (1, 8, 8),
                                label_dim=10, seed=0, batch_size=40)
        assert row["value"] == pytest.approx(metric(x, got), rel=1e-6)
    assert (tmp_path / "fid-steps01.png").read_bytes()[:4] == b"\x89PNG"
    rows = [squash(line.replace("|", " ")) for line in r.stdout.splitlines()]  # piped: Markdown tables
    assert any(row.startswith(f"1 1 {data['results'][0]['value']:.4g} ") for row in rows), rows


@pytest.mark.parametrize("extra", [None, {"role": "teacher"}, {"role": "fake"}])
def test_eval_fid_of_a_teacher_checkpoint_defaults_to_heun_and_karras(small_detector, tmp_path, extra):
    """A checkpoint that is not a student (no role, a teacher's, an EDM .pkl) samples as EDM does: Heun, Karras."""
    from dpdm.core.io.checkpoint import checkpoint_role

    net, spec = tiny_denoiser(seed=1)
    ckpt = tmp_path / "teacher.safetensors"
    save_denoiser(str(ckpt), net, spec, extra)
    assert checkpoint_role(str(ckpt)) == "teacher"
    ref = tmp_path / "ref.npz"
    det = detectors.load_detector(str(small_detector))
    fid.save_stats(str(ref), references.dataset_stats(get("dataset", "digits")(split="test"), det))
    out = tmp_path / "fid.json"
    r = invoke("eval", "fid", "--checkpoint", ckpt, "--steps", "2", "--num", "30", "--ref", ref, "--detector",
               small_detector, "--out", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["sampler"] == {"name": "heun"} and data["schedule"] == {"name": "karras"}
    assert data["role"] == "teacher" and data["results"][0]["nfe"] == 3
    sigmas = get("schedule", "karras")(2)
    assert data["results"][0]["sigmas"] == sigmas.tolist()
    x = generation.generate(net, get("sampler", "heun"), sigmas, 30, (1, 8, 8), label_dim=10, seed=0)
    metric = get("metric", "fid")(detector=str(small_detector))
    assert data["results"][0]["value"] == pytest.approx(metric(x, fid.load_stats(str(ref))), rel=1e-6)
    assert "heun sampler, karras schedule" in squash(r.stdout)
    r = invoke("eval", "fid", "--checkpoint", ckpt, "--steps", "2", "--num", "30", "--ref", ref, "--detector",
               small_detector, "--out", out, "--device", "cpu", "--schedule", "dpdm")
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["sampler"] == {"name": "heun"} and data["schedule"] == {"name": "dpdm"}
    assert data["results"][0]["sigmas"] == get("schedule", "dpdm")(2).tolist()


def test_checkpoint_role_of_an_edm_pickle(tmp_path):
    from dpdm.core.io.checkpoint import checkpoint_role

    pkl = tmp_path / "network-snapshot.pkl"
    pkl.write_bytes(b"\x80\x04\x95" + b"\x00" * 20)  # a pickle's opening bytes: EDM's format, a teacher
    assert checkpoint_role(str(pkl)) == "teacher"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((10**6).to_bytes(8, "little") + b"{ not json")
    with pytest.raises(DpdmError, match="is not a valid safetensors file"):
        checkpoint_role(str(bad))


def test_eval_fid_errors(small_detector, digits_checkpoint, tmp_path):
    ckpt, _ = digits_checkpoint
    r = invoke("eval", "fid", "--checkpoint", ckpt, "--steps", "1", "--num", "4", "--detector", tmp_path / "nope.pt")
    assert r.exit_code == 1 and "no FID detector at" in squash(r.stderr) and "Traceback" not in r.output
    r = invoke("eval", "fid", "--checkpoint", ckpt, "--steps", "1", "--num", "4")
    assert r.exit_code == 1 and "no metric: give --detector PATH (the FID Inception-v3) or --metric NAME" in squash(r.stderr)
    r = invoke("eval", "fid", "--checkpoint", ckpt, "--steps", "1", "--num", "4", "--detector", small_detector)
    assert r.exit_code == 1 and "no reference: give --ref REF.npz" in squash(r.stderr)
    wrong = tmp_path / "wrong.npz"
    fid.save_stats(str(wrong), fid.FeatureStats(np.zeros(2048), np.eye(2048), 10))
    r = invoke("eval", "fid", "--checkpoint", ckpt, "--steps", "1", "--num", "4", "--detector", small_detector,
               "--ref", wrong)
    assert r.exit_code == 1
    assert (f"--ref {wrong} holds 2048-dimensional statistics but small-detector-" in squash(r.stderr)
            and "gives 16 features per image" in squash(r.stderr))
    r = invoke("eval", "fid", "--checkpoint", ckpt, "--steps", "0", "--num", "4")
    assert r.exit_code == 1 and "--steps: every value must be at least 1, got 0" in squash(r.stderr)
    r = invoke("eval", "fid", "--checkpoint", ckpt, "--run", tmp_path, "--num", "4")
    assert r.exit_code == 1 and "give --run DIR or --checkpoint PATH, not both" in squash(r.stderr)


def test_eval_ref_errors(small_detector, tmp_path):
    r = invoke("eval", "ref", "digits", tmp_path / "r.npz")
    assert r.exit_code == 1 and "no metric: give --detector PATH" in squash(r.stderr)
    r = invoke("eval", "ref", "gaussian-ring", tmp_path / "r.npz", "--detector", small_detector)
    assert r.exit_code == 1 and "holds vectors" in squash(r.stderr)
    r = invoke("eval", "ref", tmp_path / "missing.zip", tmp_path / "r.npz", "--detector", small_detector)
    assert r.exit_code == 1 and "missing.zip" in squash(r.stderr) and "Traceback" not in r.output
    r = invoke("eval", "ref", "digits", tmp_path / "r.npz", "--detector", small_detector, "--data", "nokey")
    assert r.exit_code == 1 and "--data 'nokey': expected key=value" in squash(r.stderr)


# ---------------------------------------------------------------- two processes


GEN_SCRIPT = """
import sys, torch
from dpdm.core.eval import generation, protocols
from dpdm.core.train.distributed import init_dist
from dpdm.core.plugins.registry import get
sys.path.insert(0, {tests!r})
from test_eval import tiny_denoiser, SmallDetector
dist = init_dist("cpu")
net, _ = tiny_denoiser()
sampler, sigmas = get("sampler", "dpdm"), get("schedule", "dpdm")(2)
mine = generation.shard(23, dist.rank, dist.world_size)
parts = list(generation.generate_items(net, sampler, sigmas, mine, (1, 8, 8), label_dim=10, seed=5, batch_size=4))
det = SmallDetector().eval()
det.feature_dim = 16
det_fn = lambda x: det(x, return_features=True).detach()
det_fn.feature_dim = 16
stats = protocols.sample_feature_stats(net, sampler, sigmas, 23, (1, 8, 8), det_fn, label_dim=10, seed=5,
                                       batch_size=3, dist=dist)
torch.save({{"parts": parts, "mu": stats.mu, "sigma": stats.sigma, "n": stats.num_images}},
           {out!r} + f"-{{dist.rank}}.pt")
dist.destroy()
"""


@pytest.mark.slow
def test_two_gloo_processes_generate_what_one_does(tmp_path):
    script = tmp_path / "gen.py"
    script.write_text(GEN_SCRIPT.format(tests=str(ROOT / "tests"), out=str(tmp_path / "two")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
                   check=True, env=env, timeout=300, capture_output=True)
    script.write_text(GEN_SCRIPT.format(tests=str(ROOT / "tests"), out=str(tmp_path / "one")))
    subprocess.run([sys.executable, str(script)], check=True, env=env, timeout=300, capture_output=True)
    one = torch.load(tmp_path / "one-0.pt", weights_only=False)
    ranks = [torch.load(tmp_path / f"two-{r}.pt", weights_only=False) for r in range(2)]
    single = torch.cat([x for _, x in one["parts"]])
    union = torch.empty_like(single)
    for r in ranks:
        for idx, x in r["parts"]:
            union[idx] = x
    torch.testing.assert_close(union, single, rtol=0, atol=1e-6)
    # Every rank holds the statistics of all 23 items. The features are float32, and a network's float32 output may
    # change in its last bits with the batch it runs in (the ranks' batches of 3 are not one process's), so the
    # statistics agree to float32 resolution, not float64's: the mean to ~1e-8 relative, the covariance (a difference
    # of second moments of size ~0.1) to ~1e-9 absolute, as seen here. One item missing or counted twice would move
    # them by percents of their size (covariance entries ~1e-4 to 1e-2).
    for r in ranks:
        assert r["n"] == 23
        np.testing.assert_allclose(r["mu"], one["mu"], rtol=1e-7, atol=1e-12)
        np.testing.assert_allclose(r["sigma"], one["sigma"], rtol=1e-7, atol=1e-8)


@pytest.mark.slow
def test_eval_fid_under_torchrun_matches_one_process(tmp_path):
    """`dpdm eval fid --nproc 2` (gloo, each rank its share of the images) gives one process's numbers."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DPDM_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"}
    net, spec = tiny_denoiser()
    ckpt = tmp_path / "tiny.safetensors"
    save_denoiser(str(ckpt), net, spec)
    cli = [sys.executable, "-m", "dpdm.cli"]
    subprocess.run(cli + ["eval", "ref", "digits", str(tmp_path / "ref.npz"), "--metric", "fd-digits", "--split",
                          "test", "--device", "cpu"], check=True, env=env, timeout=300, capture_output=True)
    common = ["eval", "fid", "--checkpoint", str(ckpt), "--steps", "1", "2", "--num", "45", "--batch", "8",
              "--metric", "fd-digits", "--ref", str(tmp_path / "ref.npz"), "--device", "cpu"]
    subprocess.run(cli + common + ["--out", str(tmp_path / "one.json")], check=True, env=env, timeout=300,
                   capture_output=True)
    two = subprocess.run(cli + common + ["--out", str(tmp_path / "two.json"), "--nproc", "2"], env=env, timeout=300,
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["world_size"] == 1 and two["world_size"] == 2 and one["metric"] == two["metric"] == "fd-digits"
    for a, b in zip(one["results"], two["results"]):
        assert a["steps"] == b["steps"] and b["value"] == pytest.approx(a["value"], rel=1e-5)
    assert one["results"][0]["value"] != pytest.approx(one["results"][1]["value"], rel=1e-3)


def test_eval_ref_reads_an_edm_zip_path(small_detector, tmp_path):
    import zipfile

    from PIL import Image

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "data.zip"
    with zipfile.ZipFile(path, "w") as z:
        for i, img in enumerate(images):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="png")
            z.writestr(f"00000/img{i:08d}.png", buf.getvalue())
    out = tmp_path / "zip-ref.npz"
    r = invoke("eval", "ref", path, out, "--detector", small_detector, "--batch", "5", "--device", "cpu")
    assert r.exit_code == 0, r.output
    det = detectors.load_detector(str(small_detector))
    f = det(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()).double().numpy()
    got = fid.load_stats(str(out))
    assert got.num_images == 12
    np.testing.assert_allclose(got.mu, f.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.sigma, np.cov(f, rowvar=False), rtol=1e-4, atol=1e-9)


@pytest.mark.slow
def test_whole_pipeline_through_pytorch_fid_weights(tmp_path, monkeypatch):
    """A state dict with pytorch-fid's keys (random values) through `eval ref` and `eval fid`: 2048 features,
    a 2048×2048 sqrtm, the number equal to the Fréchet distance computed by hand from the same features."""
    from test_fid import pytorch_fid_shapes

    monkeypatch.setenv("DPDM_CACHE", str(tmp_path / "cache"))
    generator = torch.Generator().manual_seed(0)
    state = {k: (torch.rand(s, generator=generator) + 0.5 if k.endswith("running_var")
                 else torch.randn(s, generator=generator) * 0.1) for k, s in pytorch_fid_shapes().items()}
    det_path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, det_path)
    ref = tmp_path / "ref.npz"
    r = invoke("eval", "ref", "digits", ref, "--detector", det_path, "--split", "test", "--num", "24", "--device", "cpu")
    assert r.exit_code == 0, r.output
    net, spec = tiny_denoiser()
    ckpt = tmp_path / "tiny.safetensors"
    save_denoiser(str(ckpt), net, spec)
    out = tmp_path / "fid.json"
    r = invoke("eval", "fid", "--checkpoint", ckpt, "--steps", "2", "--num", "12", "--ref", ref, "--detector", det_path,
               "--out", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    value = json.loads(out.read_text())["results"][0]["value"]
    det = detectors.load_detector(str(det_path))
    x = generation.generate(net, get("sampler", "dpdm"), get("schedule", "dpdm")(2), 12, (1, 8, 8), label_dim=10)
    f = det(from_model(x, "image")).double().numpy()
    g = det(get("dataset", "digits")(split="test").tensors()[0][:24]).double().numpy()
    want = fid.frechet_distance(f.mean(0), np.cov(f, rowvar=False), g.mean(0), np.cov(g, rowvar=False))
    assert value == pytest.approx(want, rel=1e-4)


def test_sweeps_and_recovery_keep_only_what_figures_need():
    from dpdm.core.eval import protocols as ev

    net, _ = tiny_denoiser()
    energy = get("metric", "energy")()
    ref = to_model(get("dataset", "digits")(split="test").tensors()[0][:40])
    common = dict(num=30, shape=(1, 8, 8), label_dim=10, seed=0, device="cpu")
    vals, samples = ev.sweep_student(net, energy, ref, sampler={"name": "dpdm"}, schedule={"name": "dpdm"},
                                     steps=[1, 2], keep=5, **common)
    full, _ = ev.sweep_student(net, energy, ref, sampler={"name": "dpdm"}, schedule={"name": "dpdm"}, steps=[1, 2],
                               **common)
    assert vals == full and [len(x) for x in samples.values()] == [5, 5]  # the values use all 30 samples
    clean = ref[:12]
    table, examples = ev.recovery(net, net, energy, clean, None, [0.5, 2.0], ref, keep=4, batch_size=5)
    full, whole = ev.recovery(net, net, energy, clean, None, [0.5, 2.0], ref, batch_size=12)
    assert all(table[s][k] == pytest.approx(full[s][k], rel=1e-6) for s in full for k in full[s])
    assert all(len(v) == 4 for ex in examples.values() for v in ex.values())
    torch.testing.assert_close(examples[2.0]["noisy"], whole[2.0]["noisy"][:4])  # per-item noise: batch-independent


def test_recovery_noise_is_seeded_by_sigma_not_by_its_position():
    from dpdm.core.eval import protocols as ev

    net, _ = tiny_denoiser()
    energy = get("metric", "energy")()
    ref = to_model(get("dataset", "digits")(split="test").tensors()[0][:40])
    clean = ref[:12]
    alone, ex_alone = ev.recovery(net, net, energy, clean, None, [2.0], ref)
    listed, ex_listed = ev.recovery(net, net, energy, clean, None, [0.5, 1.0, 2.0, 5.0], ref)
    assert alone[2.0] == listed[2.0]
    torch.testing.assert_close(ex_alone[2.0]["noisy"], ex_listed[2.0]["noisy"], rtol=0, atol=0)
    assert listed[0.5] != listed[2.0]  # other σ, other noise


def test_recovery_of_dataset_items_streams_feature_statistics(small_detector):
    """``Items`` read a dataset batch by batch; with a feature metric only statistics are kept, and the values are
    those of the whole sets."""
    from dpdm.core.eval import protocols as ev
    from dpdm.core.eval import recovery as rec

    net, _ = tiny_denoiser()
    train = get("dataset", "digits")(split="train")
    ids = [3, 17, 40, 41, 99, 120, 300, 301, 500, 777, 1000, 1200]
    metric = get("metric", "fid")(detector=str(small_detector))
    reference = metric.prepare(to_model(get("dataset", "digits")(split="test").tensors()[0]))
    table, examples = ev.recovery(net, net, metric, rec.Items(train, ids), None, [1.0], reference, batch_size=5,
                                  keep=3)
    x0, y = to_model(train.tensors()[0][ids]), train.tensors()[1][ids]
    _, whole = ev.recovery(net, net, get("metric", "energy")(), x0, y, [1.0], x0)  # rows 0..11 get other noise ...
    gens = generation.ItemGenerators(rec.noise_seeds(0, 1.0, ids))
    noisy = x0 + gens.randn((1, 8, 8))  # ... the dataset's items get the noise of their dataset index
    with torch.no_grad():
        den = net(noisy, torch.full((12,), 1.0), class_labels=y)
    assert table[1.0]["noisy"] == pytest.approx(metric(noisy, reference), rel=1e-6)
    assert table[1.0]["teacher"] == pytest.approx(metric(den, reference), rel=1e-6)
    torch.testing.assert_close(examples[1.0]["student"], den[:3])
    assert not torch.equal(whole[1.0]["noisy"], noisy)
    assert rec.distance(metric, rec.Items(train, ids), reference) == pytest.approx(metric(x0, reference), rel=1e-6)


def test_paper_protocol_reference_is_the_training_set(small_detector, tmp_path):
    """Section 5.1 compares with the full training set: eval.ref when set, else the train split's statistics
    (cached); for data metrics the train split's items."""
    from dpdm.core.eval import recovery as rec
    from dpdm.core.config.recipe import load_recipe

    recipe = load_recipe(str(ROOT / "recipes" / "digits.yaml"))
    train = get("dataset", "digits")(split="train")
    metric = get("metric", "fid")(detector=str(small_detector))
    stats, name = rec.training_reference(recipe, train, metric, num_samples=10)
    want = references.dataset_stats(train, detectors.load_detector(str(small_detector)))
    np.testing.assert_allclose(stats.sigma, want.sigma, rtol=1e-12)
    assert name == f"digits training split ({len(train)} items, feature statistics)"
    assert list((tmp_path / "cache" / "fid-stats").glob(f"digits-*-train-n{len(train)}--*.npz"))
    published = tmp_path / "published.npz"
    fid.save_stats(str(published), fid.FeatureStats(np.arange(16.0), np.eye(16), 50000))
    stats, name = rec.training_reference(load_recipe(str(ROOT / "recipes" / "digits.yaml"), [f"eval.ref={published}"]),
                                         train, metric, num_samples=10)
    assert name == str(published) and stats.num_images == 50000
    data, name = rec.training_reference(recipe, train, get("metric", "energy")(), num_samples=len(train))
    torch.testing.assert_close(data, to_model(train.tensors()[0]), rtol=0, atol=0)
    items, note = rec.select("paper", train, None, 20, seed=1)
    # data metrics compare with the training items *other than* the noised ones (no set against itself)
    data, name = rec.training_reference(recipe, train, get("metric", "energy")(), num_samples=len(train),
                                        exclude=items.indices)
    rest = [i for i in range(len(train)) if i not in set(items.indices)]
    torch.testing.assert_close(data, to_model(train.tensors()[0][rest]), rtol=0, atol=0)
    assert name == f"digits training split ({len(train) - 20} items, the other 20 are the noised ones)"
    # without the exclusion the clean items' energy against a reference holding them is biased below zero
    x0 = to_model(train.tensors()[0][list(items.indices)])
    energy = get("metric", "energy")()
    assert energy(x0, to_model(train.tensors()[0])) < energy(x0, data)
    _, name = rec.training_reference(recipe, train, energy, num_samples=10, exclude=range(len(train)))
    assert "biased low" in name
    assert len(items) == 20 and list(items.indices) == sorted(items.indices) and note is None
    assert list(rec.select("paper", train, None, 20, seed=1)[0].indices) == list(items.indices)
    assert list(rec.select("paper", train, None, 20, seed=2)[0].indices) != list(items.indices)
    everything, note = rec.select("paper", train, None, len(train) + 1, seed=1)
    assert list(everything.indices) == list(range(len(train))) and "using all" in note


def test_a_run_evaluates_with_fd_and_caches_its_reference(tmp_path, monkeypatch):
    """`dpdm run` of an image recipe with eval.metric fd-digits: the report names the metric, the detector and its
    accuracy; the test split's statistics land in the cache; the figures are written."""
    from dpdm.core.config.recipe import load_recipe
    from dpdm.core.pipeline.run import run

    monkeypatch.setenv("DPDM_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe(str(ROOT / "recipes" / "digits.yaml"), [
        "teacher.train.steps=20", "train.steps=4", "train.fake_updates=1", "eval.num_samples=60",
        "eval.recovery_num=40", "eval.teacher_nfe=[1,3]", "eval.student_steps=[1,2]", "eval.one_step_sigma_max=[2.5]",
        "eval.recovery_sigmas=[1.0]", "eval.metric={name: fd-digits, epochs: 1}", "device=cpu",
        "model.backbone={name: mlp, hidden: 32, depth: 1}"])
    report = run(recipe, tmp_path / "run")
    assert report["metric"] == "fd-digits" and report["detector"].startswith("fd-digits-")
    assert 0.1 < report["detector_test_accuracy"] <= 1.0
    assert set(report["sweep"]["student"]["dpdm"]) == {"1", "2"} and report["recovery"]["1"]["student"] > 0
    cached = list((tmp_path / "cache" / "fid-stats").glob("digits-*-test-n359--fd-digits-*.npz"))
    assert len(cached) == 1
    md = (tmp_path / "run" / "report.md").read_text()
    assert "Metric: **fd-digits**" in md and "classifier test accuracy" in md
    for name in ("samples_student.png", "nfe_curve.png", "recovery.png"):
        assert (tmp_path / "run" / "figures" / name).read_bytes()[:4] == b"\x89PNG"


def test_a_runs_eval_ref_is_the_default_reference(small_detector, tmp_path):
    from dpdm.cli.eval_inputs import load_reference
    from dpdm.core.config.recipe import load_recipe
    from dpdm.core.train.distributed import Dist
    from dpdm.core.progress import Progress

    ref = tmp_path / "published.npz"
    fid.save_stats(str(ref), fid.FeatureStats(np.arange(16.0), np.eye(16), 50000))
    metric = get("metric", "fid")(detector=str(small_detector))
    recipe = load_recipe(str(ROOT / "recipes" / "digits.yaml"), [f"eval.ref={ref}"])
    stats, name = load_reference(None, metric, recipe, Dist(), Progress())
    assert name == str(ref) and stats.num_images == 50000 and np.array_equal(stats.mu, np.arange(16.0))
    plain = load_recipe(str(ROOT / "recipes" / "digits.yaml"))
    stats, name = load_reference(None, metric, plain, Dist(), Progress())
    assert name == "digits test split (359 items)" and stats.num_images == 359
