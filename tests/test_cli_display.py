"""What the ``dpdm`` command shows: tables in full when piped or logged (Markdown, not rich's 80-column layout),
``--version``, shell completion, boolean options shown as flags in every ``--help``, and errors that name only
options that exist."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer
from dpdm.cli.common import show_markdown, show_table
from dpdm.cli.main import app
from dpdm.cli.recover import PAPER_SIGMAS, recovery_table
from dpdm.core.eval.report import sweep_table
from typer.testing import CliRunner

TOY2D = str(Path(__file__).resolve().parent.parent / "recipes" / "toy2d.yaml")
NARROW = {"COLUMNS": "80"}  # what rich assumes when stdout is not a terminal


def invoke(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env={**NARROW, **(env or {})})


def cli_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


# --- tables when stdout is not a terminal ------------------------------------------------------------------------


def test_a_wide_table_keeps_every_number_when_piped(capsys):
    values = {f"{s:g}": {"noisy": 1.23456 + i, "teacher": 0.0123456 + i, "student": 0.00987654 + i,
                         "ratio": 0.812345} for i, s in enumerate(PAPER_SIGMAS)}
    result = {"metric": "energy", "num": 300, "recovery_protocol": "paper", "ref": "toy", "floor": 0.001234,
              "recovery": values}
    show_table(recovery_table(result))
    out = capsys.readouterr().out
    assert "…" not in out
    lines = out.splitlines()
    assert lines[0].startswith("Recovery, paper protocol (energy, 300 training items)")
    assert "| σ | " + " | ".join(values) + " |" in lines
    for row in ("noisy", "teacher", "student"):
        assert f"| {row} | " + " | ".join(f"{v[row]:.3g}" for v in values.values()) + " |" in lines
    assert lines[-1].startswith("reference: toy; ratio = student / teacher")


def test_a_markdown_report_is_printed_as_its_text_when_piped(capsys):
    sweep = {"student": {"dpdm": {"1": 0.0123456, "2": 0.0234567}},
             "undistilled": {"dpdm": {"1": 0.0345678, "2": 0.0456789}},
             "teacher": {s: {"1": 0.0567891, "2": 0.0678912} for s in ("euler", "heun", "dpmpp-2m")},
             "sid": {"dpdm": {"1": 0.0789123}}, "diff-instruct": {"dpdm": {"1": 0.0891234}}}
    text = "\n".join(["## Sampling quality vs NFE", "", *sweep_table(sweep)])
    show_markdown(text)
    out = capsys.readouterr().out
    assert out == text + "\n"  # the Markdown itself: every number in full, nothing wrapped or cut
    assert "…" not in out and "0.0891" in out


def test_a_terminal_keeps_rich_tables(capsys, monkeypatch):
    from dpdm.cli import common
    from rich.table import Table

    monkeypatch.setattr(common.console, "_force_terminal", True)
    t = Table(title="t")
    t.add_column("a")
    t.add_row("1")
    show_table(t)
    show_markdown("| x |\n|---|\n| 2 |")
    out = capsys.readouterr().out
    assert "|" not in out and "─" in out and "1" in out and "2" in out  # rich's layout, not the Markdown text


def test_plugins_prints_a_markdown_table_when_piped():
    r = invoke("plugins")
    assert r.exit_code == 0, r.output
    assert "| kind | name | distribution | version | plugin |" in r.stdout.splitlines()
    assert f"| sampler | heun | dpdm-core | {importlib.metadata.version('dpdm-core')} | core |" in r.stdout
    assert "…" not in r.stdout


def test_an_error_stays_on_one_line_when_piped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke("recover")
    assert r.exit_code == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: no run given and runs/latest does not exist")


# --- --version and shell completion ------------------------------------------------------------------------------


def test_version_prints_the_four_distributions_and_torch():
    r = invoke("--version")
    assert r.exit_code == 0, r.output
    names = ["dpdm-core", "dpdm-nets", "dpdm-data", "dpdm-cli", "torch"]
    assert r.stdout.splitlines() == [f"{n} {importlib.metadata.version(n)}" for n in names]


def test_shell_completion_script_and_completions():
    env = {**cli_env(), "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}  # the shell named, not detected
    script = subprocess.run([sys.executable, "-m", "dpdm.cli", "--show-completion", "bash"], env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert script.returncode == 0, script.stderr
    assert "_DPDM_COMPLETE=complete_bash" in script.stdout
    assert "complete -o default -F _dpdm_completion dpdm" in script.stdout
    words = {**cli_env(), "_DPDM_COMPLETE": "complete_bash", "COMP_WORDS": "dpdm run --dr", "COMP_CWORD": "2"}
    done = subprocess.run([sys.executable, "-m", "dpdm.cli"], env=words, capture_output=True, text=True, check=False,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["--dry-run"], (done.stdout, done.stderr)
    help_text = invoke("--help").stdout
    assert "--install-completion" in help_text and "--show-completion" in help_text


# --- boolean options are flags -----------------------------------------------------------------------------------


def commands(group: click.Group, path=()):
    """Every command of the tree: ``(path, click command)``."""
    for name, command in group.commands.items():
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))


ALL = [((), typer.main.get_command(app)), *commands(typer.main.get_command(app))]


@pytest.mark.parametrize("path,command", ALL, ids=[" ".join(p) or "dpdm" for p, _ in ALL])
def test_help_shows_boolean_options_as_flags(path, command):
    r = invoke(*path, "--help", env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert not re.search(r"<bool>|BOOLEAN|\bbool\b", r.stdout), r.stdout
    for param in command.params:
        if getattr(param, "is_flag", False) and not param.hidden:
            for opt in [*param.opts, *param.secondary_opts]:
                line = next(line for line in r.stdout.splitlines() if re.search(rf"{opt}(?![\w-])", line))
                assert not re.search(rf"{opt}\s+<", line), line  # no value after the flag


def test_flags_still_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = json.loads(invoke("plugins", "--json").stdout)
    assert "sampler" in data
    r = invoke("run", TOY2D, "--dry-run")
    assert r.exit_code == 0 and "recipe" in r.stderr and not (tmp_path / "runs").exists()


# --- errors name options that exist ------------------------------------------------------------------------------


def named_options(message: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", message))


def assert_options_exist(message: str, *command):
    help_text = invoke(*command, "--help", env={"COLUMNS": "200"}).stdout
    named = named_options(message)
    missing = [o for o in named if not re.search(rf"{o}(?![\w-])", help_text)]
    assert not missing, (missing, message)
    for cmd in re.findall(r"`dpdm (\w+)", message):
        assert invoke(cmd, "--help").exit_code == 0, cmd
    return named


def test_resume_latest_without_a_run_names_options_of_dpdm_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke("run", TOY2D, "--resume", "latest")
    assert r.exit_code == 1 and r.stderr.startswith("error: "), r.output
    assert "runs/latest does not exist" in r.stderr
    assert assert_options_exist(r.stderr, "run") == {"--resume", "--out"}
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", [("recover",), ("sample", "--out", "x.png"), ("eval", "sweep"),
                                     ("eval", "cross")])
def test_commands_without_a_run_name_their_own_option(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    r = invoke(*command)
    assert r.exit_code == 1 and "runs/latest does not exist" in r.stderr, r.output
    name = [c for c in command if not c.startswith("-") and not c.endswith(".png")]
    assert "--run" in assert_options_exist(r.stderr, *name)
