"""Outputs that take their name only when complete: a failure or a kill leaves no partial file."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputExistsError


def refuse_existing(dst: Path, *, force: bool) -> None:
    """Fail before any work when ``dst`` exists and may not be replaced."""
    if dst.exists() and not force:
        raise OutputExistsError(f"{dst} exists; pass --force to overwrite it")


def _publish(tmp: Path, dst: Path, force: bool) -> None:
    """Rename ``tmp`` onto ``dst``; an existing ``dst`` is moved aside first and removed only afterwards."""
    refuse_existing(dst, force=force)  # again: it may have appeared while we worked
    if not dst.exists():
        os.replace(tmp, dst)
        return
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    os.replace(dst, old)
    os.replace(tmp, dst)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


@contextmanager
def atomic_output(dst: str | Path, *, force: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``dst`` (same file system); it takes ``dst``'s name only if the block succeeds.

    A failure or a kill leaves no partial ``dst`` (at most a hidden temporary, removed on errors).
    """
    dst = Path(dst)
    refuse_existing(dst, force=force)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    tmp = tmp_root / dst.name
    try:
        yield tmp
        _publish(tmp, dst, force)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
