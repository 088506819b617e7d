"""What the config layer reports: the exceptions its structuring hooks raise, and :func:`problems_of`, which walks
cattrs' exception groups into the project's messages, one per problem, each starting with its dotted path::

    recipe.train.lr: expected float, got 'abc'
    recipe.train.stpes: unknown key. Did you mean 'steps'? Valid keys: ...
    recipe.eval.teacher_nfe[2]: expected int, got 'x'
    recipe.train.betas: every entry must be in [0, 1), got [1.5, 0.99]
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union

import attrs
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)

from ..errors import did_you_mean

NoneType = type(None)


class Invalid(Exception):
    """A problem with one value, reported as ``<path><at>: <message>`` (``at``: e.g. ``.name``, or empty)."""

    def __init__(self, message: str, at: str = ""):
        super().__init__(message)
        self.at = at

    @property
    def message(self) -> str:
        return str(self.args[0])


class Mismatch(Invalid):
    """A value of the wrong type: ``expected <expected>, got <value>``; ``optional`` (set by the hook of an
    ``X | None`` field) adds `` or null`` after the expected type."""

    def __init__(self, expected: str, value: Any, at: str = ""):
        super().__init__(expected, at)
        self.expected, self.value, self.optional = expected, value, False

    @property
    def message(self) -> str:
        return f"expected {self.expected}{' or null' if self.optional else ''}, got {short(self.value)}"


class OutOfBounds(Invalid):
    """A value of the right type outside its field's bounds (``must be at least 1, got 0``)."""


def short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def type_name(tp: Any) -> str:
    """How an annotation reads in messages: ``float or null``, ``list[int]``, ``one of 'a', 'b'``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is NoneType:
        return "null"
    if tp is Any:
        return "any value"
    if origin in (Union, types.UnionType):
        names = [type_name(a) for a in args if a is not NoneType]
        return " or ".join(names + (["null"] if NoneType in args else []))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"tuple[{type_name(args[0])}, ...]"
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def problems_of(exc: BaseException, path: str, value: Any) -> list[str]:
    """The messages of a structuring failure ``exc`` of ``value`` at dotted ``path``, every problem at once.

    Within a class the problems follow the order of the keys in ``value`` (as the file lists them), then the
    missing keys; within a sequence or a component they follow the items. Exceptions other than the config
    layer's own and the ``ValueError``/``TypeError`` of a class's validators are bugs and propagate.
    """
    if isinstance(exc, ClassValidationError):
        return _class_problems(exc, path, value)
    if isinstance(exc, IterableValidationError):
        problems = []
        for sub in exc.exceptions:
            note = _note(sub, IterableValidationNote)
            if note is None:
                problems += problems_of(sub, path, value)
            else:
                key = note.index
                where = f"{path}.{key}" if _is_mapping(exc.cl) else f"{path}[{key}]"
                problems += problems_of(sub, where, _item(value, key))
        return problems
    if isinstance(exc, Invalid):
        return [f"{path}{exc.at}: {exc.message}"]
    if isinstance(exc, (ValueError, TypeError)):  # attrs validators, __attrs_post_init__
        return [f"{path}: {exc}"]
    raise exc


def _class_problems(exc: ClassValidationError, path: str, value: Any) -> list[str]:
    keys = list(value) if isinstance(value, dict) else []
    aliases = {f.name: f.alias for f in attrs.fields(exc.cl)} if attrs.has(exc.cl) else {}
    found: list[tuple[int, list[str]]] = []  # (position of the key in the file, its problems)
    for sub in exc.exceptions:
        note = _note(sub, AttributeValidationNote)
        if isinstance(sub, ForbiddenExtraKeysError):
            valid = [f.alias for f in attrs.fields(sub.cl) if f.init]
            listed = ", ".join(valid) if valid else "(none)"
            for key in sub.extra_fields:
                message = f"unknown key.{did_you_mean(str(key), valid)} Valid keys: {listed}."
                found.append((keys.index(key), [f"{path}.{key}: {message}"]))
        elif note is None:
            found.append((-1, problems_of(sub, path, value)))
        else:
            key = aliases.get(note.name, note.name)
            if isinstance(sub, KeyError) and key not in keys:
                found.append((len(keys), [f"{path}.{key}: required key missing"]))
            else:
                found.append((keys.index(key) if key in keys else len(keys), problems_of(sub, f"{path}.{key}",
                                                                                         _item(value, key))))
    found.sort(key=lambda item: item[0])  # stable: missing keys keep the order of the fields
    return [problem for _, problems in found for problem in problems]


def _note(exc: BaseException, kind: type) -> Any:
    return next((n for n in getattr(exc, "__notes__", ()) if type(n) is kind), None)


def _is_mapping(tp: Any) -> bool:
    return tp is dict or typing.get_origin(tp) is dict


def _item(value: Any, key: Any) -> Any:
    """``value[key]`` where there is one (the data a nested problem is ordered by), else None."""
    try:
        return value[key]
    except (KeyError, IndexError, TypeError):
        return None
