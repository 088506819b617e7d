"""The strict config layer: YAML in, attrs objects out, every problem reported at once.

::

    data = apply_overrides(load_yaml("recipe.yaml"), ["train.lr=2e-5"])
    recipe = structure(Recipe, data, source="recipe.yaml")  # ConfigError listing all problems
    text = dump_yaml(recipe)  # structure(Recipe, load_yaml_text(text, "x")) == recipe

YAML is read through fsspec (local paths and any URL fsspec understands) with a safe loader
that also reads YAML-1.2 floats such as ``1e-4``. Recipes name plugin components inline
(``backbone: {name: mlp, hidden: 128}`` or ``backbone: mlp``); :func:`structure` checks the
name against the registry and the options against the registered factory's signature.
"""

from __future__ import annotations

import copy
import inspect
import os
import re
import types
import typing
from typing import Any, Literal, Union

import attrs
import fsspec
import yaml

from ..plugins import registry
from ..errors import ConfigError, UnknownComponentError, did_you_mean

__all__ = [
    "Component", "Dumper", "Loader", "RESERVED_OPTIONS", "apply_overrides", "component", "dump_yaml",
    "load_yaml", "load_yaml_text", "parse_value", "structure", "unstructure",
]

NoneType = type(None)

# ---------------------------------------------------------------------------------------------
# YAML
# ---------------------------------------------------------------------------------------------

_FLOAT_TAG = "tag:yaml.org,2002:float"
# PyYAML's YAML-1.1 float pattern, plus exponents without a dot or a sign (1e-4, 2E3) and .5 forms.
_FLOAT = re.compile(
    r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


def _yaml12_floats(cls):
    """Make a PyYAML loader or dumper class resolve ``1e-4``-style plain scalars as floats."""
    cls.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != _FLOAT_TAG]
        for first, resolvers in cls.yaml_implicit_resolvers.items()
    }
    cls.add_implicit_resolver(_FLOAT_TAG, _FLOAT, list("-+0123456789."))
    return cls


@_yaml12_floats
class Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads YAML-1.2 floats (``1e-4``, ``.5``) and rejects duplicate keys."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key!r}", key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


