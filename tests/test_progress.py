"""Long loops show progress in a log file too, not only on a terminal."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import Progress

from msn.progress import LogProgress, progress


def _log_console() -> Console:
    return Console(file=io.StringIO(), force_terminal=False)


def test_log_file_gets_plain_lines_with_counts_and_fields():
    console = _log_console()
    bar = progress("bench", console=console, fields="{speedups}", every=0)
    assert isinstance(bar, LogProgress)
    with bar:
        task = bar.add_task("bench", total=3, speedups="warming up")
        bar.update(task, advance=1, speedups="tr-jacobi 1.50x")
        bar.update(task, advance=2, description="done", speedups="tr-jacobi 1.40x")
    lines = console.file.getvalue().splitlines()
    assert lines[0].startswith("bench bench 1/3 0:00 tr-jacobi 1.50x")
    assert lines[1].startswith("bench done 3/3 0:00 tr-jacobi 1.40x")


def test_lines_are_throttled_but_the_last_one_always_shows():
    console = _log_console()
    with progress("HumanEval", console=console, every=3600) as bar:
        task = bar.add_task("", total=5)
        for i in range(5):
            bar.update(task, advance=1, description=f"ar: {i + 1}/{i + 1} passed")
    assert console.file.getvalue().splitlines() == ["HumanEval ar: 5/5 passed 5/5 0:00"]


def test_terminal_gets_rich_and_disabled_prints_nothing():
    assert isinstance(progress("x", console=Console(file=io.StringIO(), force_terminal=True)), Progress)
    quiet = _log_console()
    with progress("x", console=quiet, enabled=False) as bar:
        bar.update(bar.add_task("", total=1), advance=1)
    assert quiet.file.getvalue() == ""
