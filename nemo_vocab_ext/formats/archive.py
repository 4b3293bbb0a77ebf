"""Safe reading and atomic writing of .nemo tar archives."""

from __future__ import annotations

import posixpath
import tarfile
from pathlib import Path

from ..errors import CheckpointFormatError, UnsafeCheckpointError
from .region import FileRegion


def normalize_member(name: str) -> str:
    """``./model_config.yaml`` and ``model_config.yaml`` name the same member."""
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


def _check_member(path: Path, member: tarfile.TarInfo) -> None:
    # Refuse the whole archive rather than skip members, as PEP 706's 'data' filter does:
    # skipping silently would hide tampering.
    name = member.name
    if name.startswith("/") or posixpath.isabs(name) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeCheckpointError(f"{path}: member '{name}' has an absolute path; refusing the archive")
    if ".." in posixpath.normpath(name).split("/") or ".." in name.split("/"):
        raise UnsafeCheckpointError(f"{path}: member '{name}' points outside the archive ('..'); refusing it")
    if member.issym() or member.islnk():
        raise UnsafeCheckpointError(f"{path}: member '{name}' is a link (to '{member.linkname}'); refusing the archive")
    if not (member.isfile() or member.isdir()):
        raise UnsafeCheckpointError(f"{path}: member '{name}' is not a regular file or folder; refusing it")


class NemoArchive:
    """A .nemo archive opened for reading: plain tar, or tar.gz for archives older than NeMo 1.7."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointFormatError(f"{self.path}: no such file")
        self._tar = self._open()
        try:
            members = self._tar.getmembers()
        except (tarfile.TarError, EOFError, OSError) as e:
            self._tar.close()
            raise CheckpointFormatError(f"{self.path}: truncated or corrupt archive ({e}); re-copy the file") from e
        for m in members:
            _check_member(self.path, m)
        self.members = {normalize_member(m.name): m for m in members if normalize_member(m.name)}

    def _open(self) -> tarfile.TarFile:
        for mode in ("r:", "r:gz"):
            try:
                tar = tarfile.open(self.path, mode)  # noqa: SIM115 - closed by close()
                self.compressed = mode != "r:"
                return tar
            except (tarfile.TarError, EOFError, OSError):
                continue
        raise CheckpointFormatError(f"{self.path}: not a .nemo archive (neither tar nor tar.gz)")

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> NemoArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def names(self) -> list[str]:
        return sorted(self.members)

    def has(self, name: str) -> bool:
        return name in self.members

    def read(self, name: str) -> bytes:
        member = self.members.get(name)
        if member is None or not member.isfile():
            raise CheckpointFormatError(f"{self.path}: member '{name}' is missing")
        try:
            f = self._tar.extractfile(member)
            assert f is not None  # regular files always give a reader
            data = f.read()
        except (tarfile.TarError, EOFError, OSError) as e:
            raise CheckpointFormatError(f"{self.path}: member '{name}' is truncated ({e}); re-copy the file") from e
        if len(data) != member.size:
            raise CheckpointFormatError(
                f"{self.path}: member '{name}' is truncated ({len(data)} of {member.size} bytes); re-copy the file"
            )
        return data

    def region(self, name: str) -> FileRegion:
        """Where a member's bytes lie in the archive file (uncompressed archives only)."""
        member = self.members.get(name)
        if member is None or not member.isfile():
            raise CheckpointFormatError(f"{self.path}: member '{name}' is missing")
        assert not self.compressed, "compressed archives have no byte regions; extract them"
        if member.offset_data + member.size > self.path.stat().st_size:
            raise CheckpointFormatError(f"{self.path}: member '{name}' is truncated; re-copy the file")
        return FileRegion(self.path, member.offset_data, member.size)

    def extract_all(self, out_dir: Path) -> None:
        """Extract every file member into ``out_dir`` (members were checked on open)."""
        for name, member in self.members.items():
            if member.isfile():
                dest = out_dir / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(self.read(name))
