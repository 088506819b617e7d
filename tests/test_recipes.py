"""The shipped recipes structure strictly; overrides and recipe-file problems are reported with dotted paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpdm.core import ConfigError
from dpdm.core.config.recipe import EvalConfig, Recipe, load_recipe
from dpdm.core.config.structure import Component, dump_yaml, load_yaml_text, structure, unstructure

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))


def test_there_are_recipes():
    assert "toy2d.yaml" in [p.name for p in RECIPES]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_structures(path):
    recipe = load_recipe(str(path))
    assert isinstance(recipe, Recipe)
    assert recipe.name
    # the dumped, resolved recipe reads back to the same thing
    assert structure(Recipe, load_yaml_text(dump_yaml(unstructure(recipe)), "dumped")) == recipe


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_opens_with_its_run_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("#")
    assert f"dpdm run recipes/{path.name}" in first


def test_toy2d_values():
    r = load_recipe(str(RECIPES_DIR / "toy2d.yaml"))
    assert r.name == "toy2d" and r.device == "cpu" and r.seed == 0
    assert r.data == Component("gaussian-ring", {"num_modes": 8, "radius": 1.0, "std": 0.05, "num_samples": 20000})
    assert r.model.backbone == Component("mlp", {"hidden": 128, "depth": 3, "emb_dim": 128})
    assert r.model.precond == Component("edm", {"sigma_data": 0.5})
    assert r.teacher.checkpoint is None
    assert r.teacher.train.lr == 1e-3 and type(r.teacher.train.lr) is float
    assert r.teacher.train.betas == (0.9, 0.999)
    assert r.train.lr == 1e-4 and type(r.train.lr) is float
    assert r.train.fake_lr == 1e-4 and r.train.fake_updates == 5
    assert r.train.betas == (0.0, 0.99)
    assert r.train.sigma.kind == "log-uniform"
    assert r.eval.teacher_samplers == [Component("euler"), Component("heun"), Component("dpmpp-2m")]
    assert r.eval.student_sampler == EvalConfig().student_sampler == Component("dpdm")


def test_overrides():
    path = str(RECIPES_DIR / "toy2d.yaml")
    r = load_recipe(path, ["train.lr=2e-5", "train.steps=3", "eval.teacher_nfe=[1,3]", "model.backbone.hidden=32",
                           "teacher.checkpoint=memory://x/teacher.safetensors"])
    assert r.train.lr == 2e-5 and type(r.train.lr) is float
    assert r.train.steps == 3
    assert r.eval.teacher_nfe == [1, 3]
    assert r.model.backbone == Component("mlp", {"hidden": 32, "depth": 3, "emb_dim": 128})
    assert r.teacher.checkpoint == "memory://x/teacher.safetensors"
    assert load_recipe(path).train.lr == 1e-4  # the file is not changed


def test_override_problems_are_config_errors():
    path = str(RECIPES_DIR / "toy2d.yaml")
    with pytest.raises(ConfigError) as info:
        load_recipe(path, ["train.lr=abc", "train.stepz=3"])
    assert info.value.problems == [
        "recipe.train.lr: expected float, got 'abc'",
        "recipe.train.stepz: unknown key. Did you mean 'steps'? Valid keys: divergence, sigma, steps, batch_size, "
        "lr, betas, fake_lr, fake_updates, order, student_dropout, ema_halflife_nimg, grad_clip, lr_warmup_nimg, fake_lora, student_lora, student.",
    ]
    assert str(info.value).splitlines()[0] == f"invalid recipe {path} (2 problems):"
    with pytest.raises(ConfigError) as info:
        load_recipe(path, ["train.lr"])
    assert info.value.problems == ["override 'train.lr': expected dotted.key=value, e.g. train.lr=2e-5"]


BAD = """\
name: bad
data: {name: gaussian-rnig, num_modes: 8}
model:
  backbone: {name: mlp, hiden: 32, depth: deep}
  precond: edm
train:
  lr: fast
  stepz: 3
  divergence: smoothed-kll
eval:
  teacher_samplers: [euler, heum]
  student_steps: [1, two]