@_yaml12_floats
class Dumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that quotes strings :class:`Loader` would read as floats, and writes no aliases."""

    def ignore_aliases(self, data):
        return True


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """`` at line L, column C: problem (context)`` from a PyYAML error, on one line."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if not problem:
        return ": " + " ".join(str(exc).split())
    context = getattr(exc, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {problem}" + (f" ({context})" if context else "")


def load_yaml_text(text: str, source: str) -> dict:
    """Parse recipe text into a dict; ``source`` names it in error messages (a path or URL)."""
    try:
        data = yaml.load(text, Loader=Loader)
    except yaml.YAMLError as exc:
        raise ConfigError([f"recipe file {source!r} is not valid YAML{_yaml_problem(exc)}"], source) from None
    if not isinstance(data, dict):
        got = "an empty document" if data is None else f"a {type(data).__name__}: {_short(data)}"
        raise ConfigError([f"recipe file {source!r} must hold a mapping of keys to values, got {got}"], source)
    return data


def load_yaml(path_or_url: str) -> dict:
    """Read a recipe from a local path or any fsspec URL (``memory://``, ``s3://``, ...) into a dict."""
    url = os.fspath(path_or_url)
    try:
        with fsspec.open(url, "r", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError([f"recipe file {url!r} not found"], url) from None
    except Exception as exc:  # any storage backend failure: permissions, network, a missing fsspec driver
        reason = str(exc) or type(exc).__name__
        raise ConfigError([f"cannot read recipe file {url!r}: {reason}"], url) from None
    return load_yaml_text(text, url)


def parse_value(text: str) -> Any:
    """A command-line value read as YAML: ``"2e-5"`` -> 2e-05, ``"[1,2]"`` -> [1, 2], ``"null"`` -> None."""
    try:
        return yaml.load(text, Loader=Loader)
    except yaml.YAMLError as exc:
        raise ConfigError([f"value {text!r} is not valid YAML{_yaml_problem(exc)}"]) from None


def dump_yaml(obj: Any) -> str:
    """YAML text for an attrs object or plain data, keys in declaration order."""
    return yaml.dump(unstructure(obj), Dumper=Dumper, sort_keys=False, default_flow_style=False)


# ---------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------


def apply_overrides(data: dict, overrides: list[str], *, source: str | None = None) -> dict:
    """A deep copy of ``data`` with each ``dotted.key=value`` override set, e.g. ``train.lr=2e-5``.

    Values are read as YAML (:func:`parse_value`); missing intermediate mappings are created.
    """
    result = copy.deepcopy(data)
    problems = []
    for override in overrides:
        problem = _apply_override(result, override)
        if problem:
            problems.append(f"override {override!r}: {problem}")
    if problems:
        raise ConfigError(problems, source)
    return result


def _apply_override(data: dict, override: str) -> str | None:
    """Set one override in place; the problem with it, or None."""
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep:
        return "expected dotted.key=value, e.g. train.lr=2e-5"
    if not key:
        return "empty key before '='"
    parts = key.split(".")
    if not all(parts):
        return f"empty part in key {key!r}"
    try:
        value = parse_value(raw)
    except ConfigError as exc:
        return exc.problems[0]
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            return f"{'.'.join(parts[:depth + 1])} is {_short(child)}, not a mapping"
        node = child
    node[parts[-1]] = value
    return None


# ---------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------

# Factory parameters that dpdm passes itself, per kind (see dpdm.core.hookspecs); a recipe may not set them.
RESERVED_OPTIONS: dict[str, tuple[str, ...]] = {
    "backbone": ("shape", "label_dim"),
    "preconditioning": ("backbone",),
    "schedule": ("n", "device"),
    "sampler": ("denoiser", "x", "sigmas", "generator", "callback", "class_labels"),
    "divergence": ("sigma",),
    "dataset": ("split",),
    "metric": ("progress",),
}


@attrs.define
class Component:
    """A registered component named in a recipe: its registry ``name`` and the ``options`` for its factory.

    Written inline in YAML: ``backbone: {name: mlp, hidden: 128}``, or ``backbone: mlp`` without options.
    """

    name: str
    options: dict[str, Any] = attrs.field(factory=dict)


def _to_component(value: Any) -> Component:
    if isinstance(value, Component):
        return copy.deepcopy(value)
    if isinstance(value, str):
        return Component(value)
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return Component(value["name"], {k: v for k, v in value.items() if k != "name"})
    raise TypeError(f"a component default must be a name, a mapping with 'name' or a Component, got {value!r}")


def component(kind: str, default: Any = attrs.NOTHING, *, reserved: tuple[str, ...] | None = None):
    """An attrs field holding a :class:`Component` of registry ``kind``.

    Without ``default`` the key is required; ``default`` may be None, a name (``"heun"``), a mapping
    (``{"name": "edm", "sigma_data": 0.5}``) or a Component. ``reserved`` names the factory
    parameters dpdm passes itself (default: ``RESERVED_OPTIONS[kind]``).
    """
    if kind not in registry.KINDS:
        raise ValueError(f"unknown component kind {kind!r}; kinds: {', '.join(registry.KINDS)}")
    metadata = {"kind": kind}
    if reserved is not None:
        metadata["reserved"] = tuple(reserved)
    if default is attrs.NOTHING or default is None:
        return attrs.field(default=default, metadata=metadata)
    template = _to_component(default)
    return attrs.field(factory=lambda: copy.deepcopy(template), metadata=metadata)


def _parameters(obj: Any) -> list[inspect.Parameter] | None:
    """The parameters a component factory takes (a class's ``__init__`` without ``self``), or None."""
    target = obj.__init__ if isinstance(obj, type) else obj
    try:
        try:
            sig = inspect.signature(target, eval_str=True)
        except Exception:  # an annotation that cannot be evaluated: keep annotations as strings
            sig = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())
    return params[1:] if isinstance(obj, type) else params


_SIMPLE = {"int": int, "float": float, "str": str, "bool": bool, "None": NoneType}


def _simple_types(annotation: Any) -> tuple[type, ...] | None:
    """``(float, NoneType)`` for ``float | None`` (also as a string); None for other annotations."""
    if isinstance(annotation, str):
        text = annotation.replace(" ", "")
        if text.startswith("Optional[") and text.endswith("]"):
            text = text[len("Optional["):-1] + "|None"
        found = tuple(_SIMPLE.get(part) for part in text.split("|"))
        return found if all(found) else None
    if annotation in _SIMPLE.values():
        return (annotation,)
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = typing.get_args(annotation)
        return args if all(a in _SIMPLE.values() for a in args) else None
    return None


def _option_types(param: inspect.Parameter) -> tuple[type, ...] | None:
    """The simple types a factory parameter accepts, from its annotation or its default; None: unchecked."""
    if param.annotation is not param.empty:
        found = _simple_types(param.annotation)
    elif type(param.default) in (int, float, str, bool):
        found = (type(param.default),)
    else:
        found = None
    if found and param.default is None and NoneType not in found:
        found += (NoneType,)
    return found


def _check_component(kind: str, name: str, options: dict, path: str, problems: list[str], reserved) -> None:
    """Check ``name`` against the registry and ``options`` against the registered factory's signature."""
    try:
        obj = registry.entry(kind, name).obj  # a family member (fd-<dataset>) comes with its option bound
    except UnknownComponentError as exc:
        problems.append(f"{path}.name: {exc}")
        return
    params = _parameters(obj)
    if params is None:  # no signature to check against
        return
    named = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params)
    valid = [n for n in named if n not in reserved]
    for key, value in options.items():
        where = f"{path}.{key}"
        if key in reserved:
            problems.append(f"{where}: option {key!r} is set by dpdm, not by the recipe")
        elif key in named:
            accepted = _option_types(named[key])
            if accepted and not any(_accepts(t, value) for t in accepted):
                problems.append(f"{where}: expected {_type_name(Union[accepted])}, got {_short(value)}")
        elif not open_ended:
            listed = ", ".join(valid) if valid else "(none)"
            problems.append(
                f"{where}: unknown option for {kind} {name!r}.{did_you_mean(key, valid)} Valid options: {listed}."
            )
    for pname, param in named.items():
        if param.default is param.empty and pname not in reserved and pname not in options:
            problems.append(f"{path}: {kind} {name!r} needs option {pname!r}")


