"""Safe reading of .nemo tar archives: plain tar read in place, tar.gz streamed member by member."""

from __future__ import annotations

import shutil
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

from ..errors import CheckpointFormatError, UnsafeCheckpointError
from .byteio import FileRegion
from .untrusted import normalize_member, plain_member_name

_COPY_CHUNK = 1 << 20  # what a streamed member holds in memory at a time
_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


def _checked_name(path: Path, member: tarfile.TarInfo) -> str:
    """The member's plain name ("" for the root folder); refuses the whole archive rather than skip the member, as
    PEP 706's 'data' filter does: skipping silently would hide tampering."""
    if member.isdir() and normalize_member(member.name) == "":
        return ""
    name = plain_member_name(member.name, path)
    if member.issym() or member.islnk():
        raise UnsafeCheckpointError(f"{path}: member '{name}' is a link (to '{member.linkname}'); refusing the archive")
    if not (member.isfile() or member.isdir()):
        raise UnsafeCheckpointError(f"{path}: member '{name}' is not a regular file or folder; refusing it")
    return name


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


class NemoArchive:
    """An uncompressed .nemo archive opened for reading; members are read where they lie."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointFormatError(f"{self.path}: no such file")
        try:
            self._tar = tarfile.open(self.path, "r:")  # noqa: SIM115 - closed by close()
        except _READ_ERRORS:
            raise CheckpointFormatError(f"{self.path}: not a .nemo archive (neither tar nor tar.gz)") from None
        try:
            members = self._tar.getmembers()
        except _READ_ERRORS as e:
            self._tar.close()
            raise CheckpointFormatError(f"{self.path}: truncated or corrupt archive ({e}); re-copy the file") from e
        self.members: dict[str, tarfile.TarInfo] = {}
        for m in members:
            name = _checked_name(self.path, m)
            if name:
                self.members[name] = m

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> NemoArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def names(self) -> list[str]:
        return sorted(n for n, m in self.members.items() if m.isfile())

    def has(self, name: str) -> bool:
        member = self.members.get(plain_member_name(name, self.path))
        return member is not None and member.isfile()

    def _file(self, name: str) -> tarfile.TarInfo:
        member = self.members.get(plain_member_name(name, self.path))
        if member is None or not member.isfile():
            raise CheckpointFormatError(f"{self.path}: member '{name}' is missing")
        return member

    def read(self, name: str, *, max_bytes: int | None = None) -> bytes:
        member = self._file(name)
        if max_bytes is not None and member.size > max_bytes:
            raise CheckpointFormatError(f"{self.path}: member '{name}' is {member.size} bytes, over {max_bytes}")
        return self.region(name).read()

    def region(self, name: str) -> FileRegion:
        """Where a member's bytes lie in the archive file."""
        member = self._file(name)
        if member.offset_data + member.size > self.path.stat().st_size:
            raise CheckpointFormatError(f"{self.path}: member '{name}' is truncated; re-copy the file")
        return FileRegion(self.path, member.offset_data, member.size)


def extract_gzip(path: Path, out_dir: Path, wanted: Callable[[str], bool]) -> list[str]:
    """Stream a tar.gz archive once, checking every member, and write the ``wanted`` files into ``out_dir``
    chunk by chunk; other members are decompressed only to be skipped. Returns the names written."""
    written: list[str] = []
    try:
        with tarfile.open(path, "r|gz") as tar:
            for member in tar:
                name = _checked_name(path, member)
                if not (name and member.isfile() and wanted(name)):
                    continue
                dest = out_dir / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                reader = tar.extractfile(member)
                assert reader is not None  # regular files always give a reader
                with open(dest, "wb") as out:
                    shutil.copyfileobj(reader, out, _COPY_CHUNK)
                    size = out.tell()
                if size != member.size:
                    raise CheckpointFormatError(
                        f"{path}: member '{name}' is truncated ({size} of {member.size} bytes); re-copy the file"
                    )
                written.append(name)
    except _READ_ERRORS as e:
        raise CheckpointFormatError(f"{path}: truncated or corrupt archive ({e}); re-copy the file") from None
    return written
