"""Recipes: the attrs schema (``recipe.py``) with the bounds of its values (``bounds.py``), strict structuring
through a cattrs converter with every problem reported at once (``structure.py``, ``problems.py``), components
named by registry key (``components.py``), and YAML reading and overrides (``yaml.py``).

``from dpdm.core.config import Recipe, load_recipe`` is the public surface (as before the move into this package).
"""

from .recipe import (BaselineConfig, CheckpointConfig, EngineConfig, EvalConfig, ModelConfig, Recipe,  # noqa: F401
                     TeacherConfig, TeacherTrainConfig, TrainConfig, load_recipe, read_recipe)
