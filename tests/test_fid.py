"""FID: the Fréchet distance (closed forms, scipy), float64 statistics, npz I/O (ours and EDM's),
and detector loading through files made here in the official formats (no real weights exist here)."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import scipy.linalg
import torch

from dpdm.core.eval import detectors, fid
from dpdm.core.errors import DpdmError
from dpdm.core.eval.inception import FIDInceptionV3


# ---------------------------------------------------------------- the Fréchet distance

def test_frechet_distance_of_diagonal_gaussians_is_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 3, size=5), rng.uniform(0.1, 3, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_direct_scipy_on_random_spd():
    rng = np.random.default_rng(1)
    d = 16
    a, b = rng.normal(size=(d, 2 * d)), rng.normal(size=(d, 2 * d))
    s1, s2 = a @ a.T / d, b @ b.T / d
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    root = scipy.linalg.sqrtm(s1 @ s2)
    expected = np.real(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root))
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    # symmetric form: tr sqrtm(Σ1Σ2) = tr sqrtm(Σ1^½ Σ2 Σ1^½)
    r1 = scipy.linalg.sqrtm(s1).real
    sym = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.trace(scipy.linalg.sqrtm(r1 @ s2 @ r1).real)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(sym, rel=1e-6)


def test_identical_statistics_give_zero():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 8))
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_mismatched_dims_are_a_clear_error():
    with pytest.raises(DpdmError, match="reference statistics have 64 dims but the features have 2048"):
        fid.frechet_distance(np.zeros(2048), np.eye(2048), np.zeros(64), np.eye(64))


# ---------------------------------------------------------------- statistics

@pytest.mark.parametrize("splits", [[100], [1, 99], [37, 13, 50], [2] * 50])
def test_float64_accumulation_equals_numpy_cov(splits):
    rng = np.random.default_rng(3)
    features = (rng.normal(size=(100, 6)) * 50 + 1000).astype(np.float32)
    chunks = np.split(features, np.cumsum(splits)[:-1])
    stats = fid.feature_stats(lambda x: x, [torch.from_numpy(c) for c in chunks])
    assert stats.num_images == 100 and stats.mu.dtype == np.float64
    np.testing.assert_allclose(stats.mu, features.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(features.astype(np.float64), rowvar=False, ddof=1), rtol=1e-7)


def test_stats_need_two_images():
    with pytest.raises(DpdmError, match="at least 2 images"):
        fid.feature_stats(lambda x: x, [torch.zeros(1, 4)])


def test_stats_npz_round_trip_and_edm_format(tmp_path):
    rng = np.random.default_rng(4)
    stats = fid.FeatureStats(rng.normal(size=7), np.cov(rng.normal(size=(20, 7)), rowvar=False), 20)
    path = tmp_path / "sub" / "ours.npz"
    fid.save_stats(str(path), stats, detector="inception-2015-12-05-abc")
    back = fid.load_stats(str(path))
    np.testing.assert_array_equal(back.mu, stats.mu)
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    assert back.num_images == 20
    with np.load(path) as npz:  # what EDM's fid.py reads: ref['mu'], ref['sigma']
        np.testing.assert_array_equal(npz["mu"], stats.mu)
    edm = tmp_path / "cifar10-32x32.npz"
    np.savez(edm, mu=stats.mu.astype(np.float64), sigma=stats.sigma)  # EDM's `ref` command writes exactly this
    loaded = fid.load_stats(str(edm))
    assert loaded.num_images is None and fid.frechet_distance(*_ms(loaded), *_ms(stats)) == pytest.approx(0, abs=1e-9)


def _ms(stats):
    return stats.mu, stats.sigma


def test_load_stats_errors(tmp_path):
    with pytest.raises(DpdmError, match="no FID statistics at"):
        fid.load_stats(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(DpdmError, match="lacks mu, sigma"):
        fid.load_stats(str(tmp_path / "other.npz"))


def test_stats_cache_path(monkeypatch, tmp_path):
    monkeypatch.setenv("DPDM_CACHE", str(tmp_path))
    path = fid.stats_cache_path("cifar10:/data/x.zip", "inception-2015-12-05-0123")
    assert path.parent == tmp_path / "fid-stats" and path.name == "cifar10_data_x.zip--inception-2015-12-05-0123.npz"


# ---------------------------------------------------------------- detectors

class TinyDetector(torch.nn.Module):
    """The official detector's call signature: uint8 (N, 3, H, W), return_features → (N, 2048)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 2048)

    def forward(self, x, return_features: bool = False):
        feats = self.proj(x.to(torch.float32).mean(dim=(2, 3)) / 255)
        if return_features:
            return feats
        return feats.softmax(dim=1)


def _archive() -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(TinyDetector()), buffer)
    return buffer.getvalue()


class _Wrapped:
    """Pickles as torch.jit.load(io.BytesIO(archive)), the TorchScript-in-a-pickle form."""

    def __init__(self, archive: bytes):
        self.archive = archive

    def __reduce__(self):
        return torch.jit.load, (io.BytesIO(self.archive),)


