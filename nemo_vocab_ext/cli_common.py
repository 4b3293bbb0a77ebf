"""What every command shares: errors end as one line and an exit code; ``--debug`` shows the traceback."""

from __future__ import annotations

import contextlib
import errno
import functools
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click

from .core.keys import UnknownKeysError
from .errors import VocabExtError

F = TypeVar("F", bound=Callable[..., Any])


class OneLineError(click.ClickException):
    """``Error: <message>`` on stderr with the error's own exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(" ".join(message.split("\n")))
        self.exit_code = exit_code


def _root_flag(name: str) -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().params.get(name, False))


def error_message(e: BaseException) -> str:
    """One line for an error; memory and OS errors (a full disk, a denied permission) name what they can."""
    if isinstance(e, MemoryError) or isinstance(e, OSError) and e.errno == errno.ENOMEM:
        detail = f" ({e})" if isinstance(e, MemoryError) and str(e) else ""  # often without a message of its own
        return f"out of memory{detail}; free memory or run on a machine with more"
    if isinstance(e, OSError) and e.strerror:
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        return f"{where}: {e.strerror}" if where else e.strerror
    return str(e) or type(e).__name__


def report_errors(fn: F) -> F:
    """Map this package's errors (and memory and OS errors such as a full disk) to one line."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (VocabExtError, UnknownKeysError, OSError, MemoryError) as e:
            if _root_flag("debug"):
                raise
            raise OneLineError(error_message(e), getattr(e, "exit_code", 1)) from e

    return wrapper  # type: ignore[return-value]


def say(msg: str) -> None:
    """A note on stderr, silent with ``--quiet``."""
    if not _root_flag("quiet"):
        click.echo(msg, err=True)


@contextlib.contextmanager
def stages(total: int) -> Iterator[Callable[[str], None]]:
    """A progress bar over a command's steps on stderr; silent when stderr is no terminal or with --quiet."""
    if _root_flag("quiet") or not sys.stderr.isatty():
        yield lambda _: None
        return
    with click.progressbar(length=total, file=sys.stderr, show_eta=False, item_show_func=lambda s: s) as bar:
        done = [0]

        def advance(name: str) -> None:
            bar.update(1 if done[0] else 0, name)
            done[0] += 1

        yield advance
        bar.update(total - bar.pos, "done")
