"""Component registries fed by pluggy hooks (STYLE habit 5).

One ``PluginManager`` (project ``dpdm``) loads the ``dpdm`` entry-point group, through which dpdm-core's own
built-ins register too (``dpdm.core.plugins.builtins``, ``dpdm.core.eval.plugin``). Registries are built lazily on
the first lookup and rebuilt whenever the set of registered plugins changes, so a test (or an application) can
``plugin_manager().register(my_plugin)`` and look its components up straight away.

``register(name, obj, **metadata)`` keeps metadata with the component: ``nfe=`` for samplers (network evaluations
per number of steps), ``note=`` for metrics (what the numbers are, for reports), ``family=`` for a component whose
name carries an option (``register("fd", factory, family="fd-{dataset}")``: ``fd-mnist`` is ``fd`` with
``dataset="mnist"``; an option named like a component kind must name a registered one). ``build(kind, name,
options, ...)`` is the one way from a recipe's component to an object.
"""

from __future__ import annotations

import functools
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping

import pluggy

from . import hookspecs
from ..errors import DpdmError, DuplicateComponentError, UnknownComponentError
from ..utils import accepts  # its home is dpdm.core.utils; importers of this module keep it

KINDS = {
    "backbone": "register_backbones",
    "preconditioning": "register_preconditionings",
    "schedule": "register_schedules",
    "sampler": "register_samplers",
    "divergence": "register_divergences",
    "dataset": "register_datasets",
    "metric": "register_metrics",
}


@dataclass(frozen=True)
class Entry:
    """A registered component and where it came from."""

    kind: str
    name: str
    obj: Any
    plugin: str  # plugin name (module path for entry points)
    distribution: str | None  # distribution that provided it, e.g. "dpdm-nets"
    version: str | None
    meta: Mapping[str, Any] = field(default_factory=dict)  # nfe=, note=, family=, ... (see the module docstring)

    @property
    def source(self) -> str:
        dist = f"{self.distribution} {self.version}" if self.distribution else "an unregistered distribution"
        return f"{dist} (plugin {self.plugin})"