def _images(n=4, c=3, size=16, seed=0):
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_torchscript_archive_loads_and_runs(tmp_path):
    path = tmp_path / "inception-2015-12-05.pt"
    path.write_bytes(_archive())
    det = detectors.load_detector(str(path))
    assert det.kind == "torchscript" and det.name == "inception-2015-12-05" and len(det.key) > len(det.name)
    images = _images()
    expected = det.net(images, return_features=True)
    torch.testing.assert_close(det(images), expected)
    gray = _images(c=1)
    torch.testing.assert_close(det(gray), det(gray.repeat(1, 3, 1, 1)))  # grayscale is repeated to RGB


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_pickled_torchscript_loads_through_restricted_unpickler(tmp_path, protocol):
    archive = _archive()
    path = tmp_path / "inception-2015-12-05.pkl"
    path.write_bytes(pickle.dumps(_Wrapped(archive), protocol=protocol))
    det = detectors.load_detector(str(path))
    assert det.kind == "torchscript"
    reference = torch.jit.load(io.BytesIO(archive))
    images = _images()
    torch.testing.assert_close(det(images), reference(images, return_features=True))
    stats = fid.feature_stats(det, [(images[:3], None), (images[3:], None)])  # the whole pipeline
    assert stats.mu.shape == (2048,) and stats.sigma.shape == (2048, 2048)


def test_pickle_with_other_global_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    path = tmp_path / "evil.pkl"
    path.write_bytes(b"\x80\x02" + payload)
    with pytest.raises(DpdmError, match=r"references the global os\.system.*nothing was executed"):
        detectors.load_detector(str(path))
    assert not marker.exists()
    # a smuggled global as the argument of the allowed loader is refused too
    path.write_bytes(b"\x80\x02ctorch.jit._serialization\nload\n" + payload[:-1] + b"\x85R.")
    with pytest.raises(DpdmError, match=r"os\.system"):
        detectors.load_detector(str(path))
    assert not marker.exists()


def test_persistence_pickle_is_refused_with_explanation(tmp_path):
    path = tmp_path / "inception-2015-12-05.pkl"
    path.write_bytes(b"\x80\x02ctorch_utils.persistence\n_reconstruct_persistent_obj\n}\x85R.")
    with pytest.raises(DpdmError, match="executes Python source"):
        detectors.load_detector(str(path))


def test_missing_and_unknown_detector_files(tmp_path):
    with pytest.raises(DpdmError, match="no FID detector at .*inception-2015-12-05.pkl.*pt_inception-2015-12-05-6726825d"):
        detectors.load_detector(str(tmp_path / "nope.pkl"))
    (tmp_path / "junk.bin").write_bytes(b"hello")
    with pytest.raises(DpdmError, match="is not an FID detector"):
        detectors.load_detector(str(tmp_path / "junk.bin"))
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(DpdmError, match="not pytorch-fid Inception-v3 weights: .*missing keys"):
        detectors.load_detector(str(tmp_path / "other.pth"))


# pytorch-fid's state dict: torchvision Inception3(num_classes=1008, aux_logits=False) with the FID blocks
# (mseitzer/pytorch-fid src/pytorch_fid/inception.py, torchvision inception.py): every BasicConv2d as
# (name, in, out, kh, kw), each giving conv.weight (out, in, kh, kw) and bn.{weight,bias,running_mean,running_var}.
STEM = [("Conv2d_1a_3x3", 3, 32, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3), ("Conv2d_2b_3x3", 32, 64, 3, 3),
        ("Conv2d_3b_1x1", 64, 80, 1, 1), ("Conv2d_4a_3x3", 80, 192, 3, 3)]
A = lambda i, pool: [("branch1x1", i, 64, 1, 1), ("branch5x5_1", i, 48, 1, 1), ("branch5x5_2", 48, 64, 5, 5),  # noqa: E731
                     ("branch3x3dbl_1", i, 64, 1, 1), ("branch3x3dbl_2", 64, 96, 3, 3), ("branch3x3dbl_3", 96, 96, 3, 3),
                     ("branch_pool", i, pool, 1, 1)]
B = [("branch3x3", 288, 384, 3, 3), ("branch3x3dbl_1", 288, 64, 1, 1), ("branch3x3dbl_2", 64, 96, 3, 3),
     ("branch3x3dbl_3", 96, 96, 3, 3)]
C = lambda c: [("branch1x1", 768, 192, 1, 1), ("branch7x7_1", 768, c, 1, 1), ("branch7x7_2", c, c, 1, 7),  # noqa: E731
               ("branch7x7_3", c, 192, 7, 1), ("branch7x7dbl_1", 768, c, 1, 1), ("branch7x7dbl_2", c, c, 7, 1),
               ("branch7x7dbl_3", c, c, 1, 7), ("branch7x7dbl_4", c, c, 7, 1), ("branch7x7dbl_5", c, 192, 1, 7),
               ("branch_pool", 768, 192, 1, 1)]