# ---------------------------------------------------------------------------------------------
# Structuring
# ---------------------------------------------------------------------------------------------

_BAD = object()  # a value that could not be structured; its problems are already recorded


def structure(cls: Any, data: Any, *, path: str = "recipe", source: str | None = None) -> Any:
    """Build ``cls`` (usually an attrs class) from plain data, strictly.

    Every problem (wrong type, unknown or missing key, unknown component or option) is collected,
    each starting with its dotted path, and raised together as one ``ConfigError(problems, source)``.
    """
    problems: list[str] = []
    result = _convert(cls, data, path, problems, {})
    if problems:
        raise ConfigError(problems, source)
    return result


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(tp: Any) -> str:
    """How an annotation reads in messages: ``float or null``, ``list[int]``, ``one of 'a', 'b'``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is NoneType:
        return "null"
    if tp is Any:
        return "any value"
    if origin in (Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not NoneType]
        return " or ".join(names + (["null"] if NoneType in args else []))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"tuple[{_type_name(args[0])}, ...]"
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def _accepts(tp: type, value: Any) -> bool:
    """Whether a scalar ``value`` is a ``tp``: bool is not a number, an int is a float."""
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is NoneType:
        return value is None
    return isinstance(value, tp)


def _mismatch(problems: list[str], path: str, expected: str, value: Any, optional: bool) -> object:
    problems.append(f"{path}: expected {expected}{' or null' if optional else ''}, got {_short(value)}")
    return _BAD


def _convert(tp: Any, value: Any, path: str, problems: list[str], meta, optional: bool = False) -> Any:
    """``value`` as annotation ``tp``, or ``_BAD`` after recording problems.

    ``meta`` is the metadata of the attrs field being filled (it carries a component's kind);
    ``optional`` adds "or null" to a type-mismatch message.
    """
    if tp is Any or tp is object:
        return value
    if tp is Component:
        return _component(value, path, problems, meta, optional)
    if isinstance(tp, type) and attrs.has(tp):
        return _attrs_instance(tp, value, path, problems, optional)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return _union(args, value, path, problems, meta, optional)
    if origin is Literal:
        for choice in args:
            if type(value) is type(choice) and value == choice:
                return choice
        return _mismatch(problems, path, _type_name(tp), value, optional)
    if tp in (list, tuple) or origin in (list, tuple):
        return _sequence(tp, origin or tp, args, value, path, problems, meta, optional)
    if tp is dict or origin is dict:
        return _mapping(args or (Any, Any), value, path, problems, meta, optional)
    if tp in (int, float, str, bool, NoneType):
        if not _accepts(tp, value):
            return _mismatch(problems, path, _type_name(tp), value, optional)
        return float(value) if tp is float else value
    raise TypeError(f"structure() does not support the annotation {tp!r} (at {path})")


def _union(args, value, path, problems, meta, optional):
    members = [a for a in args if a is not NoneType]
    nullable = len(members) < len(args)
    if value is None and nullable:
        return None
    if len(members) == 1:  # X | None: X's own messages, with "or null"
        return _convert(members[0], value, path, problems, meta, optional or nullable)
    for member in members:  # first member that takes the value wins
        scratch: list[str] = []
        result = _convert(member, value, path, scratch, meta)
        if not scratch:
            return result
    return _mismatch(problems, path, _type_name(Union[args]), value, optional)


def _sequence(tp, origin, args, value, path, problems, meta, optional):
    if not isinstance(value, (list, tuple)):
        return _mismatch(problems, path, _type_name(tp), value, optional)
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            problems.append(f"{path}: expected {_type_name(tp)} ({len(args)} items), got {_short(value)}")
            return _BAD
        item_types = args
    else:
        item_types = [args[0] if args else Any] * len(value)
    before = len(problems)
    items = [_convert(t, v, f"{path}[{i}]", problems, meta) for i, (t, v) in enumerate(zip(item_types, value))]
    if len(problems) > before:
        return _BAD
    return tuple(items) if origin is tuple else items


def _mapping(args, value, path, problems, meta, optional):
    if not isinstance(value, dict):
        return _mismatch(problems, path, "a mapping", value, optional)
    key_type, value_type = args
    before = len(problems)
    result = {}
    for key, item in value.items():
        where = f"{path}.{key}"
        result[_convert(key_type, key, where, problems, {})] = _convert(value_type, item, where, problems, meta)
    return _BAD if len(problems) > before else result


def _attrs_instance(cls, value, path, problems, optional):
    if not isinstance(value, dict):
        return _mismatch(problems, path, "a mapping", value, optional)
    attrs.resolve_types(cls)
    fields = {f.alias: f for f in attrs.fields(cls) if f.init}
    before = len(problems)
    kwargs = {}
    for key, item in value.items():
        where = f"{path}.{key}"
        field = fields.get(key) if isinstance(key, str) else None
        if field is None:
            listed = ", ".join(fields) if fields else "(none)"
            problems.append(f"{where}: unknown key.{did_you_mean(str(key), fields)} Valid keys: {listed}.")
        else:
            tp = field.type if field.type is not None else Any
            kwargs[key] = _convert(tp, item, where, problems, field.metadata)
    for key, field in fields.items():
        if key not in value and field.default is attrs.NOTHING:
            problems.append(f"{path}.{key}: required key missing")
    if len(problems) > before:
        return _BAD
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # attrs validators, __attrs_post_init__
        problems.append(f"{path}: {exc}")
        return _BAD


def _component(value, path, problems, meta, optional):
    kind = meta.get("kind")
    if isinstance(value, Component):
        name, options = value.name, dict(value.options)
    elif isinstance(value, str):
        name, options = value, {}
    elif isinstance(value, dict):
        if "name" not in value:
            problems.append(f"{path}.name: required key missing")
            return _BAD
        name, options = value["name"], {k: v for k, v in value.items() if k != "name"}
        if not isinstance(name, str):
            return _mismatch(problems, f"{path}.name", "str", name, False)
    else:
        what = f"a {kind} name" if kind else "a component name"
        return _mismatch(problems, path, f"{what} or a mapping with 'name'", value, optional)
    before = len(problems)
    for key in options:
        if not isinstance(key, str):
            problems.append(f"{path}.{key}: option names must be strings, got {key!r}")
    if kind and len(problems) == before:
        reserved = meta.get("reserved", RESERVED_OPTIONS.get(kind, ()))
        _check_component(kind, name, options, path, problems, reserved)
    return _BAD if len(problems) > before else Component(name, options)


# ---------------------------------------------------------------------------------------------
# Unstructuring
# ---------------------------------------------------------------------------------------------


def unstructure(obj: Any) -> Any:
    """Plain dicts, lists and scalars for ``yaml.safe_dump``; ``structure(type(x), unstructure(x)) == x``."""
    if isinstance(obj, Component):
        return {"name": obj.name, **{k: unstructure(v) for k, v in obj.options.items()}}
    if attrs.has(type(obj)):
        return {f.alias: unstructure(getattr(obj, f.name)) for f in attrs.fields(type(obj)) if f.init}
    if isinstance(obj, dict):
        return {k: unstructure(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [unstructure(v) for v in obj]
    return obj
