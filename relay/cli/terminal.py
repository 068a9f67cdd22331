"""Talking to the person at the terminal: asking before a change, showing progress."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

import click

from relay.cli.exits import EXIT_ERROR, fail


def confirm(question: str) -> None:
    """Ask on the terminal; anything but yes (or no terminal to ask on) changes nothing."""
    try:
        ok = click.confirm(question, default=False, err=True)
    except click.Abort:
        click.echo(err=True)
        ok = False
    if not ok:
        fail(EXIT_ERROR, "not confirmed: nothing was changed (pass --yes to skip the question)")


@contextlib.contextmanager
def progress_bar(total: int, label: str, batch: int) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on stderr for long repairs, only when a person watches a terminal."""
    if total <= batch or not sys.stderr.isatty():
        yield None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield bar.update
