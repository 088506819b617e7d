"""The identity of a recipe's training: the fields that decide the trained weights, their hash (stored in
every training snapshot) and the dotted keys that differ between two recipes (what ``--resume`` refuses)."""

from __future__ import annotations

import hashlib
import json

from .recipe import Recipe
from .structure import unstructure

# train options added later whose null default trains as before: left out of the identity when null, so that a run
# started before they existed keeps its hash and resumes
LATER_NULL_DEFAULTS = ("fake_lora", "student_lora")


def training_config(recipe: Recipe) -> dict:
    """The parts of a recipe that decide the trained weights (a resumed run must share them)."""
    data = unstructure(recipe)
    for train in (data["train"], *(b["train"] for b in data.get("baselines", {}).values())):
        for key in LATER_NULL_DEFAULTS:
            if train.get(key) is None:
                train.pop(key, None)
    engine = data["engine"]
    config = {"data": data["data"], "model": data["model"], "teacher": data["teacher"], "train": data["train"],
              "seed": data["seed"], "engine": {"precision": engine["precision"], "accum": engine["accum"]}}
    if engine.get("score_chunk") is not None:  # changes the student step's round-off; null: as before it existed
        config["engine"]["score_chunk"] = engine["score_chunk"]
    if data.get("baselines"):  # only when there are some: older runs' snapshots keep their hash
        config["baselines"] = data["baselines"]
    return config


def config_hash(recipe: Recipe) -> str:
    return hashlib.sha256(json.dumps(training_config(recipe), sort_keys=True).encode()).hexdigest()[:16]


def config_changes(old: dict, new: dict, prefix: str = "recipe") -> list[str]:
    """Dotted keys whose values differ between two unstructured recipes."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [k for key in sorted(set(old) | set(new))
                for k in config_changes(old.get(key), new.get(key), f"{prefix}.{key}")]
    return [] if old == new else [prefix]