"""


def _unknown(kind, name, did_you_mean, registered):
    return (f"unknown {kind} {name!r}. Did you mean {did_you_mean}? Registered {kind}s: {registered}. "
            "Run `dpdm plugins` to see every component and the package that provides it.")


def test_recipe_file_problems_reported_at_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    with pytest.raises(ConfigError) as info:
        load_recipe(str(path))
    assert info.value.problems == [
        "recipe.data.name: " + _unknown("dataset", "gaussian-rnig", "'gaussian-ring' or 'gaussian-grid' or 'gaussian'",
                                        "checkerboard, cifar10, digits, fashion-mnist, gaussian, gaussian-grid, gaussian-ring, "
                                        "image-folder, image-zip, mnist, npz, swiss-roll, two-moons"),
        "recipe.model.backbone.hiden: unknown option for backbone 'mlp'. Did you mean 'hidden'? "
        "Valid options: hidden, depth, emb_dim, dropout, activation.",
        "recipe.model.backbone.depth: expected int, got 'deep'",
        "recipe.train.lr: expected float, got 'fast'",
        "recipe.train.stepz: unknown key. Did you mean 'steps'? Valid keys: divergence, sigma, steps, batch_size, "
        "lr, betas, fake_lr, fake_updates, order, student_dropout, ema_halflife_nimg, grad_clip, lr_warmup_nimg, fake_lora, student_lora, student.",
        "recipe.train.divergence.name: " + _unknown("divergence", "smoothed-kll", "'smoothed-kl'", "ikl, smoothed-kl"),
        "recipe.eval.teacher_samplers[1].name: " + _unknown("sampler", "heum", "'heun'",
                                                            "dpdm, dpmpp-2m, euler, euler-stochastic, heun"),
        "recipe.eval.student_steps[1]: expected int, got 'two'",
    ]
    lines = str(info.value).splitlines()
    assert lines[0] == f"invalid recipe {path} (8 problems):"
    assert lines[1:] == [f"  - {p}" for p in info.value.problems]


def test_recipe_file_missing_keys_and_reserved_options(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  backbone: {name: mlp, shape: [2]}\nteacher: {train: {betas: [0.9]}}\n"
                    "train: {divergence: {name: smoothed-kl, sigma: 1}}\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(str(path))
    assert info.value.problems == [
        "recipe.model.backbone.shape: option 'shape' is set by dpdm, not by the recipe",
        "recipe.teacher.train.betas: expected tuple[float, float] (2 items), got [0.9]",
        "recipe.train.divergence.sigma: option 'sigma' is set by dpdm, not by the recipe",
        "recipe.name: required key missing",
        "recipe.data: required key missing",
    ]


def test_recipe_file_bad_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ntrain:\n  lr: [1e-4\n  steps: 3\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(str(path))
    (problem,) = info.value.problems
    assert problem == (f"recipe file {str(path)!r} is not valid YAML at line 4, column 8: "
                       "expected ',' or ']', but got ':' (while parsing a flow sequence)")
    assert str(info.value).splitlines()[0] == f"invalid recipe {path} (1 problem):"


def test_recipe_file_missing(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert info.value.problems == [f"recipe file {path!r} not found"]


# --- the paper recipes validate with --dry-run (issue #6) -----------------------------------------------------

def _edm_zip(path, n=3, size=64, classes=(0, 999, 5)):
    """A tiny EDM-format dataset zip (stored PNGs, dataset.json labels)."""
    import io
    import json
    import zipfile

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        names = []
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="png")
            names.append(f"{i:08d}"[:5] + f"/img{i:08d}.png")
            z.writestr(names[-1], buf.getvalue())
        z.writestr("dataset.json", json.dumps({"labels": [[name, classes[i % len(classes)]]
                                                          for i, name in enumerate(names)]}))
    return str(path)


def _idx_folder(folder, n=4):
    """MNIST's four IDX files (gz) with ``n`` random items each."""
    import gzip
    import struct

    import numpy as np

    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes()))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">II", 0x801, n) + labels.tobytes()))
    return str(folder)


def _dry_run(recipe: str, *sets: str, env=None):
    from typer.testing import CliRunner

    from dpdm.cli.main import app

    args = ["run", str(RECIPES_DIR / recipe), "--dry-run"] + [p for s in sets for p in ("--set", s)]
    return CliRunner().invoke(app, args, env={"COLUMNS": "1000", **(env or {})})


def test_imagenet64_recipe_dry_run_on_8_ranks(tmp_path):
    data = _edm_zip(tmp_path / "imagenet-64x64.zip")
    for world in ("1", "8"):
        result = _dry_run("imagenet64.yaml", f"data.path={data}", env={"WORLD_SIZE": world})
        assert result.exit_code == 0, result.output
        assert "batch_size: 96" in result.stdout and "num_workers: 4" in result.stdout
    bad = _dry_run("imagenet64.yaml", f"data.path={data}", env={"WORLD_SIZE": "7"})
    assert bad.exit_code == 1
    assert ("recipe.train.batch_size: the global batch 96 must split evenly over 7 rank(s) x engine.accum 1 "
            "micro-batches; pick a multiple of 7") in bad.stderr