D = [("branch3x3_1", 768, 192, 1, 1), ("branch3x3_2", 192, 320, 3, 3), ("branch7x7x3_1", 768, 192, 1, 1),
     ("branch7x7x3_2", 192, 192, 1, 7), ("branch7x7x3_3", 192, 192, 7, 1), ("branch7x7x3_4", 192, 192, 3, 3)]
E = lambda i: [("branch1x1", i, 320, 1, 1), ("branch3x3_1", i, 384, 1, 1), ("branch3x3_2a", 384, 384, 1, 3),  # noqa: E731
               ("branch3x3_2b", 384, 384, 3, 1), ("branch3x3dbl_1", i, 448, 1, 1), ("branch3x3dbl_2", 448, 384, 3, 3),
               ("branch3x3dbl_3a", 384, 384, 1, 3), ("branch3x3dbl_3b", 384, 384, 3, 1), ("branch_pool", i, 192, 1, 1)]
BLOCKS = {"Mixed_5b": A(192, 32), "Mixed_5c": A(256, 64), "Mixed_5d": A(288, 64), "Mixed_6a": B,
          "Mixed_6b": C(128), "Mixed_6c": C(160), "Mixed_6d": C(160), "Mixed_6e": C(192), "Mixed_7a": D,
          "Mixed_7b": E(1280), "Mixed_7c": E(2048)}


def pytorch_fid_shapes() -> dict[str, tuple]:
    convs = STEM + [(f"{block}.{name}", *rest) for block, layers in BLOCKS.items() for name, *rest in layers]
    shapes = {}
    for name, cin, cout, kh, kw in convs:
        shapes[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for buffer in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{buffer}"] = (cout,)
    shapes["fc.weight"], shapes["fc.bias"] = (1008, 2048), (1008,)
    return shapes


def test_inception_has_pytorch_fid_keys_and_shapes():
    ours = {k: tuple(v.shape) for k, v in FIDInceptionV3().state_dict().items() if not k.endswith("num_batches_tracked")}
    assert ours == pytorch_fid_shapes()
    assert len(ours) == 94 * 5 + 2


@pytest.mark.parametrize("legacy", [False, True])
def test_pytorch_fid_weights_load_and_give_2048_features(tmp_path, legacy):
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in pytorch_fid_shapes().items():  # no num_batches_tracked, like a plain ported file
        if key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.1
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    det = detectors.load_detector(str(path))
    assert det.kind == "pytorch-fid" and det.name == "pt_inception-2015-12-05-6726825d"
    small = _images(n=1 if legacy else 2, size=32)
    features = det(small)
    assert features.shape == (len(small), 2048) and features.dtype == torch.float32 and torch.isfinite(features).all()
    if not legacy:  # 32×32 is resized to 299×299 inside: the same as giving the resized image
        big = torch.nn.functional.interpolate(small.float() / 255, size=(299, 299), mode="bilinear", align_corners=False)
        with torch.no_grad():
            on_299 = det.net(big)  # (2, 2048) from 299×299 inputs
        torch.testing.assert_close(on_299, features, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- the registered metric

class SmallDetector(torch.nn.Module):
    """The official call signature with 16 features (so the test's sqrtm is 16x16, not 2048x2048)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 16)

    def forward(self, x, return_features: bool = False):
        return self.proj(x.to(torch.float32).mean(dim=(2, 3)) / 255)


def test_fid_metric_from_the_registry(tmp_path):
    from dpdm.core import get
    from dpdm.core.datasets import from_model, to_model

    path = tmp_path / "small-detector.pt"
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(SmallDetector()), buffer)
    path.write_bytes(buffer.getvalue())
    metric = get("metric", "fid")(detector=str(path), batch_size=3)
    det = metric.detector
    det.feature_dim = 16  # the real detector's 2048, checked on every call, is this detector's 16
    a, b = to_model(_images(n=10, seed=1)), to_model(_images(n=12, seed=2))
    fa = det(from_model(a, "image")).double().numpy()
    fb = det(from_model(b, "image")).double().numpy()
    want = fid.frechet_distance(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))
    assert metric(a, b) == pytest.approx(want, rel=1e-6, abs=1e-8)
    assert metric(a, b) > 1e-6 and abs(metric(a, a)) < 1e-6
    with pytest.raises(DpdmError, match="fid: no detector given"):
        get("metric", "fid")()
    with pytest.raises(DpdmError, match="small-detector compares images"):
        metric(torch.zeros(4, 2), torch.zeros(4, 2))
    # a reference featurised once gives the same distance; statistics of another detector are refused
    prepared = metric.prepare(b)
    assert isinstance(prepared, fid.FeatureStats) and prepared.num_images == 12
    assert metric(a, prepared) == pytest.approx(metric(a, b), rel=1e-12)
    other = fid.FeatureStats(np.zeros(8), np.eye(8), 100)
    with pytest.raises(DpdmError, match="have 8 dims but the features have 16"):
        metric(a, other)
