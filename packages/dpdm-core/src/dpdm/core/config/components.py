"""Components in recipes: a registry ``name`` and the options of its factory, written inline in YAML
(``backbone: {name: mlp, hidden: 128}``, or ``backbone: mlp`` without options).

Structuring a component checks the name against the registry and the options against the registered factory's
signature (``inspect.Signature.bind_partial`` for the names, the converter for the annotated types); nothing is
built. Which kind a field holds is in its metadata (:func:`component`); the converter reads it through
``Annotated[Component, ComponentKind(...)]``.
"""

from __future__ import annotations

import copy
import inspect
import types
import typing
from typing import Any, Literal, Optional, Union

import attrs
from cattrs.errors import IterableValidationError, IterableValidationNote

from ..errors import UnknownComponentError, did_you_mean
from ..plugins import registry
from .problems import Invalid, Mismatch, NoneType

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

    def build(self, kind: str, *runtime, optional: dict[str, Any] | None = None, **reserved) -> Any:
        """The object this component names, built the one way there is (``plugins.registry.build``): a sampler or a
        schedule with its options bound, any other kind's factory called with ``runtime``, ``reserved`` and the
        options (``optional`` arguments only where the factory declares them), e.g.
        ``recipe.data.build("dataset", split="train")``."""
        return registry.build(kind, self.name, self.options, *runtime, optional=optional, **reserved)

    def as_dict(self) -> dict[str, Any]:
        """``{"name": ..., **options}``: how checkpoints store a network's components."""
        return {"name": self.name, **self.options}


@attrs.frozen
class ComponentKind:
    """What a component field holds: its registry ``kind`` and the options dpdm sets itself (``reserved``)."""

    kind: str
    reserved: tuple[str, ...]

    @classmethod
    def of(cls, metadata) -> ComponentKind:
        """From the metadata of a field made by :func:`component`."""
        kind = metadata["kind"]
        return cls(kind, tuple(metadata.get("reserved", RESERVED_OPTIONS.get(kind, ()))))


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


def with_kind(tp: Any, kind: ComponentKind) -> Any:
    """``tp`` with every ``Component`` in it annotated with ``kind``: ``list[Component]`` ->
    ``list[Annotated[Component, kind]]``."""
    if tp is Component:
        return typing.Annotated[Component, kind]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if not args or origin is Literal:
        return tp
    new = tuple(with_kind(a, kind) for a in args)
    return Union[new] if origin in (Union, types.UnionType) else origin[new]


def structure_hook(converter, kind: ComponentKind | None):
    """The converter's hook for a component field of ``kind`` (None: any name, options unchecked)."""

    def structure_component(value: Any, _) -> Component:
        name_kind = kind.kind if kind else "component"
        if isinstance(value, Component):
            name, options = value.name, dict(value.options)
        elif isinstance(value, str):
            name, options = value, {}
        elif isinstance(value, dict):
            if "name" not in value:
                raise Invalid("required key missing", ".name")
            name, options = value["name"], {k: v for k, v in value.items() if k != "name"}
            if not isinstance(name, str):
                raise Mismatch("str", name, at=".name")
        else:
            raise Mismatch(f"a {name_kind} name or a mapping with 'name'", value)
        errors = [Invalid(f"option names must be strings, got {key!r}", f".{key}")
                  for key in options if not isinstance(key, str)]
        if kind and not errors:
            errors = _option_problems(converter, kind, name, options)
        if errors:
            raise IterableValidationError(f"While structuring {name_kind} {name!r}", errors, dict)
        return Component(name, options)

    return structure_component


def _factory(kind: str, name: str) -> Any:
    return registry.entry(kind, name).obj  # a family member (fd-<dataset>) comes with its option bound


def _option_problems(converter, kind: ComponentKind, name: str, options: dict) -> list[Exception]:
    """The problems of ``options`` for the factory registered as ``name``: unknown, reserved, missing, mistyped."""
    try:
        factory = _factory(kind.kind, name)
    except UnknownComponentError as exc:
        return [Invalid(str(exc), ".name")]
    try:
        signature = inspect.signature(factory)  # a class: its __init__ without self
    except (TypeError, ValueError):  # no signature to check against
        return []
    named = {n: p for n, p in signature.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    valid = [n for n in named if n not in kind.reserved]
    hints = _type_hints(factory)
    errors: list[Exception] = []
    for key, value in options.items():
        if key in kind.reserved:
            errors.append(Invalid(f"option {key!r} is set by dpdm, not by the recipe", f".{key}"))
            continue
        try:
            signature.bind_partial(**{key: value})
        except TypeError:
            listed = ", ".join(valid) if valid else "(none)"
            errors.append(Invalid(f"unknown option for {kind.kind} {name!r}.{did_you_mean(key, valid)} "
                                  f"Valid options: {listed}.", f".{key}"))
            continue
        tp = _option_type(named[key], hints) if key in named else None
        if tp is not None:
            try:
                converter.structure(value, tp)
            except Exception as exc:  # noqa: BLE001 - formatted by problems_of, which re-raises what is not ours
                exc.__notes__ = [*getattr(exc, "__notes__", []), IterableValidationNote(f"option {key}", key, tp)]
                errors.append(exc)
    errors += [Invalid(f"{kind.kind} {name!r} needs option {n!r}") for n, p in named.items()
               if p.default is p.empty and n not in kind.reserved and n not in options]
    return errors


def _type_hints(factory: Any) -> dict[str, Any]:
    """The evaluated annotations of a factory (a class: of its ``__init__``); one that cannot be evaluated
    (a name imported only for type checkers) leaves that parameter unchecked, not the others."""
    target = factory.__init__ if isinstance(factory, type) else factory
    try:
        return typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - any failure of an annotation's own code
        hints = {}
        for key, annotation in getattr(target, "__annotations__", {}).items():
            if not isinstance(annotation, str):
                hints[key] = annotation
                continue
            try:
                hints[key] = eval(annotation, getattr(target, "__globals__", {}))  # what get_type_hints does
            except Exception:  # noqa: BLE001
                pass
        return hints


def _option_type(param: inspect.Parameter, hints: dict[str, Any]) -> Any:
    """The type an option must have, from the annotation or else the default's type; None: unchecked."""
    if param.name in hints:
        tp = hints[param.name]
    elif type(param.default) in (int, float, str, bool):
        tp = type(param.default)
    else:
        return None
    if param.default is None:
        tp = Optional[tp]
    return tp if _checkable(tp) else None


def _checkable(tp: Any) -> bool:
    """Whether the converter can judge plain YAML data as ``tp``: scalars, Literal, and lists, tuples, dicts
    and unions of those (not classes such as ``nn.Module``, which only code passes)."""
    if tp in (int, float, str, bool, NoneType, list, tuple, dict) or tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin is Literal:
        return True
    if origin in (Union, types.UnionType, list, tuple, dict):
        return all(a is Ellipsis or _checkable(a) for a in typing.get_args(tp))
    return False
