"""The CLI's modules stand alone: each imports in a fresh interpreter by itself (no import-order workaround, no
cycle through ``main``), and only ``main`` wires the commands together."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CLI = Path(__file__).resolve().parent.parent / "packages" / "dpdm-cli" / "src" / "dpdm" / "cli"
MODULES = sorted(f"dpdm.cli.{p.stem}" for p in CLI.glob("*.py") if p.stem not in ("__init__", "__main__"))


def test_the_modules_are_found():
    assert {"dpdm.cli.common", "dpdm.cli.main", "dpdm.cli.evaluation", "dpdm.cli.data"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_each_cli_module_imports_alone(module):
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("module", [m for m in MODULES if m != "dpdm.cli.main"])
def test_no_cli_module_imports_main(module):
    """``main`` imports the commands; a command module that imported ``main`` back would close a cycle."""
    proc = subprocess.run([sys.executable, "-c", f"import sys, {module}; print('dpdm.cli.main' in sys.modules)"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.stdout.strip() == "False", proc.stderr[-2000:]
