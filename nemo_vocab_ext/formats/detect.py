"""Which checkpoint format a path holds, or names: decided from names and a file's first bytes."""

from __future__ import annotations

import enum
from pathlib import Path

from ..errors import CheckpointFormatError


class Format(str, enum.Enum):
    NEMO = "nemo"
    CKPT = "ckpt"
    SAFETENSORS = "safetensors"
    HF = "hf"  # a Hugging Face model folder
    MEGATRON = "megatron"  # a Megatron-LM / Megatron-Bridge run folder, or one of its iteration folders

    def __str__(self) -> str:
        return self.value


def detect_format(path: str | Path) -> Format:
    p = Path(path)
    if not p.exists():
        raise CheckpointFormatError(f"{p}: no such file or folder")
    if p.is_dir():
        if (p / "config.json").is_file() and (
            (p / "model.safetensors.index.json").is_file() or (p / "model.safetensors").is_file()
        ):
            return Format.HF  # this package's own safetensors folders have no config.json
        if (p / "model.safetensors.index.json").is_file() or (p / "model.safetensors").is_file():
            return Format.SAFETENSORS
        from .megatron_run import looks_like_megatron_run  # here: it reads torch_dist's records

        if looks_like_megatron_run(p):  # before NeMo's folders: an iteration folder holds .metadata and common.pt too
            return Format.MEGATRON
        if (p / ".metadata").is_file() and (p / "common.pt").is_file():
            return Format.CKPT
        if (p / "model_config.yaml").is_file():
            return Format.NEMO  # an extracted .nemo
        if (p / "config.json").is_file():
            raise CheckpointFormatError(
                f"{p}: a Hugging Face model folder without model.safetensors or model.safetensors.index.json; "
                "save it with save_pretrained (safetensors, its default)"
            )
        raise CheckpointFormatError(
            f"{p}: a folder that is neither sharded safetensors, a NeMo distributed checkpoint nor a Megatron run"
        )
    if not p.is_file():  # a FIFO or device would block or never end
        raise CheckpointFormatError(f"{p}: not a regular file or folder")
    if p.suffix == ".safetensors":
        return Format.SAFETENSORS
    if p.suffix == ".ckpt":
        return Format.CKPT
    if p.suffix == ".nemo":
        return Format.NEMO
    with open(p, "rb") as f:
        head = f.read(512)
    if len(head) >= 262 and head[257:262] == b"ustar" or head[:2] == b"\x1f\x8b":
        return Format.NEMO
    raise CheckpointFormatError(f"{p}: unknown checkpoint type; expected .nemo, .ckpt or .safetensors")


def format_for_destination(dst: str | Path, to: Format | None, *, unnamed: Format | None = None) -> Format:
    """``to``, else the format ``dst``'s suffix names, else ``unnamed`` (a run folder's name has no suffix)."""
    if to is not None:
        return to
    suffix = Path(dst).suffix
    for fmt in Format:
        if suffix == f".{fmt.value}":
            return fmt
    if unnamed is not None:
        return unnamed
    choices = "|".join(f.value for f in Format)
    raise CheckpointFormatError(f"{dst}: cannot tell the output format from the name; pass --to {choices}")
