"""What every ``dpdm`` command shares: the two consoles, tables and Markdown on stdout (``show_table``,
``show_markdown``: plain Markdown when piped), ``user_errors`` (a ``DpdmError`` is one red line and exit
code 1), the handler that shows the library's log records (``show_logs``), the list options (``--steps 4 5 6``),
number-list parsing, and the ``--nproc`` launcher.

No CLI module imports ``main`` (which only wires the commands together), so the command modules import each other
in any order and alone.

The launcher (``--nproc N``) re-executes the command under torchrun (``python -m dpdm.cli.torchrun --standalone``:
``torch.distributed.run`` without a traceback when a signal stops it) and hands the command's own arguments to the
workers in ``DPDM_ARGV`` (``ARGV_ENV``), because torchrun's parser takes abbreviations of its own options anywhere on
its command line. ``torch.distributed.launcher.api.elastic_launch``
(a launch from code, no environment variable) was considered and not adopted:

- it runs torchrun's elastic agent inside this process, which installs its own handlers for SIGTERM, SIGINT, SIGHUP
  and SIGQUIT and raises ``SignalException``/``ChildFailedError`` instead of returning an exit status;
- torchrun's command line does more than build a ``LaunchConfig``: ``OMP_NUM_THREADS=1`` per worker, the standalone
  rendezvous (c10d on ``localhost:0`` with a fresh id), ``python -u``, the log specs; torch 2.13's ``config_from_args``
  fills 20 ``LaunchConfig`` fields, a list that grows with torch releases, which this module would have to copy and
  follow, whereas torchrun's options are its stable interface.

As a child process, torchrun keeps all of that. What the review asked of a launch from code is had here too: a
SIGTERM or SIGINT sent to this process is passed on to torchrun, which stops its workers (no orphans), and the exit
status is torchrun's (a signal's as 128 + its number). Should this process be killed outright (SIGKILL), torchrun gets
SIGTERM and the workers SIGKILL when their agent dies (Linux's parent-death signal): nothing trains on.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable

import typer
import typer.core
from rich.console import Console
from rich.markup import escape

console = Console()  # results, on stdout
err = Console(stderr=True)  # progress, notes and errors, on stderr

# Options that take several values after one flag (`--steps 4 5 6 7 8`, `--sigma 0.5 1 2`): click options take one
# value each, so the values up to the next option are joined with commas before parsing (`--steps 4,5,6,7,8`);
# repeating the flag and writing commas work too.
LIST_OPTIONS = frozenset({"--steps", "--sigma", "--student-nfe", "--teacher-nfe", "--teacher-sampler",
                          "--figure-sigma"})
ARGV_ENV = "DPDM_ARGV"  # set by --nproc for the processes torchrun starts (a JSON list of arguments)
TORCHRUN = "dpdm.cli.torchrun"  # the module --nproc runs: torchrun, quiet when stopped by a signal (torchrun.py)
SIGTERM_STATUS = 128 + signal.SIGTERM  # 143, the shell's status of a process ended by SIGTERM


def show_logs() -> None:
    """Show the library's log records (loggers under ``dpdm``) on ``err`` through rich's handler: notes (INFO and up)
    from the first process, errors only from the other processes of a ``--nproc`` run (their notes repeat rank 0's).
    Library users keep the standard ``logging`` controls: the library itself installs no handler."""
    from rich.logging import RichHandler

    logger = logging.getLogger("dpdm")
    if any(getattr(h, "dpdm_cli", False) for h in logger.handlers):
        return
    handler = RichHandler(console=err, show_time=False, show_level=False, show_path=False, markup=False,
                          rich_tracebacks=False)
    handler.dpdm_cli = True
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.ERROR)


def flags_take_no_value() -> None:
    """Show a boolean flag in ``--help`` as a flag: ``--dry-run``, not ``--dry-run <bool>``. Typer's rich help (0.29)
    prints every option's type, flags' (and ``--help``'s) included, though a flag takes no value; click's plain help
    and earlier typers print none. A no-op where typer has no such method."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "dpdm_flags", False):
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag else shown(self, ctx)

    display_type_rich.dpdm_flags = True
    TyperOption.display_type_rich = display_type_rich


def versions() -> dict[str, str | None]:
    """The installed versions of dpdm's four distributions and torch (None: not installed), read from their
    metadata (nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("dpdm-core", "dpdm-nets", "dpdm-data", "dpdm-cli", "torch"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def show_markdown(text: str) -> None:
    """Markdown on stdout: rendered by rich on a terminal; piped or logged, the text itself (rich would lay it out
    for 80 columns and cut the numbers of a wide table to ``0.0…``)."""
    if console.is_terminal:
        from rich.markdown import Markdown

        console.print(Markdown(text))
    else:
        console.out(text.rstrip("\n"), highlight=False)


def show_table(table) -> None:
    """A rich ``Table`` on stdout: as a table on a terminal; piped or logged, as Markdown (``table_markdown``)."""
    if console.is_terminal:
        console.print(table)
    else:
        console.out(table_markdown(table), highlight=False)


def table_markdown(table) -> str:
    """A rich ``Table`` as Markdown text: its title, header, rows and caption, every cell in full."""
    from rich.text import Text

    def plain(cell) -> str:
        text = cell.plain if isinstance(cell, Text) else Text.from_markup(str(cell)).plain
        return text.replace("\n", " ").replace("|", "\\|")

    columns = table.columns
    lines = [plain(table.title), ""] if table.title else []
    lines.append("| " + " | ".join(plain(c.header) for c in columns) + " |")
    lines.append("|" + "|".join("---:" if c.justify == "right" else "---" for c in columns) + "|")
    lines += ["| " + " | ".join(map(plain, row)) + " |" for row in zip(*(list(c.cells) for c in columns))]
    if table.caption:
        lines += ["", plain(table.caption)]
    return "\n".join(lines)


def join_list_options(args: list[str]) -> list[str]:
    """``[..., "--steps", "4", "5", "--num", "8"]`` → ``[..., "--steps", "4,5", "--num", "8"]``."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        out.append(arg)
        i += 1
        if arg in LIST_OPTIONS:
            values = []
            while i < len(args) and not args[i].startswith("--"):
                values.append(args[i])
                i += 1
            if values:
                out.append(",".join(values))
    return out


class ListOptionsGroup(typer.core.TyperGroup):
    """A command group whose list options take several values after one flag (``join_list_options``)."""

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, join_list_options(list(args)))


def local_path(value):
    """A typer callback for options that write a local file: a URL is refused (``Path`` would turn ``s3://b/x`` into
    a folder named ``s3:``)."""
    if value is not None and re.match(r"[A-Za-z][\w+.-]*:/", str(value)):
        raise typer.BadParameter(f"{value}: a local path is expected here, not a URL")
    return value


def user_errors(fn):
    """Turn ``DpdmError`` into one red line on stderr and exit code 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from dpdm.core.errors import DpdmError

        try:
            return fn(*args, **kwargs)
        except DpdmError as exc:  # the message is text, not markup: "expected list[int]" must keep "[int]"
            error(str(exc))
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def error(message: str) -> None:
    """``error: <message>`` in red on stderr, the message printed verbatim (not as markup)."""
    # soft_wrap: no line breaks of rich's own (80 columns when piped), so a logged message stays whole
    err.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)


def _numbers(values: list[str] | None, option: str, parse: Callable[[str], float], what: str) -> list:
    """Every comma-separated part of ``values`` through ``parse``; a part it refuses names ``option``."""
    from dpdm.core.errors import DpdmError

    out = []
    for v in values or []:
        for part in str(v).split(","):
            if part.strip():
                try:
                    out.append(parse(part))
                except ValueError:
                    raise DpdmError(f"{option}: expected {what}, got {part!r}") from None
    return out


def floats(values: list[str] | None, option: str) -> list[float]:
    """``--sigma 0.5 1 2`` (or ``0.5,1,2``, or repeated) as a list of floats."""
    return _numbers(values, option, float, "a number")


def ints(values: list[str] | None, option: str) -> list[int]:
    """``--steps 4 5 6`` (or ``4,5,6``, or repeated) as a list of positive ints."""
    from dpdm.core.errors import DpdmError

    out = _numbers(values, option, int, "a whole number")
    small = [n for n in out if n < 1]
    if small:
        raise DpdmError(f"{option}: every value must be at least 1, got {small[0]}")
    return out


def stopped(exc, run_dir, argv: list[str], world_size: int = 1) -> typer.Exit:
    """Say why a run stopped (``signals.Interrupted``: the signal, the step, the snapshot) and the ``dpdm`` command
    that resumes ``run_dir`` (None: say nothing, another rank does), and return the exit: 128 + the signal."""
    from dpdm.core.pipeline.rundir import CONFIG

    if run_dir is not None:
        err.print(f"[yellow]{escape(exc.describe())}[/]", highlight=False)
        with contextlib.suppress(Exception):  # a run stopped before it wrote its config cannot be resumed
            if run_dir.exists(CONFIG):
                nproc = ["--nproc", str(world_size)] if world_size > 1 else []
                command = shlex.join(["dpdm", *argv, *nproc, "--resume", str(run_dir)])
                err.print(f"resume with: {escape(command)}", highlight=False, soft_wrap=True)
    return typer.Exit(exc.status)


def launch(nproc: int) -> None:
    """Re-run this command under ``torchrun --standalone --nproc_per_node N`` (without ``--nproc``); exits with
    torchrun's status, or 143 / 130 after a SIGTERM / SIGINT, which is passed on to torchrun (its agent passes it on to
    the workers: they stop after their step with a snapshot). torchrun runs in a process group of its own, so that
    Ctrl-C reaches it once, through here, and gets SIGTERM should this process die (``die_with_parent``)."""
    from dpdm.core.errors import DpdmError

    if "RANK" in os.environ:
        raise DpdmError("--nproc inside a torchrun job: launch either with torchrun or with --nproc, not both")
    argv = _without_nproc(sys.argv[1:])
    # The command's own arguments travel in DPDM_ARGV, not on torchrun's command line: torchrun's parser takes
    # abbreviations of its options anywhere (`--num` would clash with `--numa-binding`, `--run` would become
    # `--run-path`).
    cmd = [sys.executable, "-m", TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "-m", "dpdm.cli"]
    err.print(f"launching: {escape(' '.join(cmd[1:] + argv))}")
    set_death_signal = _death_signal_setter()
    launcher = os.getpid()

    def own_group_dying_with_this_process():  # in the child, between fork and exec
        os.setpgid(0, 0)
        if set_death_signal is not None:
            set_death_signal(signal.SIGTERM)
            if os.getppid() != launcher:  # this process died before the death signal was set
                os._exit(SIGTERM_STATUS)

    child = subprocess.Popen(cmd, env={**os.environ, ARGV_ENV: json.dumps(argv)},
                             preexec_fn=own_group_dying_with_this_process)
    received = []

    def forward(signum, frame):
        received.append(signum)
        child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        status = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:  # torchrun reports a stopped job as a failure (1); this command was stopped by the signal
        status = 128 + received[0]
    raise typer.Exit(status if status >= 0 else 128 - status)


def _death_signal_setter() -> Callable[[int], None] | None:
    """``set(sig)``: this process gets ``sig`` when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``); None where
    that does not exist. libc is loaded here, before any fork: the child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda sig: prctl(1, int(sig), 0, 0, 0)  # 1: PR_SET_PDEATHSIG


def die_with_parent() -> None:
    """For a worker that ``--nproc`` started (``ARGV_ENV`` set): SIGKILL when its torchrun agent dies, so that no rank
    trains on, orphaned, when the agent is killed (the agent itself gets SIGTERM when the launcher dies, and stops its
    workers gracefully). Exits at once if the agent died before the death signal was set."""
    if not os.environ.get(ARGV_ENV) or "RANK" not in os.environ:
        return
    set_death_signal = _death_signal_setter()
    if set_death_signal is None:
        return
    set_death_signal(signal.SIGKILL)
    try:  # our parent must still be the agent that `launch` started
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            alive = TORCHRUN.encode() in f.read()
    except OSError:
        alive = False
    if not alive:
        os._exit(1)


def _without_nproc(args: list[str]) -> list[str]:
    """``args`` less ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def command_argv() -> list[str]:
    """The arguments of this ``dpdm`` invocation: the command line, or for a worker that ``--nproc`` started (with
    no arguments of its own) the ones ``launch`` handed over in ``ARGV_ENV``."""
    argv = sys.argv[1:]
    if not argv and os.environ.get(ARGV_ENV):
        argv = json.loads(os.environ[ARGV_ENV])
    return argv
