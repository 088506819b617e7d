"""The strict config layer: YAML loading, overrides, structuring with exact messages, components."""

from __future__ import annotations

from typing import Any, Literal

import attrs
import fsspec
import pytest
import yaml

from dpdm.core import ConfigError, hookimpl, plugin_manager
from dpdm.core.plugins import registry
from dpdm.core.errors import UnknownComponentError
from dpdm.core.config.structure import (
    Component,
    apply_overrides,
    component,
    dump_yaml,
    load_yaml,
    load_yaml_text,
    parse_value,
    structure,
    unstructure,
)


def _positive(instance, attribute, value):
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value}")


@attrs.define
class Train:
    lr: float = attrs.field(default=1e-3, validator=_positive)
    steps: int = 10
    betas: tuple[float, float] = (0.9, 0.99)
    widths: tuple[int, ...] = ()
    milestones: list[int] = attrs.field(factory=list)
    clip: float | None = None
    amp: bool = False


@attrs.define
class Eval:
    metric: Literal["a", "b"] = "a"
    sizes: dict[str, int] = attrs.field(factory=dict)
    extra: Any = None


@attrs.define
class Recipe:
    data: str
    train: Train = attrs.field(factory=Train)
    eval: Eval = attrs.field(factory=Eval)
    seed: int = 0


def problems_of(cls, data) -> list[str]:
    with pytest.raises(ConfigError) as info:
        structure(cls, data, source="r.yaml")
    return info.value.problems


# --- YAML -----------------------------------------------------------------------------------


def test_yaml12_floats():
    data = load_yaml_text("a: 1e-4\nb: 2E+3\nc: .5\nd: -3e-5\ne: 1\nf: '1e-4'\ng: 1.5\nh: 1_000\n", "r.yaml")
    assert data == {"a": 1e-4, "b": 2000.0, "c": 0.5, "d": -3e-5, "e": 1, "f": "1e-4", "g": 1.5, "h": 1000}
    assert [type(data[k]) for k in "abcdefgh"] == [float, float, float, float, int, str, float, int]
    assert yaml.safe_load("a: 1e-4") == {"a": "1e-4"}  # the default loader is not changed


@pytest.mark.parametrize(
    "text, value",
    [("2e-5", 2e-05), ("abc", "abc"), ("[1,2]", [1, 2]), ("null", None), ("3", 3), ("true", True),
     ("{a: 1}", {"a": 1})],
)
def test_parse_value(text, value):
    assert parse_value(text) == value
    assert type(parse_value(text)) is type(value)


def test_dump_quotes_strings_that_read_as_floats():
    text = dump_yaml({"s": "1e-4", "f": 1e-4, "t": (1, 2)})
    assert load_yaml_text(text, "x") == {"s": "1e-4", "f": 1e-4, "t": [1, 2]}


def test_load_yaml_missing_file(tmp_path):
    path = str(tmp_path / "x.yaml")
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    assert info.value.problems == [f"recipe file {path!r} not found"]


