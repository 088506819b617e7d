"""Recipe YAML: a safe loader that reads YAML-1.2 floats (``1e-4``) and rejects duplicate keys, the matching
dumper (``structure.dump_yaml`` writes with it), reading from local paths or any fsspec URL, and
``dotted.key=value`` overrides.

::

    data = apply_overrides(load_yaml("recipe.yaml"), ["train.lr=2e-5"])
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any

import fsspec
import yaml

from ..errors import ConfigError
from .problems import short as _short

__all__ = ["Dumper", "Loader", "apply_overrides", "load_yaml", "load_yaml_text", "parse_value"]

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


# --- overrides ------------------------------------------------------------------------------------------------


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
