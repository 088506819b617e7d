"""The library's notes and warnings go through ``logging`` (loggers under ``dpdm``); the CLI shows them on stderr
with rich's handler, from the first process only."""

import subprocess
import sys
import textwrap


def _cli_logging(rank: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent("""
        import logging
        from dpdm.cli import common
        common.show_logs(); common.show_logs()  # installed once
        log = logging.getLogger("dpdm.core.somewhere")
        log.info("a note"); log.warning("a warning"); log.error("an error")
        logging.getLogger("other").warning("not ours")
        print(len(logging.getLogger("dpdm").handlers))
    """)
    env = {"RANK": rank, "PATH": "/usr/bin:/bin", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_the_cli_shows_library_notes_on_stderr_once():
    out = _cli_logging("0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
    lines = [line.strip() for line in out.stderr.splitlines() if line.strip()]
    assert lines[:3] == ["a note", "a warning", "an error"]
    assert "not ours" in out.stderr  # other libraries' records keep Python's default (last-resort) handling


def test_other_ranks_show_only_errors():
    out = _cli_logging("1")
    assert out.returncode == 0, out.stderr
    assert "a note" not in out.stderr and "a warning" not in out.stderr and "an error" in out.stderr


def test_the_library_installs_no_handler():
    code = "import logging, dpdm.core.pipeline.run, dpdm.core.train.engine; print(logging.getLogger('dpdm').handlers)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
