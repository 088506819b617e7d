"""Progress reporting for long loops: a silent default and a rich progress bar (with ETA).

Bars only: the library's notes and warnings go through ``logging`` (loggers under ``dpdm``; the CLI shows them with
rich's handler, ``dpdm.cli.common.show_logs``)."""

from __future__ import annotations

import contextlib


class Task:
    """One bar: ``advance(n, **stats)`` moves it and shows the latest stats."""

    def advance(self, n: int = 1, **stats) -> None:
        pass


class Progress:
    """Silent progress: the default for library use."""

    @contextlib.contextmanager
    def task(self, description: str, total: int):
        yield Task()


class _RichTask(Task):
    def __init__(self, bar, task_id):
        self.bar, self.task_id = bar, task_id

    def advance(self, n: int = 1, **stats) -> None:
        shown = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items())
        self.bar.update(self.task_id, advance=n, stats=shown)


class RichProgress(Progress):
    """Rich progress bars with elapsed time, ETA and the latest stats, printing to ``console``."""

    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console(stderr=True)

    @contextlib.contextmanager
    def task(self, description: str, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as Bar

        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[stats]}")]
        with Bar(*columns, console=self.console, transient=False) as bar:
            yield _RichTask(bar, bar.add_task(description, total=total, stats=""))
