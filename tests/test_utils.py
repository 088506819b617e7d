"""``dpdm.core.utils``: the helpers any module of dpdm-core may use."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import torch

import dpdm.core
from dpdm.core.plugins import registry
from dpdm.core.utils import accepts, append_dims


def test_append_dims_broadcasts_per_sample_values_over_the_items():
    sigma = torch.tensor([1.0, 2.0, 3.0])
    x = torch.ones(3, 2, 4, 4)
    assert append_dims(sigma, x.ndim).shape == (3, 1, 1, 1)
    assert append_dims(sigma, 2).shape == (3, 1) and append_dims(sigma, 1).shape == (3,)
    assert torch.equal((append_dims(sigma, x.ndim) * x)[:, 0, 0, 0], sigma)
    assert append_dims(append_dims(sigma, 4), 4).shape == (3, 1, 1, 1)  # already broadcastable: unchanged


def test_accepts_lives_in_utils_and_the_registry_keeps_it():
    def schedule(n, sigma_min=0.002, **options):
        return n

    assert registry.accepts is accepts
    assert accepts(schedule, "sigma_min") and not accepts(schedule, "sigma_max")
    assert accepts(schedule, "sigma_max", var_keyword=True)
    assert not accepts(object(), "n")  # no readable signature


def test_utils_imports_no_torch():
    code = "import sys, dpdm.core.utils; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_contracts_at_the_top_import_nothing_from_plugins():
    top = Path(dpdm.core.__file__).parent
    for module in ("schedules", "samplers", "precond", "losses", "divergences", "sigmas", "utils"):
        tree = ast.parse((top / f"{module}.py").read_text())
        imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        assert not [m for m in imported if "plugins" in m.split(".")], module