def test_load_yaml_malformed(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("a: 1\nb: c: d\n")
    with pytest.raises(ConfigError) as info:
        load_yaml(str(path))
    (problem,) = info.value.problems
    assert problem == (
        f"recipe file {str(path)!r} is not valid YAML at line 2, column 5: mapping values are not allowed here"
    )
    assert "bad.yaml" in str(info.value) and "line" in str(info.value)


def test_load_yaml_rejects_duplicate_keys():
    with pytest.raises(ConfigError) as info:
        load_yaml_text("train:\n  lr: 1\n  lr: 2\n", "r.yaml")
    assert info.value.problems == [
        "recipe file 'r.yaml' is not valid YAML at line 3, column 3: "
        "found duplicate key 'lr' (while constructing a mapping)"
    ]


@pytest.mark.parametrize("text, got", [("- 1\n", "a list: [1]"), ("", "an empty document"), ("3", "a int: 3")])
def test_load_yaml_top_level_must_be_a_mapping(text, got):
    with pytest.raises(ConfigError) as info:
        load_yaml_text(text, "r.yaml")
    assert info.value.problems == [f"recipe file 'r.yaml' must hold a mapping of keys to values, got {got}"]


def test_load_yaml_unreadable(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_yaml(str(tmp_path))  # a directory
    (problem,) = info.value.problems
    assert problem.startswith(f"cannot read recipe file {str(tmp_path)!r}: ")
    with pytest.raises(ConfigError) as info:
        load_yaml("nosuchproto://bucket/r.yaml")
    (problem,) = info.value.problems
    prefix = "cannot read recipe file 'nosuchproto://bucket/r.yaml': "
    assert problem.startswith(prefix) and "nosuchproto" in problem[len(prefix):]


def test_load_yaml_memory_url():
    fs = fsspec.filesystem("memory")
    fs.pipe("/test-structure/r.yaml", b"data: x\ntrain: {lr: 1e-4}\n")
    try:
        assert load_yaml("memory://test-structure/r.yaml") == {"data": "x", "train": {"lr": 1e-4}}
        with pytest.raises(ConfigError, match="recipe file 'memory://test-structure/missing.yaml' not found"):
            load_yaml("memory://test-structure/missing.yaml")
    finally:
        fs.rm("/test-structure", recursive=True)


# --- overrides ------------------------------------------------------------------------------


def test_apply_overrides_sets_nested_and_creates_new():
    data = {"train": {"lr": 1e-4, "steps": 3}, "model": {"backbone": "mlp"}}
    out = apply_overrides(data, ["train.lr=2e-5", "model.backbone={name: mlp, hidden: 64}", "eval.metric.name=energy",
                                 "seed=7", "train.steps = 5"])
    assert out == {
        "train": {"lr": 2e-5, "steps": 5},
        "model": {"backbone": {"name": "mlp", "hidden": 64}},
        "eval": {"metric": {"name": "energy"}},
        "seed": 7,
    }
    assert data == {"train": {"lr": 1e-4, "steps": 3}, "model": {"backbone": "mlp"}}  # a copy was changed
    assert apply_overrides({"model": {"backbone": {"name": "mlp"}}}, ["model.backbone.hidden=64"]) == {
        "model": {"backbone": {"name": "mlp", "hidden": 64}}
    }
    assert apply_overrides({"eval": None}, ["eval.metric=a"]) == {"eval": {"metric": "a"}}


def test_apply_overrides_reports_every_problem():
    with pytest.raises(ConfigError) as info:
        apply_overrides({"train": {"lr": 1e-4}}, ["train.lr.x=1", "noequals", "=3", "a..b=1", "x=[1", "ok=1"])
    assert info.value.problems == [
        "override 'train.lr.x=1': train.lr is 0.0001, not a mapping",
        "override 'noequals': expected dotted.key=value, e.g. train.lr=2e-5",
        "override '=3': empty key before '='",
        "override 'a..b=1': empty part in key 'a..b'",
        "override 'x=[1': value '[1' is not valid YAML at line 1, column 3: "
        "expected ',' or ']', but got '<stream end>' (while parsing a flow sequence)",
    ]


# --- structure ------------------------------------------------------------------------------


def test_structure_converts_and_fills_defaults():
    data = load_yaml_text(
        "data: x\ntrain: {lr: 1, betas: [0, 1], widths: [4, 8, 16], milestones: [1, 2], clip: 1e-1}\n"
        "eval: {metric: b, sizes: {x: 1}, extra: [any, thing]}\n",
        "r.yaml",
    )
    r = structure(Recipe, data)
    assert r == Recipe(
        data="x",
        train=Train(lr=1.0, betas=(0.0, 1.0), widths=(4, 8, 16), milestones=[1, 2], clip=0.1),
        eval=Eval(metric="b", sizes={"x": 1}, extra=["any", "thing"]),
    )
    assert type(r.train.lr) is float and type(r.train.betas[0]) is float
    assert structure(Recipe, {"data": "x"}) == Recipe(data="x")


@pytest.mark.parametrize(
    "data, problem",
    [
        ({"train": {"lr": "abc"}}, "recipe.train.lr: expected float, got 'abc'"),
        ({"train": {"lr": True}}, "recipe.train.lr: expected float, got True"),
        ({"train": {"steps": True}}, "recipe.train.steps: expected int, got True"),
        ({"train": {"steps": 2.5}}, "recipe.train.steps: expected int, got 2.5"),
        ({"train": {"amp": 1}}, "recipe.train.amp: expected bool, got 1"),
        ({"train": {"clip": "x"}}, "recipe.train.clip: expected float or null, got 'x'"),
        ({"train": {"milestones": 3}}, "recipe.train.milestones: expected list[int], got 3"),
        ({"train": {"milestones": [1, "two"]}}, "recipe.train.milestones[1]: expected int, got 'two'"),
        ({"train": {"betas": [1, 2, 3]}}, "recipe.train.betas: expected tuple[float, float] (2 items), got [1, 2, 3]"),
        ({"train": {"widths": "4"}}, "recipe.train.widths: expected tuple[int, ...], got '4'"),
        ({"train": {"lrr": 1}}, "recipe.train.lrr: unknown key. Did you mean 'lr'? "
                                "Valid keys: lr, steps, betas, widths, milestones, clip, amp."),
        ({"train": {"zzz": 1}}, "recipe.train.zzz: unknown key. "
                                "Valid keys: lr, steps, betas, widths, milestones, clip, amp."),
        ({"train": 3}, "recipe.train: expected a mapping, got 3"),
        ({"eval": {"metric": "c"}}, "recipe.eval.metric: expected one of 'a', 'b', got 'c'"),
        ({"eval": {"sizes": {"x": "big"}}}, "recipe.eval.sizes.x: expected int, got 'big'"),
        ({"eval": {"sizes": [1]}}, "recipe.eval.sizes: expected a mapping, got [1]"),
        ({"train": {"lr": -1}}, "recipe.train: lr must be positive, got -1.0"),
    ],
)
def test_structure_messages(data, problem):
    assert problems_of(Recipe, {"data": "x", **data}) == [problem]


def test_required_key_missing():
    assert problems_of(Recipe, {}) == ["recipe.data: required key missing"]
    assert problems_of(Recipe, [1]) == ["recipe: expected a mapping, got [1]"]


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as info:
        structure(Recipe, {"train": {"lr": "abc", "stpes": 3}}, source="r.yaml")
    assert info.value.problems == [
        "recipe.train.lr: expected float, got 'abc'",
        "recipe.train.stpes: unknown key. Did you mean 'steps'? Valid keys: lr, steps, betas, widths, milestones, "
        "clip, amp.",
        "recipe.data: required key missing",
    ]
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid recipe r.yaml (3 problems):"
    assert lines[1:] == [f"  - {p}" for p in info.value.problems]


def test_round_trip():
    r = Recipe(
        data="x",
        train=Train(lr=2e-5, betas=(0.0, 0.99), widths=(1, 2), milestones=[3], clip=None, amp=True),
        eval=Eval(metric="b", sizes={"k": 2}, extra={"nested": [1, "1e-4"]}),
        seed=3,
    )
    plain = unstructure(r)
    assert plain["train"]["betas"] == [0.0, 0.99]
    assert structure(Recipe, plain) == r
    assert structure(Recipe, load_yaml_text(dump_yaml(r), "dumped")) == r
    assert "- '1e-4'" in dump_yaml(r)  # quoted, so it reads back as a string
    assert list(plain) == ["data", "train", "eval", "seed"]


# --- components ---------------------------------------------------------------------------


class ScalePrecond:
    def __init__(self, backbone, scale: float = 1.0, mode: str | None = None):
        self.backbone, self.scale, self.mode = backbone, scale, mode


class StructurePlugin:
    @hookimpl
    def register_backbones(register):
        def make(shape, label_dim=0, hidden: int = 64, depth: int = 2, act="relu"):
            raise AssertionError("structuring must not build components")

        register("test-net", make)

    @hookimpl
    def register_preconditionings(register):
        def needs(backbone, foo, bar=None):
            raise AssertionError("structuring must not build components")

        register("test-pre", ScalePrecond)
        register("test-needs", needs)

    @hookimpl
    def register_divergences(register):
        def open_ended(sigma, weighting: str = "x", **options):
            raise AssertionError("structuring must not build components")

        register("test-open", open_ended)


@attrs.define
class Model:
    backbone: Component = component("backbone")
    precond: Component = component("preconditioning", default={"name": "test-pre", "scale": 2.0})
    divergence: Component | None = component("divergence", default=None)
    extras: list[Component] = attrs.field(factory=list, metadata={"kind": "backbone"})


@pytest.fixture
def plugin():
    pm = plugin_manager()
    pm.register(StructurePlugin, name="test-structure-plugin")
    try:
        yield
    finally:
        pm.unregister(name="test-structure-plugin")


def test_components_inline_and_bare(plugin):
    m = structure(Model, load_yaml_text(
        "backbone: {name: test-net, hidden: 128, depth: 3}\nprecond: test-pre\n"
        "divergence: {name: test-open, anything: 1}\nextras: [test-net, {name: test-net, depth: 1}]\n",
        "m.yaml",
    ))
    assert m == Model(
        backbone=Component("test-net", {"hidden": 128, "depth": 3}),
        precond=Component("test-pre"),
        divergence=Component("test-open", {"anything": 1}),
        extras=[Component("test-net"), Component("test-net", {"depth": 1})],
    )
    assert unstructure(m)["backbone"] == {"name": "test-net", "hidden": 128, "depth": 3}
    assert structure(Model, unstructure(m)) == m
    assert structure(Model, load_yaml_text(dump_yaml(m), "dumped")) == m


def test_component_defaults(plugin):
    a, b = structure(Model, {"backbone": "test-net"}), structure(Model, {"backbone": "test-net"})
    assert a.precond == Component("test-pre", {"scale": 2.0}) and a.divergence is None
    a.precond.options["scale"] = 3.0
    assert b.precond.options == {"scale": 2.0}  # each instance gets its own default
    assert problems_of(Model, {}) == ["recipe.backbone: required key missing"]


def test_unknown_component_name(plugin):
    expected = str(UnknownComponentError("backbone", "tset-net", registry.names("backbone")))
    assert "Did you mean 'test-net'" in expected  # the closest match comes first
    assert problems_of(Model, {"backbone": {"name": "tset-net", "hidden": 1}}) == [f"recipe.backbone.name: {expected}"]


def test_component_option_problems(plugin):
    data = {
        "backbone": {"name": "test-net", "hidenn": 3, "shape": [2], "depth": "deep", "act": 1},
        "precond": {"name": "test-pre", "scale": 1, "mode": None, "backbone": "x"},
        "divergence": {"name": "test-open", "weighting": 2, "sigma": 1},
        "extras": [{"name": "test-net", "label_dim": 3}, {"hidden": 1}, 5],
    }
    assert problems_of(Model, data) == [
        "recipe.backbone.hidenn: unknown option for backbone 'test-net'. Did you mean 'hidden'? "
        "Valid options: hidden, depth, act.",
        "recipe.backbone.shape: option 'shape' is set by dpdm, not by the recipe",
        "recipe.backbone.depth: expected int, got 'deep'",
        "recipe.backbone.act: expected str, got 1",
        "recipe.precond.backbone: option 'backbone' is set by dpdm, not by the recipe",
        "recipe.divergence.weighting: expected str, got 2",
        "recipe.divergence.sigma: option 'sigma' is set by dpdm, not by the recipe",
        "recipe.extras[0].label_dim: option 'label_dim' is set by dpdm, not by the recipe",
        "recipe.extras[1].name: required key missing",
        "recipe.extras[2]: expected a backbone name or a mapping with 'name', got 5",
    ]


def test_component_missing_required_option(plugin):
    assert problems_of(Model, {"backbone": "test-net", "precond": {"name": "test-needs", "bar": 1}}) == [
        "recipe.precond: preconditioning 'test-needs' needs option 'foo'"
    ]
    m = structure(Model, {"backbone": "test-net", "precond": {"name": "test-needs", "foo": "anything"}})
    assert m.precond == Component("test-needs", {"foo": "anything"})


def test_component_reserved_from_field_metadata(plugin):
    @attrs.define
    class Custom:
        net: Component = component("backbone", reserved=("shape", "label_dim", "hidden"))

    assert problems_of(Custom, {"net": {"name": "test-net", "hidden": 3}}) == [
        "recipe.net.hidden: option 'hidden' is set by dpdm, not by the recipe"
    ]
    with pytest.raises(ValueError, match="unknown component kind 'backbon'"):
        component("backbon")
