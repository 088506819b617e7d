"""The ``fd-<dataset>`` substitute metric: a small classifier trained (deterministically, once, cached) on the
dataset, and the Fréchet distance in its features. Everything runs on sklearn's 8×8 ``digits``."""

from __future__ import annotations

import json

import pytest
import torch

from dpdm.core.eval import classifier, metrics

from dpdm.core.plugins import registry
from dpdm.core.datasets import to_model
from dpdm.core.errors import DpdmError, UnknownComponentError


def _digits(split, **options):
    return registry.get("dataset", "digits")(split=split, **options)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A cache directory holding the default ``fd-digits`` classifier (seed 0), and its detector."""
    root = tmp_path_factory.mktemp("fd-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPDM_CACHE", str(root))
        detector = classifier.fd_detector("digits")
    return root, detector


@pytest.fixture
def shared_cache(trained, monkeypatch):
    """The module's trained cache as ``$DPDM_CACHE``, and training made to fail: every use must hit the cache."""
    root, detector = trained
    monkeypatch.setenv("DPDM_CACHE", str(root))

    def no_training(*args, **kwargs):
        raise RuntimeError("trained again instead of using the cache")

    monkeypatch.setattr(classifier, "train_classifier", no_training)
    return root, detector


# ---------------------------------------------------------------- the network and its training

@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (1, 28, 28), (3, 13, 9)])
def test_classifier_takes_any_image_size_from_8x8(shape):
    net = classifier.FDClassifier(shape, num_classes=7, feature_dim=16)
    x = torch.rand(5, *shape) * 2 - 1
    assert net.features(x).shape == (5, 16)
    assert net(x).shape == (5, 7)


def test_training_is_deterministic_per_seed_and_leaves_the_global_rng_alone():
    train, test = _digits("train"), _digits("test")
    before = torch.get_rng_state()
    net_a, acc_a = classifier.train_classifier(train, test, seed=0, epochs=2)
    net_b, acc_b = classifier.train_classifier(train, test, seed=0, epochs=2)
    net_c, _ = classifier.train_classifier(train, test, seed=1, epochs=2)
    assert torch.equal(torch.get_rng_state(), before)
    a, b, c = net_a.state_dict(), net_b.state_dict(), net_c.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert acc_a == acc_b
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_default_classifier_is_accurate_on_digits(trained):
    _, detector = trained
    assert detector.accuracy > 0.95
    assert detector.accuracy == detector.info["test_accuracy"]
    assert detector.info["epochs"] == classifier.default_epochs(detector.info["num_train"])


# ---------------------------------------------------------------- the cache

def test_second_call_loads_the_cache(shared_cache):
    root, first = shared_cache
    again = classifier.fd_detector("digits")
    assert again.digest == first.digest and again.key == first.key == f"fd-digits-{first.digest}"
    images = _digits("test").tensors()[0][:50]
    assert torch.equal(again(images), first(images))
    assert again.info == first.info
    files = sorted(p.name for p in (root / "fd-classifiers").iterdir())
    path = classifier.cache_path("digits", seed=0)
    assert files == [path.with_suffix(".json").name, path.name]  # no temporary files left behind


@pytest.mark.parametrize("change", [dict(seed=1), dict(data={"test_fraction": 0.3}), dict(epochs=3)])
def test_cache_is_keyed_by_seed_data_options_and_epochs(shared_cache, change):
    assert classifier.cache_path("digits", **change) != classifier.cache_path("digits")
    with pytest.raises(RuntimeError, match="trained again"):
        classifier.fd_detector("digits", **change)


def test_info_is_recorded_in_the_json_sidecar(shared_cache):
    _, detector = shared_cache
    info = json.loads(classifier.cache_path("digits", seed=0).with_suffix(".json").read_text())
    assert info == detector.info
    assert info["dataset"] == "digits" and info["data"] == {} and info["seed"] == 0
    assert info["test_accuracy"] == pytest.approx(detector.accuracy)
    assert (info["num_train"], info["num_test"]) == (len(_digits("train")), len(_digits("test")))
    assert info["feature_dim"] == detector.feature_dim == 128
    assert info["torch"] == torch.__version__


@pytest.mark.parametrize("damage", ["truncated weights", "empty sidecar"])
def test_corrupt_cache_file_is_a_clear_error(trained, tmp_path, monkeypatch, damage):
    monkeypatch.setenv("DPDM_CACHE", str(trained[0]))
    good = classifier.cache_path("digits", seed=0)
    monkeypatch.setenv("DPDM_CACHE", str(tmp_path))
    path = classifier.cache_path("digits", seed=0)
    path.parent.mkdir(parents=True)
    weights, sidecar = good.read_bytes(), good.with_suffix(".json").read_text()
    path.write_bytes(weights[:len(weights) // 2] if damage == "truncated weights" else weights)
    path.with_suffix(".json").write_text("" if damage == "empty sidecar" else sidecar)
    with pytest.raises(DpdmError, match="is unreadable.*delete") as info:
        classifier.fd_detector("digits")
    assert str(path) in str(info.value)


# ---------------------------------------------------------------- the detector

def test_detector_features_and_input_checks(shared_cache):
    _, detector = shared_cache
    images = _digits("test").tensors()[0][:10]
    features = detector(images)
    assert features.dtype == torch.float32 and features.shape == (10, detector.feature_dim)
    assert detector.name == "fd-digits" and len(detector.digest) == 12 and detector.device == torch.device("cpu")
    for bad in (images.float(), images[0], images.repeat(1, 3, 1, 1), torch.zeros(2, 1, 16, 16, dtype=torch.uint8)):
        with pytest.raises(DpdmError, match=r"fd-digits detector takes uint8 \(N, 1, 8, 8\)"):
            detector(bad)


# ---------------------------------------------------------------- the metric

def test_metric_separates_data_from_noise(shared_cache):
    fd = classifier.fd_metric(dataset="digits")
    assert fd.detector.key == shared_cache[1].key
    test = to_model(_digits("test").tensors()[0])
    train = to_model(_digits("train").tensors()[0])
    noise = torch.rand(len(test), 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    same, near, far = fd(test, test), fd(train, test), fd(noise, test)
    assert abs(same) < 1e-3 * far
    assert 0 < near < 0.1 * far


def test_make_metric_routes_fd_names(shared_cache, monkeypatch):
    fd = metrics.make_metric("fd-digits", {"seed": 0})
    assert fd.detector.key == shared_cache[1].key
    with pytest.raises(UnknownComponentError):
        metrics.make_metric("fd-nosuchdataset")
    seen = {}
    monkeypatch.setattr(classifier, "fd_detector", lambda dataset, **kw: seen.update(kw, dataset=dataset))
    metrics.make_metric("fd-digits", {"seed": 2}, data=("digits", {"test_fraction": 0.25}))
    assert seen["dataset"] == "digits" and seen["seed"] == 2 and seen["data"] == {"test_fraction": 0.25}


# ---------------------------------------------------------------- refusals

def test_unlabelled_dataset_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("DPDM_CACHE", str(tmp_path))
    with pytest.raises(DpdmError, match="unlabelled"):
        classifier.fd_detector("digits", data={"labels": False})


def test_vector_dataset_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("DPDM_CACHE", str(tmp_path))
    with pytest.raises(DpdmError, match="compares images"):
        classifier.fd_detector("two-moons")


def test_dataset_errors_name_the_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("DPDM_CACHE", str(tmp_path))
    with pytest.raises(DpdmError, match=r"fd-digits: cannot build dataset 'digits'.*no_such_option"):
        classifier.fd_detector("digits", data={"no_such_option": 1})
