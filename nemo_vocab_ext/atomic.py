"""Outputs that take their name only when complete: a failure or a kill leaves no partial file.

Every temporary this package makes carries its process id (``<stem>.<pid>.<random>.tmp``): a
process killed outright (SIGKILL) cannot remove its own, so the next run removes those whose
process is gone, beside the destination it writes and in the system's temporary folder.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import CheckpointFormatError, OutputExistsError
from .formats.detect import detect_format

SCRATCH_STEM = "nemo_vocab_ext"  # this package's folders in the system's temporary folder
_ASIDE = "aside"  # an existing destination moved aside while its replacement takes the name


def _temp_pattern(stem: str) -> re.Pattern[str]:
    return re.compile(re.escape(stem) + r"\.(\d+)\.([a-z0-9_]+)\.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale(folder: Path, stem: str, *, dst: Path | None = None) -> None:
    """Remove ``folder``'s temporaries named from ``stem`` whose process is gone.

    A destination moved aside by a process killed before its replacement took the name is put back.
    """
    pattern = _temp_pattern(stem)
    try:
        entries = list(folder.iterdir())
    except OSError:  # unreadable or missing: nothing of ours to find
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or _alive(int(match.group(1))):
            continue
        if dst is not None and match.group(2) == _ASIDE and not os.path.lexists(dst):
            os.replace(entry, dst)
        else:
            _remove(entry)


def temp_dir(folder: Path, stem: str) -> Path:
    """A new folder ``<stem>.<pid>.<random>.tmp`` in ``folder``."""
    return Path(tempfile.mkdtemp(prefix=f"{stem}.{os.getpid()}.", suffix=".tmp", dir=folder))


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """A folder in the system's temporary folder, removed afterwards (stale ones of dead processes first)."""
    root = Path(tempfile.gettempdir())
    remove_stale(root, SCRATCH_STEM)
    folder = temp_dir(root, SCRATCH_STEM)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def refuse_existing(dst: Path, *, force: bool) -> None:
    """Fail before any work when ``dst`` exists and may not be replaced.

    ``--force`` replaces a file, an empty folder, or a folder that holds a checkpoint or a tokenizer (what
    this package writes as folders); never another folder, whose contents would be deleted.
    """
    if not os.path.lexists(dst):
        return
    if not force:
        raise OutputExistsError(f"{dst} exists; pass --force to overwrite it")
    if dst.is_dir() and not dst.is_symlink() and not _holds_ours(dst):
        raise OutputExistsError(
            f"{dst} is a folder that holds no checkpoint or tokenizer; --force replaces only those: "
            "remove it or pick another name"
        )


def _holds_ours(folder: Path) -> bool:
    if next(folder.iterdir(), None) is None:  # an empty folder: replacing it loses nothing
        return True
    if any(folder.glob("*.model")) or any((folder / name).is_file() for name in ("vocab.json", "tokenizer.json")):
        return True
    try:
        detect_format(folder)
    except CheckpointFormatError:
        return False
    return True


def refuse_overlap(src: Path, dst: Path) -> None:
    """Fail before any work when writing ``dst`` would replace or write into ``src`` (the same file under
    another name, a link to it, one folder inside the other)."""
    source, target = src.resolve(), dst.resolve()
    if target == source or (dst.exists() and os.path.samefile(src, dst)):
        raise OutputExistsError(f"{dst} is the source {src}; write the output under another name")
    if source in target.parents:
        raise OutputExistsError(f"{dst} lies inside the source {src}; write the output outside it")
    if target in source.parents:
        raise OutputExistsError(f"the source {src} lies inside {dst}; writing {dst} would replace it")


def _publish(tmp: Path, dst: Path, force: bool) -> None:
    """Rename ``tmp`` onto ``dst``. A file is replaced in one step; an existing folder (or a file where a
    folder is written) is moved aside first and removed only afterwards."""
    refuse_existing(dst, force=force)  # again: it may have appeared while we worked
    dst_is_folder = dst.is_dir() and not dst.is_symlink()
    if not os.path.lexists(dst) or not (dst_is_folder or tmp.is_dir()):
        os.replace(tmp, dst)
        return
    aside = dst.with_name(f".{dst.name}.{os.getpid()}.{_ASIDE}.tmp")
    os.replace(dst, aside)
    os.replace(tmp, dst)
    _remove(aside)


@contextmanager
def atomic_output(dst: str | Path, *, force: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``dst`` (same file system); it takes ``dst``'s name only if the block succeeds.

    A failure leaves no partial ``dst`` and no temporary; a kill at most a hidden temporary, which the
    next run writing ``dst`` removes.
    """
    dst = Path(dst)
    refuse_existing(dst, force=force)
    dst.parent.mkdir(parents=True, exist_ok=True)
    stem = f".{dst.name}"
    remove_stale(dst.parent, stem, dst=dst)
    tmp_root = temp_dir(dst.parent, stem)
    tmp = tmp_root / dst.name
    try:
        yield tmp
        _publish(tmp, dst, force)
    except OSError as e:
        if e.filename is None and e.errno is not None:  # a write to an open file: say which output it was for
            raise OSError(e.errno, e.strerror, str(dst)) from e
        raise
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
