"""Checkpoint folders: read from disk (:class:`InFolder`), or written to disk or into a tar archive as a stream.

Writing a .nemo straight into its tar (instead of into a folder that is then archived) writes every
byte once. A member's size is only known once its data is written, so its header is written with
size 0 first and rewritten in place afterwards (the GNU header's length does not depend on the size).
"""

from __future__ import annotations

import abc
import os
import stat
import tarfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import BinaryIO

from ..errors import CheckpointFormatError, UnsafeCheckpointError
from .byteio import FileRegion, OutFile
from .untrusted import plain_member_name

_BLOCK = tarfile.BLOCKSIZE


class InFolder:
    """A checkpoint folder on disk, read like an archive: its regular files by plain member name.

    A link or special file anywhere in it refuses the whole folder: a link's target can lie outside
    it, and a FIFO never ends.
    """

    def __init__(self, path: Path, *, shown_as: Path | None = None):
        self.path = path
        self.shown_as = shown_as or path  # what messages name: a temporary folder stands for its archive
        self._sizes: dict[str, int] = {}

        def fail(error: OSError) -> None:
            raise CheckpointFormatError(f"{path}: cannot list the folder ({error.strerror})") from None

        shown = self.shown_as
        for root, dirs, files in os.walk(path, onerror=fail):
            for name in sorted(dirs + files):
                full = Path(root, name)
                rel = full.relative_to(path).as_posix()
                mode = full.lstat().st_mode
                if stat.S_ISLNK(mode):
                    raise UnsafeCheckpointError(
                        f"{shown}: '{rel}' is a link (to '{os.readlink(full)}'); refusing the folder"
                    )
                if stat.S_ISREG(mode):
                    self._sizes[plain_member_name(rel, shown)] = full.stat().st_size
                elif not stat.S_ISDIR(mode):
                    raise UnsafeCheckpointError(
                        f"{shown}: '{rel}' is not a regular file or folder; refusing the folder"
                    )

    def __enter__(self) -> InFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def names(self) -> list[str]:
        return sorted(self._sizes)

    def has(self, name: str) -> bool:
        return plain_member_name(name, self.shown_as) in self._sizes

    def _known(self, name: str) -> str:
        plain = plain_member_name(name, self.shown_as)
        if plain not in self._sizes:
            raise CheckpointFormatError(f"{self.shown_as}: '{name}' is missing")
        return plain

    def read(self, name: str, *, max_bytes: int | None = None) -> bytes:
        region = self.region(name)
        if max_bytes is not None and region.length > max_bytes:
            raise CheckpointFormatError(f"{self.shown_as}: '{name}' is {region.length} bytes, over {max_bytes}")
        return region.read()

    def region(self, name: str) -> FileRegion:
        plain = self._known(name)
        return FileRegion(self.path / plain, 0, self._sizes[plain])


class OutFolder(abc.ABC):
    """A folder being written."""

    @abc.abstractmethod
    def file(self, name: str) -> AbstractContextManager[OutFile]:
        """A new file ``name`` in this folder, open for streaming writes."""

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.file(name) as out:
            out.write(data)

    @abc.abstractmethod
    def folder(self, name: str) -> OutFolder:
        """A subfolder."""


class DirOut(OutFolder):
    def __init__(self, path: Path):
        self.path = path

    def __str__(self) -> str:
        return str(self.path)

    @contextmanager  # type: ignore[override]
    def file(self, name: str) -> Iterator[OutFile]:
        with open(self.path / name, "wb") as f:
            yield OutFile(f)

    def folder(self, name: str) -> DirOut:
        (self.path / name).mkdir(parents=True, exist_ok=True)
        return DirOut(self.path / name)


class TarWriter:
    """An uncompressed tar written front to back, members named ``./<name>`` as NeMo names them."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self._dirs: set[str] = set()

    def _header(self, name: str, size: int, *, directory: bool = False) -> bytes:
        info = tarfile.TarInfo("./" + name if name else ".")
        info.size = size
        info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
        info.mode = 0o755 if directory else 0o644
        info.mtime = 0  # reproducible archives
        return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")

    def _ensure_parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(len(parts) + 1):
            folder = "/".join(parts[:i])
            if folder not in self._dirs:
                self._dirs.add(folder)
                self._f.write(self._header(folder + "/" if folder else "", 0, directory=True))

    @contextmanager
    def member(self, name: str) -> Iterator[OutFile]:
        self._ensure_parents(name)
        header_at = self._f.tell()
        header = self._header(name, 0)
        self._f.write(header)
        data_at = self._f.tell()
        yield OutFile(self._f, base=data_at)
        self._f.seek(0, 2)
        size = self._f.tell() - data_at
        self._f.write(b"\0" * (-size % _BLOCK))
        end = self._f.tell()
        final = self._header(name, size)
        assert len(final) == len(header)  # GNU headers: the size field never changes the length
        self._f.seek(header_at)
        self._f.write(final)
        self._f.seek(end)

    def close(self) -> None:
        self._f.write(b"\0" * (2 * _BLOCK))
        self._f.write(b"\0" * (-self._f.tell() % tarfile.RECORDSIZE))
        self._f.flush()


class TarOut(OutFolder):
    """A folder inside a tar being written."""

    def __init__(self, tar: TarWriter, prefix: str = ""):
        self.tar = tar
        self.prefix = prefix

    def __str__(self) -> str:
        return self.prefix or "."

    def file(self, name: str) -> AbstractContextManager[OutFile]:
        return self.tar.member(self.prefix + name)

    def folder(self, name: str) -> TarOut:
        return TarOut(self.tar, f"{self.prefix}{name}/")


@contextmanager
def tar_out(dst: Path) -> Iterator[TarOut]:
    """Write a tar archive at ``dst`` through a :class:`TarOut` (callers make it atomic)."""
    with open(dst, "wb") as f:
        writer = TarWriter(f)
        yield TarOut(writer)
        writer.close()
