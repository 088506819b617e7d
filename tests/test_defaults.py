"""The recipe schema and the library agree on every default they share (one source of truth:
``dpdm.core.defaults``, which both import)."""

from __future__ import annotations

import inspect

import attrs
import pytest

from dpdm.core.config.recipe import EngineConfig, LossGuardConfig, TeacherTrainConfig, TrainConfig
from dpdm.core.train.distill import DPDM, DistillJob
from dpdm.core.train.engine import Trainer
from dpdm.core.train.guards import LossGuard
from dpdm.core.train.teacher import TeacherJob, TeacherTrainer

# names the two sides share that mean different things: the schema's spelling of a choice vs the runtime object
NOT_THE_SAME = {"precision": "the schema names the mode ('fp32'); the jobs take a Precision object",
                "student": "the schema's student network config vs the jobs' initial student module",
                "loss_guard": "the schema's guard settings (on in every recipe) vs the Trainer's LossGuard object "
                              "(a Trainer built in code has none unless given one)"}

PAIRS = [
    (TrainConfig, DistillJob),
    (TrainConfig, DPDM),
    (TeacherTrainConfig, TeacherJob),
    (TeacherTrainConfig, TeacherTrainer),
    (EngineConfig, Trainer),
    (EngineConfig, DistillJob),
    (EngineConfig, TeacherJob),
    (LossGuardConfig, LossGuard),
]


def schema_defaults(cls) -> dict:
    out = {}
    for field in attrs.fields(cls):
        default = field.default
        if isinstance(default, attrs.Factory):
            default = default.factory()
        out[field.name] = default
    return out


def library_defaults(cls) -> dict:
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not p.empty}


@pytest.mark.parametrize("schema, library", PAIRS, ids=lambda c: c.__name__)
def test_schema_and_library_defaults_agree(schema, library):
    ours, theirs = schema_defaults(schema), library_defaults(library)
    shared = sorted((ours.keys() & theirs.keys()) - NOT_THE_SAME.keys())
    assert shared, f"{schema.__name__} and {library.__name__} share no parameter: is this pair still meant?"
    drifted = {name: (ours[name], theirs[name]) for name in shared if ours[name] != theirs[name]}
    assert not drifted, f"defaults of {schema.__name__} (first) and {library.__name__} (second) differ: {drifted}"


def test_the_pairs_cover_the_defaults_that_drifted_before():
    """``fake_updates`` (once 5 in the schema, 1 in the library) and ``max_nonfinite`` (10 vs 20)."""
    covered = {name for schema, library in PAIRS
               for name in schema_defaults(schema).keys() & library_defaults(library).keys()}
    assert {"lr", "betas", "fake_updates", "order", "max_nonfinite", "log_every", "accum"} <= covered
