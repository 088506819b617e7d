"""Recipes: the attrs schema, strict structuring from YAML with every problem reported at once, and overrides.

``from dpdm.core.config import Recipe, load_recipe`` is the public surface (as before the move into this package).
"""

from .recipe import (BaselineConfig, CheckpointConfig, EngineConfig, EvalConfig, ModelConfig, Recipe,  # noqa: F401
                     TeacherConfig, TeacherTrainConfig, TrainConfig, load_recipe)
