"""Bounds on recipe values: declared next to their fields, checked by the converter together with the type errors,
reported by ``dpdm run --dry-run`` in one error with what building the components finds; negative widths fail in
the backbones with the option's name."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import torch
from dpdm.cli.main import app
from dpdm.core.config.bounds import bound_problems
from dpdm.core.config.components import Component
from dpdm.core.config.recipe import EngineConfig, ModelConfig, Recipe, TrainConfig, load_recipe, read_recipe
from dpdm.core.config.structure import structure, unstructure
from dpdm.core.errors import ConfigError
from typer.testing import CliRunner

torch.set_num_threads(1)

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
TOY2D = str(RECIPES / "toy2d.yaml")
DIGITS = str(RECIPES / "digits.yaml")
DEVICE = "recipe.device: must be 'auto' or a torch device such as 'cpu', 'cuda', 'cuda:N' or 'mps', got 'gpu0'"


def dry_run_error(recipe: str, *overrides: str) -> str:
    """The stderr of ``dpdm run RECIPE --dry-run --set ...`` that failed cleanly: exit 1, no traceback."""
    args = ["run", recipe, "--dry-run", *[part for o in overrides for part in ("--set", o)]]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "1000"})
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # not a crash
    assert "Traceback" not in result.output and result.stdout == ""
    return result.stderr


@pytest.mark.parametrize("override, problem", [
    ("train.betas=[1.5, 0.99]", "recipe.train.betas: every entry must be in [0, 1), got [1.5, 0.99]"),
    ("teacher.train.betas=[0.9, 1.0]", "recipe.teacher.train.betas: every entry must be in [0, 1), got [0.9, 1.0]"),
    ("train.lr=-1e-4", "recipe.train.lr: must be positive, got -0.0001"),
    ("teacher.train.lr=0", "recipe.teacher.train.lr: must be positive, got 0.0"),
    ("train.fake_lr=-1", "recipe.train.fake_lr: must be positive, got -1.0"),
    ("device=gpu0", DEVICE),
    ("model.backbone.hidden=-5", "recipe.model: hidden must be at least 1, got -5"),
])
def test_dry_run_rejects_a_bad_value_with_one_message_naming_its_key(tmp_path, monkeypatch, override, problem):
    monkeypatch.chdir(tmp_path)
    assert dry_run_error(TOY2D, override) == f"error: invalid recipe {TOY2D} (1 problem):\n  - {problem}\n"


def test_dry_run_rejects_a_negative_unet_width(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = dry_run_error(DIGITS, "model.backbone={name: unet-small, channels: -8}")
    assert err == f"error: invalid recipe {DIGITS} (1 problem):\n  - recipe.model: channels must be at least 1, got -8\n"


def test_dry_run_reports_bounds_type_errors_and_builds_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with_type_error = dry_run_error(TOY2D, "train.lr=-1", "train.steps=x", "engine.accum=0", "eval.teacher_nfe=[0, 1]")
    assert with_type_error.splitlines() == [  # the types are wrong: the recipe is not built, nothing else is run
        f"error: invalid recipe {TOY2D} (4 problems):",
        "  - recipe.train.steps: expected int, got 'x'",
        "  - recipe.train.lr: must be positive, got -1.0",
        "  - recipe.eval.teacher_nfe: every entry must be at least 1, got [0, 1]",
        "  - recipe.engine.accum: must be at least 1, got 0",
    ]
    with_builds = dry_run_error(TOY2D, "train.lr=-1", "train.grad_clip=0", "model.backbone.activation=foo")
    assert with_builds.splitlines() == [  # the types are right: the components are built and judged too
        f"error: invalid recipe {TOY2D} (3 problems):",
        "  - recipe.train.lr: must be positive, got -1.0",
        "  - recipe.train.grad_clip: must be positive, got 0.0",
        "  - recipe.model: unknown activation 'foo'; choose one of ['gelu', 'relu', 'silu', 'tanh']",
    ]


def test_load_recipe_reports_every_bound_with_the_type_errors():
    with pytest.raises(ConfigError) as info:
        load_recipe(TOY2D, ["device=gpu0", "train.betas=[1.5, 0.99]", "train.order=random", "train.steps=-1",
                            "teacher.train.ema_halflife_nimg=0", "train.lr_warmup_nimg=-1", "eval.num_samples=1",
                            "eval.one_step_sigma_max=[80.0, 0]", "baselines={di: {steps: [], sigma_max: 0}}",
                            "engine.checkpoint.keep_last=0"])
    assert info.value.problems == [  # in the order of the keys in the file, overrides of new keys last
        DEVICE,
        "recipe.teacher.train.ema_halflife_nimg: must be positive, got 0.0",
        "recipe.train.steps: must be at least 0, got -1",
        "recipe.train.betas: every entry must be in [0, 1), got [1.5, 0.99]",
        "recipe.train.order: expected one of 'fake-first', 'student-first', got 'random'",
        "recipe.train.lr_warmup_nimg: must be at least 0, got -1.0",
        "recipe.eval.num_samples: must be at least 2, got 1",
        "recipe.eval.one_step_sigma_max: every entry must be positive, got [80.0, 0.0]",
        "recipe.baselines.di.steps: a non-empty list of step counts of at least 1, got []",
        "recipe.baselines.di.sigma_max: must be positive, got 0.0",
        "recipe.engine.checkpoint.keep_last: must be at least 1, got 0",
    ]


def test_read_recipe_returns_a_recipe_whose_only_problems_are_bounds():
    recipe, problems = read_recipe(TOY2D, ["train.lr=-1", "eval.batch_size=0"])
    assert recipe.train.lr == -1.0 and recipe.eval.batch_size == 0
    assert problems == ["recipe.train.lr: must be positive, got -1.0", "recipe.eval.batch_size: must be at least 1, got 0"]
    assert read_recipe(TOY2D) == (load_recipe(TOY2D), [])
    with pytest.raises(ConfigError) as info:  # a type error: nothing is returned, the bounds are reported with it
        read_recipe(TOY2D, ["train.lr=-1", "seed=x"])
    assert info.value.problems == ["recipe.seed: expected int, got 'x'", "recipe.train.lr: must be positive, got -1.0"]


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_device_strings_torch_reads_are_valid_without_the_device(device):
    assert load_recipe(TOY2D, [f"device={device}"]).device == device  # whether CUDA is there: when the run starts


@pytest.mark.parametrize("override", ["train.fake_lr=null", "train.grad_clip=null", "train.ema_halflife_nimg=null",
                                      "teacher.train.grad_clip=null", "train.betas=[0, 0.999]", "train.steps=0",
                                      "engine.checkpoint.every=0", "eval.noise_seeds=1", "train.lr_warmup_nimg=0"])
def test_values_at_their_bounds_and_nulls_are_valid(override):
    load_recipe(TOY2D, [override])


def test_bound_problems_of_a_recipe_built_in_code_match_the_structured_ones():
    recipe = Recipe(name="x", data=Component("gaussian-ring"), model=ModelConfig(Component("mlp")),
                    train=TrainConfig(lr=-1.0, betas=(1.5, 0.99)), engine=EngineConfig(accum=0))
    expected = ["recipe.train.lr: must be positive, got -1.0",
                "recipe.train.betas: every entry must be in [0, 1), got [1.5, 0.99]",
                "recipe.engine.accum: must be at least 1, got 0"]
    assert bound_problems(recipe) == expected
    with pytest.raises(ConfigError) as info:
        structure(Recipe, unstructure(recipe))
    assert info.value.problems == expected
    assert bound_problems(attrs.evolve(recipe, train=TrainConfig(), engine=EngineConfig())) == []


def test_the_schema_defaults_are_within_their_bounds():
    assert bound_problems(Recipe(name="x", data=Component("gaussian-ring"), model=ModelConfig(Component("mlp")))) == []
    for path in sorted(RECIPES.glob("*.yaml")):
        assert bound_problems(load_recipe(str(path))) == [], path


def test_component_options_are_checked_against_any_plain_annotation():
    """A factory's ``tuple | list`` or ``list`` option is judged too, not only int/float/str/bool ones."""
    with pytest.raises(ConfigError) as info:
        load_recipe(DIGITS, ["model.backbone={name: unet-small, channel_mult: 3}"])
    assert info.value.problems == ["recipe.model.backbone.channel_mult: expected tuple or list, got 3"]
    with pytest.raises(ConfigError) as info:
        load_recipe(DIGITS, ["model.backbone={name: edm-songunet, attn_resolutions: 8, channel_mult: [1, x]}"])
    assert info.value.problems == ["recipe.model.backbone.attn_resolutions: expected list, got 8"]  # a bare list