def test_mnist_recipe_dry_run(tmp_path):
    result = _dry_run("mnist.yaml", f"data.path={_idx_folder(tmp_path / 'mnist')}")
    assert result.exit_code == 0, result.output
    r = load_recipe(str(RECIPES_DIR / "mnist.yaml"))
    assert r.model.backbone.name == "edm-songunet" and r.teacher.checkpoint is None
    assert r.data.options["pad_to_32"] is True and r.engine.precision == "bf16"
    missing = _dry_run("mnist.yaml", f"data.path={tmp_path / 'nowhere'}")
    assert missing.exit_code == 1 and "dpdm data download mnist" in missing.stderr


@pytest.mark.parametrize("name", ["cifar10.yaml", "cifar10-cond.yaml", "imagenet64.yaml"])
def test_paper_recipes_follow_appendix_b(name):
    r = load_recipe(str(RECIPES_DIR / name))
    assert r.train.lr == 1e-5 and r.train.fake_lr == 1e-5 and r.train.betas == (0.0, 0.99)
    assert (r.train.batch_size, r.train.steps) == ((96, 50000) if name == "imagenet64.yaml" else (128, 100000))
    assert r.train.divergence.name == "smoothed-kl" and r.eval.student_sampler.name == "dpdm"
    assert r.eval.student_schedule.name == "dpdm" and r.eval.student_steps == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert r.eval.teacher_nfe == [4, 5, 6, 7, 8, 9, 10, 12, 14, 15, 16, 18, 35]  # Table 4's grid
    assert r.engine.checkpoint.every > 0


@pytest.mark.parametrize("name", ["cifar10.yaml", "cifar10-cond.yaml", "imagenet64.yaml"])
def test_paper_recipes_resolve_to_the_papers_algorithm(name):
    """What a paper recipe resolves to, component by component, and what those components then do."""
    from dpdm.core.pipeline.run import build_divergence
    from dpdm.core.schedules import dpdm

    r = load_recipe(str(RECIPES_DIR / name))
    div = build_divergence(r, sigma_data=0.5)
    assert (div.weighting, div.normalize, div.renoise) == ("diffusion", False, "same")  # no DMD normaliser
    assert (r.train.fake_updates, r.train.order, r.train.student_dropout) == (1, "fake-first", False)
    assert r.eval.student_schedule.options.get("rho", 40.0) == 40.0
    steps = dpdm(8, **r.eval.student_schedule.options)
    assert [float(f"{s:.3g}") for s in steps[:4]] == [80.0, 22.1, 5.82, 1.47]  # Appendix B.1, ρ = 40
    if name == "imagenet64.yaml":
        # EDM's 50 Mimg half-life is never reached in 4.8 Mimg (ramp-up 0.05): the effective value is stated
        assert r.train.ema_halflife_nimg == pytest.approx(0.05 * r.train.steps * r.train.batch_size)
        assert r.model.backbone.options["use_fp16"] is True  # hence the GradScaler (precision.runs_fp16)


def test_library_and_schema_defaults_agree():
    """One algorithm for a Python user and a YAML user: TrainConfig's defaults are DistillJob's."""
    import inspect

    from dpdm.core.config.recipe import TrainConfig
    from dpdm.core.train.distill import DPDM, DistillJob

    cfg = TrainConfig()
    for cls in (DistillJob, DPDM):
        params = inspect.signature(cls.__init__).parameters
        for key in ("lr", "fake_updates", "order", "student_dropout", "fake_lr", "grad_clip"):
            assert params[key].default == getattr(cfg, key), (cls.__name__, key)
        assert tuple(params["betas"].default) == cfg.betas


def test_diff_instruct_recipe_is_diff_instructs_settings():
    """The baseline the paper compares with (Tables 2-3): IKL with Diff-Instruct's σ law, weighting and init sigma;
    the gradient identity itself is tests/test_divergences.py::test_ikl_gradient_equals_diff_instructs_update."""
    import torch

    from dpdm.core.divergences import IKL
    from dpdm.core.pipeline.run import build_divergence

    r = load_recipe(str(RECIPES_DIR / "diff-instruct.yaml"))
    div = build_divergence(r, sigma_data=0.5)
    assert isinstance(div, IKL) and (div.weighting, div.normalize, div.generator_sigma) == ("diffusion", False, 1.0)
    assert (r.train.sigma.kind, r.train.sigma.P_mean, r.train.sigma.P_std) == ("lognormal", -1.2, 1.2)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    # unclamped in practice: exactly exp(N·1.2 − 1.2)
    assert torch.equal(r.train.sigma.draw(10000, g1), (torch.randn(10000, generator=g2) * 1.2 - 1.2).exp())
    assert (r.train.order, r.train.student_dropout, r.train.betas) == ("fake-first", True, (0.0, 0.999))
    assert r.eval.student_steps == [1] and r.eval.student_schedule.options["sigma_max"] == 1.0
