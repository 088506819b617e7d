"""The strict config layer: YAML in, attrs objects out, every problem reported at once.

::

    data = apply_overrides(load_yaml("recipe.yaml"), ["train.lr=2e-5"])
    recipe = structure(Recipe, data, source="recipe.yaml")  # ConfigError listing all problems
    text = dump_yaml(recipe)  # structure(Recipe, load_yaml_text(text, "x")) == recipe

Structuring is a cattrs ``Converter`` (unknown keys forbidden, detailed validation) with strict hooks: a bool is
not a number, an int is accepted as a float, a string is not a list, ``Literal`` values match by type and value,
``X | None`` adds "or null" to X's message. Component fields are checked against the registry
(``components.py``) and bounded fields against their bounds (``bounds.py``); :func:`problems_of` turns cattrs'
exception groups into dotted-path messages. YAML reading and overrides are in ``yaml.py``; this module also
re-exports them, so ``from dpdm.core.config.structure import load_yaml`` keeps working.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union

import attrs
import cattrs
import yaml
from cattrs.cols import list_structure_factory
from cattrs.errors import IterableValidationError, IterableValidationNote
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from ..errors import ConfigError
from . import components
from .components import RESERVED_OPTIONS, Component, ComponentKind, component
from .problems import Invalid, Mismatch, NoneType, OutOfBounds, problems_of, short, type_name
from .yaml import Dumper, Loader, apply_overrides, load_yaml, load_yaml_text, parse_value

__all__ = [
    "Component", "Dumper", "Loader", "RESERVED_OPTIONS", "apply_overrides", "component", "dump_yaml",
    "load_yaml", "load_yaml_text", "parse_value", "structure", "structure_deferring_bounds", "unstructure",
]


def structure(cls: Any, data: Any, *, path: str = "recipe", source: str | None = None) -> Any:
    """Build ``cls`` (usually an attrs class) from plain data, strictly.

    Every problem (wrong type, unknown or missing key, unknown component or option, a value outside its
    field's bound) is collected, each starting with its dotted path, and raised together as one
    ``ConfigError(problems, source)``.
    """
    try:
        return _STRICT.structure(data, cls)
    except Exception as exc:  # noqa: BLE001 - problems_of re-raises what is not a problem with the data
        raise ConfigError(problems_of(exc, path, data), source) from None


def structure_deferring_bounds(cls: Any, data: Any, *, path: str = "recipe",
                               source: str | None = None) -> tuple[Any, list[str]]:
    """Like :func:`structure`, but when the only problems are values outside their bounds, the object is built
    anyway and returned with them, ``(obj, problems)``, so that a caller can report them together with its own
    later checks (``dpdm run`` builds every component first). Any other problem raises, bounds included."""
    try:
        return structure(cls, data, path=path, source=source), []
    except ConfigError as exc:
        problems = exc.problems
    try:
        return _LENIENT.structure(data, cls), problems
    except Exception:  # noqa: BLE001 - a type problem too: the strict pass has reported it with the rest
        raise ConfigError(problems, source) from None


def unstructure(obj: Any) -> Any:
    """Plain dicts, lists and scalars for ``yaml.safe_dump``; ``structure(type(x), unstructure(x)) == x``."""
    return _STRICT.unstructure(obj)


def dump_yaml(obj: Any) -> str:
    """YAML text for an attrs object or plain data, keys in declaration order."""
    return yaml.dump(unstructure(obj), Dumper=Dumper, sort_keys=False, default_flow_style=False)


# --- the converter ------------------------------------------------------------------------------------------------


def make_converter(*, bounds: bool = True) -> cattrs.Converter:
    """The strict converter; ``bounds=False`` leaves the fields' bounds unchecked."""
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    for tp in (int, float, str, bool, NoneType):  # over cattrs' own (which call int(value), str(value), ...)
        conv.register_structure_hook(tp, _scalar_hook(tp))
    conv.register_structure_hook_func(lambda tp: tp is object, lambda value, _: value)
    conv.register_structure_hook_factory(_is_origin(list), lambda tp: _list_hook(conv, tp))
    conv.register_structure_hook_factory(_is_origin(tuple), lambda tp: _tuple_hook(conv, tp))
    conv.register_structure_hook_factory(_is_origin(dict), lambda tp: _mapping_hook(conv, tp))
    conv.register_structure_hook_factory(lambda tp: typing.get_origin(tp) is Literal, lambda tp: _literal_hook)
    conv.register_structure_hook_factory(_is_union, lambda tp: _union_hook(conv, tp))
    conv.register_structure_hook_factory(attrs.has, lambda cls: _attrs_hook(conv, cls, bounds))
    conv.register_structure_hook_factory(lambda tp: tp is Component, lambda _: components.structure_hook(conv, None))
    conv.register_structure_hook_factory(
        lambda tp: typing.get_origin(tp) is typing.Annotated and typing.get_args(tp)[0] is Component,
        lambda tp: components.structure_hook(conv, typing.get_args(tp)[1]),
    )
    conv.register_unstructure_hook(Component, lambda c: {"name": c.name, **conv.unstructure(c.options)})
    conv.register_unstructure_hook_factory(
        attrs.has, lambda cls: make_dict_unstructure_fn(cls, conv, _cattrs_use_alias=True))
    conv.register_unstructure_hook_factory(
        _is_origin(tuple), lambda _: lambda value: [conv.unstructure(v) for v in value])
    return conv


def _is_origin(container: type):
    return lambda tp: tp is container or typing.get_origin(tp) is container


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _scalar_hook(tp: type):
    """A bool is not a number; an int is a float (returned as one)."""

    def structure_scalar(value: Any, _) -> Any:
        if tp is NoneType:
            ok = value is None
        elif tp in (int, float):
            ok = isinstance(value, int if tp is int else (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, tp)
        if not ok:
            raise Mismatch(type_name(tp), value)
        return float(value) if tp is float else value

    return structure_scalar


def _literal_hook(value: Any, tp: Any) -> Any:
    for choice in typing.get_args(tp):
        if type(value) is type(choice) and value == choice:
            return choice
    raise Mismatch(type_name(tp), value)


def _union_hook(conv: cattrs.Converter, tp: Any):
    args = typing.get_args(tp)
    members = [a for a in args if a is not NoneType]
    nullable = len(members) < len(args)
    hooks = [(m, conv.get_structure_hook(m)) for m in members]

    def structure_union(value: Any, _) -> Any:
        if value is None and nullable:
            return None
        if len(hooks) == 1:  # X | None: X's own messages, with "or null"
            (member, hook), = hooks
            try:
                return hook(value, member)
            except Mismatch as exc:
                if not exc.at:  # the value itself, not a part of it (a component's name)
                    exc.optional = True
                raise
        for member, hook in hooks:  # the first member that takes the value wins
            try:
                return hook(value, member)
            except Exception:  # noqa: BLE001 - try the next member
                continue
        raise Mismatch(type_name(tp), value)

    return structure_union


def _list_hook(conv: cattrs.Converter, tp: Any):
    items = list_structure_factory(tp, conv)

    def structure_list(value: Any, _) -> list:
        if not isinstance(value, (list, tuple)):
            raise Mismatch(type_name(tp), value)
        return items(value, tp)

    return structure_list


def _tuple_hook(conv: cattrs.Converter, tp: Any):
    args = typing.get_args(tp)
    fixed = bool(args) and not (len(args) == 2 and args[1] is Ellipsis)

    def structure_tuple(value: Any, _) -> tuple:
        if not isinstance(value, (list, tuple)):
            raise Mismatch(type_name(tp), value)
        if fixed and len(value) != len(args):
            raise Invalid(f"expected {type_name(tp)} ({len(args)} items), got {short(value)}")
        item_types = args if fixed else [args[0] if args else Any] * len(value)
        return tuple(_each(conv, tp, [(i, t, v) for i, (t, v) in enumerate(zip(item_types, value))]))

    return structure_tuple


def _mapping_hook(conv: cattrs.Converter, tp: Any):
    key_type, value_type = typing.get_args(tp) or (Any, Any)

    def structure_mapping(value: Any, _) -> dict:
        if not isinstance(value, dict):
            raise Mismatch("a mapping", value)
        # each value, then its key (the problems of both are reported at <path>.<key>)
        items = [(key, t, v) for key, item in value.items() for t, v in ((value_type, item), (key_type, key))]
        values_and_keys = _each(conv, tp, items)
        return dict(zip(values_and_keys[1::2], values_and_keys[::2]))

    return structure_mapping


def _each(conv: cattrs.Converter, tp: Any, items: list[tuple[Any, Any, Any]]) -> list:
    """Structure ``(index, type, value)`` items, collecting every failure (noted with its index) into one
    ``IterableValidationError`` of ``tp``."""
    results, errors = [], []
    for index, item_type, item in items:
        try:
            results.append(conv.structure(item, item_type))
        except Exception as exc:  # noqa: BLE001 - reported by problems_of
            exc.__notes__ = [*getattr(exc, "__notes__", []), IterableValidationNote(f"@ {index!r}", index, item_type)]
            errors.append(exc)
    if errors:
        raise IterableValidationError(f"While structuring {tp!r}", errors, tp)
    return results


def _attrs_hook(conv: cattrs.Converter, cls: type, bounds: bool):
    """cattrs' generated hook for ``cls`` (unknown keys are errors), with component fields structured by their
    kind and bounded fields checked, behind a check that the value is a mapping."""
    attrs.resolve_types(cls)
    overrides = {}
    for field in attrs.fields(cls):
        tp = field.type if field.type is not None else Any
        if "kind" in field.metadata:
            tp = components.with_kind(tp, ComponentKind.of(field.metadata))
        bound = field.metadata.get("bound") if bounds else None
        if tp is not field.type or bound is not None:
            overrides[field.name] = override(struct_hook=_field_hook(conv.get_structure_hook(tp), tp, bound))
    structure_fields = make_dict_structure_fn(cls, conv, _cattrs_forbid_extra_keys=True, _cattrs_use_alias=True,
                                              _cattrs_detailed_validation=True, **overrides)

    def structure_attrs(value: Any, _) -> Any:
        if not isinstance(value, dict):
            raise Mismatch("a mapping", value)
        return structure_fields(value, cls)

    return structure_attrs


def _field_hook(hook, tp: Any, bound):
    def structure_field(value: Any, _) -> Any:
        result = hook(value, tp)
        problem = bound.problem(result) if bound is not None else None
        if problem:
            raise OutOfBounds(problem)
        return result

    return structure_field


_STRICT = make_converter()
_LENIENT = make_converter(bounds=False)
