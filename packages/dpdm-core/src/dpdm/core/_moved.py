"""Module paths of dpdm-core 0.1, kept for one release: ``import dpdm.core.run`` still works (with a
``DeprecationWarning``) and gives the module at its new place, ``dpdm.core.pipeline.run``.

One import hook serves every old name, so the package's top level shows only the contracts and the subpackages.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "hookspecs": "plugins.hookspecs", "registry": "plugins.registry", "structure": "config.structure",
    "storage": "io.storage", "cache": "io.cache", "checkpoint": "io.checkpoint", "edm_pickle": "io.edm_pickle",
    "distributed": "train.distributed", "precision": "train.precision", "ema": "train.ema", "engine": "train.engine",
    "snapshots": "train.snapshots", "tracking": "train.tracking", "teacher": "train.teacher",
    "distill": "train.distill", "generation": "eval.generation", "metrics": "eval.metrics", "fid": "eval.fid",
    "detectors": "eval.detectors", "inception": "eval.inception", "classifier": "eval.classifier",
    "recovery": "eval.recovery", "evaluate": "eval.protocols", "scoring": "eval.protocols", "report": "eval.report",
    "eval.evaluate": "eval.protocols", "eval.scoring": "eval.protocols",  # the two engines of 0.1, now one
    "figures": "eval.figures", "run": "pipeline.run", "rundir": "pipeline.rundir",
}
REMOVED_IN = "0.3"


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``dpdm.core.<old>`` to the module's new place."""

    prefix = __package__ + "."

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(self.prefix) and fullname[len(self.prefix):] in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = self.prefix + MOVED[spec.name[len(self.prefix):]]
        warnings.warn(f"{spec.name} moved to {new}; the old name goes away in dpdm-core {REMOVED_IN}",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