_lock = threading.RLock()
_pm: pluggy.PluginManager | None = None
# (plugin ids, tables, the plugins themselves): holding the plugins keeps their ids from being reused
# by new objects while the cache is keyed on them (an unregistered plugin's id could come back).
_cache: tuple[frozenset, dict[str, dict[str, Entry]], list] | None = None


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with entry points and built-ins loaded."""
    global _pm
    with _lock:
        if _pm is None:
            pm = pluggy.PluginManager(hookspecs.PROJECT)
            pm.add_hookspecs(hookspecs)
            pm.load_setuptools_entrypoints(hookspecs.PROJECT)
            if pm.get_plugin("core") is None:
                raise DpdmError("dpdm-core's own components (samplers, schedules, ...) register through its `dpdm` "
                                "entry point, which this environment does not list: dpdm-core is importable but not "
                                "installed. Install it (pip install packages/dpdm-core, or pip install -e "
                                "packages/dpdm-core for development, in a dpdm checkout)")
            _pm = pm
        return _pm


def _distribution_of(pm: pluggy.PluginManager, plugin) -> tuple[str | None, str | None]:
    for p, dist in pm.list_plugin_distinfo():
        if p is plugin:
            return dist.metadata["Name"], dist.version
    return None, None


def _build(pm: pluggy.PluginManager) -> dict[str, dict[str, Entry]]:
    tables: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
    for kind, hook_name in KINDS.items():
        hook = getattr(pm.hook, hook_name)
        for impl in hook.get_hookimpls():  # registration order (pluggy keeps it; it calls them in reverse)
            dist, version = _distribution_of(pm, impl.plugin)
            table = tables[kind]

            def register(name: str, obj: Any, _impl=impl, _dist=dist, _version=version, _table=table, _kind=kind,
                         **meta):
                if not isinstance(name, str) or not name:
                    raise ValueError(f"{_kind} names must be non-empty strings, got {name!r} from {_impl.plugin_name}")
                meta = _checked_meta(_kind, name, obj, meta, _impl.plugin_name)
                new = Entry(_kind, name, obj, _impl.plugin_name, _dist, _version, meta)
                if name in _table:
                    old = _table[name]
                    raise DuplicateComponentError(
                        f"{_kind} {name!r} is registered twice: by {old.source} and by {new.source}. "
                        "Uninstall one of the packages or rename the component in one plugin."
                    )
                _table[name] = new

            impl.function(register)
    return tables


def _checked_meta(kind: str, name: str, obj: Any, meta: dict, plugin: str) -> dict:
    if kind == "sampler":
        nfe = meta.get("nfe", getattr(obj, "nfe", None))  # 0.1 plugins set an ``nfe`` attribute on the function
        if not callable(nfe):
            raise ValueError(f"sampler {name!r} from {plugin} needs nfe=: register({name!r}, fn, nfe=lambda steps: "
                             f"network evaluations)")
        meta = {**meta, "nfe": nfe}
    family = meta.get("family")
    if family is not None and not (isinstance(family, str) and len(_PLACEHOLDER.findall(family)) == 1):
        raise ValueError(f"{kind} {name!r} from {plugin}: family must be a name pattern with one {{option}}, "
                         f"got {family!r}")
    return meta


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _family_member(kind: str, table: dict[str, Entry], name: str) -> Entry | None:
    """The entry for ``name`` as a member of a registered family (``fd-mnist`` of ``fd-{dataset}``), or None."""
    for base in table.values():
        family = base.meta.get("family")
        if not family:
            continue
        option = _PLACEHOLDER.search(family).group(1)
        prefix, _, suffix = family.partition("{" + option + "}")
        if not (name.startswith(prefix) and name.endswith(suffix) and len(name) > len(prefix) + len(suffix)):
            continue
        value = name[len(prefix):len(name) - len(suffix)]
        if option in KINDS and value not in _tables()[option]:  # fd-<dataset> with no such dataset
            error = UnknownComponentError(option, value, list(_tables()[option]))
            error.args = (f"{kind} {name!r} is {family} with {option} {value!r}, but: {error.args[0]}",)
            raise error
        meta = {k: v for k, v in base.meta.items() if k != "family"}
        return Entry(kind, name, functools.partial(base.obj, **{option: value}), base.plugin, base.distribution,
                     base.version, {**meta, "family_of": base.name, "family_option": (option, value)})
    return None


def _listed(table: dict[str, Entry]) -> list[str]:
    """Registered names plus family patterns written as ``fd-<dataset>``, for messages."""
    out = list(table)
    for e in table.values():
        if e.meta.get("family"):
            out.append(_PLACEHOLDER.sub(lambda m: f"<{m.group(1)}>", e.meta["family"]))
    return out


def _tables() -> dict[str, dict[str, Entry]]:
    global _cache
    pm = plugin_manager()
    with _lock:
        plugins = list(pm.get_plugins())
        key = frozenset(id(p) for p in plugins)
        if _cache is None or _cache[0] != key:
            _cache = (key, _build(pm), plugins)
        return _cache[1]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UnknownComponentError("component kind", kind, list(KINDS))


def entries(kind: str) -> dict[str, Entry]:
    """All registered components of one kind, by name."""
    _check_kind(kind)
    return dict(_tables()[kind])


def entry(kind: str, name: str) -> Entry:
    """The registry entry for ``name`` (or a member of a registered family, e.g. ``fd-mnist``); raises
    ``UnknownComponentError`` with suggestions."""
    _check_kind(kind)
    table = _tables()[kind]
    if name in table:
        return table[name]
    member = _family_member(kind, table, name) if isinstance(name, str) else None
    if member is None:
        raise UnknownComponentError(kind, name, _listed(table))
    return member


def get(kind: str, name: str) -> Any:
    """The registered object, e.g. ``get("sampler", "heun")`` or ``get("schedule", "karras")``."""
    return entry(kind, name).obj


def names(kind: str) -> list[str]:
    return sorted(entries(kind))


def build(kind: str, name: str, options: Mapping[str, Any] | None = None, *runtime,
          optional: Mapping[str, Any] | None = None, **reserved) -> Any:
    """The one way from a recipe's component (``name`` with its ``options``) to an object.

    Samplers and schedules are functions: they come back with their options bound (``functools.partial``; a
    sampler also carries ``.nfe`` and ``.name``), so every route that samples honours the recipe's options. Other
    kinds are factories, called as ``factory(*runtime, **reserved, **optional, **options)``: ``reserved`` arguments
    always (a dataset's ``split``), ``optional`` ones only when the factory names that parameter and the options do
    not set it (the run's ``device`` for a metric, the teacher's ``sigma_data`` for a divergence)."""
    e = entry(kind, name)
    options = dict(options or {})
    if kind in ("sampler", "schedule"):
        bound = functools.partial(e.obj, **options)
        bound.name, bound.options = name, options
        if kind == "sampler":
            bound.nfe = e.meta["nfe"]
        return bound
    given = {k: v for k, v in (optional or {}).items() if v is not None and k not in options and accepts(e.obj, k)}
    return e.obj(*runtime, **reserved, **given, **options)
