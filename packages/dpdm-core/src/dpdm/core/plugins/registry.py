"""Component registries fed by pluggy hooks (STYLE habit 5).

One ``PluginManager`` (project ``dpdm``) loads the ``dpdm`` entry-point group and the
built-in plugin of dpdm-core. Registries are built lazily on the first lookup and rebuilt
whenever the set of registered plugins changes, so a test (or an application) can
``plugin_manager().register(my_plugin)`` and look its components up straight away.
"""

from __future__ import annotations

import importlib.metadata
import threading
from dataclasses import dataclass
from typing import Any

import pluggy

from . import hookspecs
from ..errors import DuplicateComponentError, UnknownComponentError
from ..utils import accepts  # noqa: F401  (its home is dpdm.core.utils; importers of this module keep it)

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
            from . import builtins as _builtins

            pm.register(_builtins, name="dpdm.core")
            pm.load_setuptools_entrypoints(hookspecs.PROJECT)
            _pm = pm
        return _pm


def _distribution_of(pm: pluggy.PluginManager, plugin) -> tuple[str | None, str | None]:
    for p, dist in pm.list_plugin_distinfo():
        if p is plugin:
            return dist.metadata["Name"], dist.version
    module = getattr(plugin, "__name__", "") or type(plugin).__module__
    if module.startswith("dpdm.core"):
        try:
            return "dpdm-core", importlib.metadata.version("dpdm-core")
        except importlib.metadata.PackageNotFoundError:
            return "dpdm-core", None
    return None, None


def _build(pm: pluggy.PluginManager) -> dict[str, dict[str, Entry]]:
    tables: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
    for kind, hook_name in KINDS.items():
        hook = getattr(pm.hook, hook_name)
        for impl in hook.get_hookimpls():  # registration order (pluggy keeps it; it calls them in reverse)
            dist, version = _distribution_of(pm, impl.plugin)
            table = tables[kind]

            def register(name: str, obj: Any, _impl=impl, _dist=dist, _version=version, _table=table, _kind=kind):
                if not isinstance(name, str) or not name:
                    raise ValueError(f"{_kind} names must be non-empty strings, got {name!r} from {_impl.plugin_name}")
                new = Entry(_kind, name, obj, _impl.plugin_name, _dist, _version)
                if name in _table:
                    old = _table[name]
                    raise DuplicateComponentError(
                        f"{_kind} {name!r} is registered twice: by {old.source} and by {new.source}. "
                        "Uninstall one of the packages or rename the component in one plugin."
                    )
                _table[name] = new

            impl.function(register)
    return tables


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
    """The registry entry for ``name``; raises ``UnknownComponentError`` with suggestions."""
    _check_kind(kind)
    table = _tables()[kind]
    if name not in table:
        raise UnknownComponentError(kind, name, list(table))
    return table[name]


def get(kind: str, name: str) -> Any:
    """The registered object, e.g. ``get("sampler", "heun")`` or ``get("schedule", "karras")``."""
    return entry(kind, name).obj


def names(kind: str) -> list[str]:
    return sorted(entries(kind))
