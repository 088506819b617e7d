"""dpdm-core's own components, registered through the same hooks and the same ``dpdm`` entry point as any plugin
(``dpdm-core``'s pyproject declares it). The metrics register from ``dpdm.core.eval.plugin``."""

from __future__ import annotations

from .hookspecs import hookimpl


@hookimpl
def register_preconditionings(register):
    from ..precond import EDMPrecond, VEPrecond, VPPrecond

    register("edm", EDMPrecond)
    register("vp", VPPrecond)
    register("ve", VEPrecond)


@hookimpl
def register_schedules(register):
    from ..schedules import dpdm, karras

    register("karras", karras)
    register("dpdm", dpdm)


@hookimpl
def register_samplers(register):
    from ..samplers import SAMPLERS

    for name, fn in SAMPLERS.items():
        register(name, fn, nfe=fn.nfe)


@hookimpl
def register_divergences(register):
    from ..divergences import IKL, SmoothedKL

    register("smoothed-kl", SmoothedKL)
    register("ikl", IKL)
