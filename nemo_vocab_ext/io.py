"""Format detection and the one entry point to load and save any supported checkpoint."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path

from .atomic import atomic_output
from .checkpoint import HF_LAYOUT, Checkpoint, Value
from .entries import Entries, held, is_tensor, tensor_meta
from .errors import CheckpointFormatError, UnsupportedError
from .formats.detect import Format, detect_format
from .vocab import check_model_config


def load_checkpoint(path: str | Path, fmt: Format | None = None) -> tuple[Checkpoint, Format]:
    """Read any supported checkpoint; ``fmt`` skips detection (for outputs whose name does not tell)."""
    fmt = fmt or detect_format(path)
    ckpt = _read(Path(path), fmt)
    check_model_config(ckpt.config)
    return ckpt, fmt


def _read(path: Path, fmt: Format) -> Checkpoint:
    if fmt is Format.NEMO:
        from .formats.nemo import read_nemo

        return read_nemo(path)
    if fmt is Format.CKPT:
        from .formats.lightning import read_lightning

        return read_lightning(path)
    if fmt is Format.HF:
        from .formats.hf_folder import read_hf_folder

        return read_hf_folder(path)
    if fmt is Format.MEGATRON:
        from .formats.megatron_run import read_megatron_run

        return read_megatron_run(path)
    from .formats.safetensors_io import read_safetensors

    return read_safetensors(path)


def _write(ckpt: Checkpoint, path: Path, fmt: Format) -> None:
    if fmt is Format.NEMO:
        from .formats.nemo import write_nemo

        write_nemo(ckpt, path)
    elif fmt is Format.CKPT:
        from .formats.lightning import write_lightning

        write_lightning(ckpt, path)
    elif fmt is Format.HF:
        from .formats.hf_folder import write_hf_folder

        write_hf_folder(ckpt, path)
    elif fmt is Format.MEGATRON:
        from .formats.megatron_run import write_megatron_run

        write_megatron_run(ckpt, path)
    else:
        from .formats.safetensors_io import write_safetensors

        write_safetensors(ckpt, path)


def _same(a: Value, b: Value) -> bool:
    if is_tensor(a) and is_tensor(b):
        import torch

        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        # Bitwise, so NaNs compare equal to themselves and -0.0 differs from 0.0.
        bits = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in (a, b)]
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(*bits)
    return type(a) is type(b) and a == b


def _shape_of(entries: Mapping[str, Value], key: str) -> object:
    """What a reader knows of an entry without reading it: shape and dtype, or that it is a blob or empty."""
    meta = tensor_meta(entries, key)
    if meta is not None:
        return meta
    return "empty" if held(entries, key) is None else "blob"


def verify_written(expected: Checkpoint, written: Checkpoint, where: Path, *, bitwise: bool) -> None:
    """Every entry of ``expected`` is in ``written`` with its shape and dtype, and the config is unchanged;
    with ``bitwise``, every entry is also read back and compared bit for bit (one entry in memory at a time)."""
    missing = [k for k in expected.tensors if k not in written.tensors]
    if missing:
        raise CheckpointFormatError(f"{where}: written file lacks {len(missing)} entries, first '{missing[0]}'")
    for key in expected.tensors:
        if _shape_of(expected.tensors, key) != _shape_of(written.tensors, key):
            raise CheckpointFormatError(f"{where}: entry '{key}' has another shape or type after writing; not kept")
        if bitwise and not _same(expected.tensors[key], written.tensors[key]):
            raise CheckpointFormatError(f"{where}: entry '{key}' differs after writing; the output was not kept")
    if expected.config != written.config or expected.artifacts != written.artifacts:
        raise CheckpointFormatError(f"{where}: config or artifacts differ after writing; the output was not kept")


Stage = Callable[[str], None]


def no_stage(_: str) -> None:
    pass


def save_checkpoint(
    ckpt: Checkpoint,
    dst: str | Path,
    fmt: Format,
    *,
    force: bool = False,
    verify: bool = False,
    stage: Stage = no_stage,
) -> None:
    """Write atomically; the output takes its name only after it is read back and checked.

    The check covers every entry's presence, shape and dtype, and the config and artifacts;
    ``verify`` also compares every entry's bytes (a second read of input and output).
    ``stage`` is told when each step starts (for a progress display).
    """
    if (ckpt.layout == HF_LAYOUT) != (fmt is Format.HF):
        raise UnsupportedError(
            f"{dst}: Hugging Face model folders are written only as Hugging Face model folders; "
            "use NeMo's Hugging Face importers and exporters to convert"
        )
    with atomic_output(dst, force=force) as tmp:
        stage(f"writing {fmt}")
        _write(ckpt, tmp, fmt)
        stage("reading back")
        written, _ = load_checkpoint(tmp, fmt)
        stage("verifying")
        verify_written(ckpt, written, Path(dst), bitwise=verify)


def convert_checkpoint(
    src: Path,
    dst: Path,
    fmt: Format,
    *,
    layout: str | None = None,
    force: bool = False,
    verify: bool = False,
    stage: Stage = no_stage,
) -> tuple[Checkpoint, Format]:
    """What ``convert`` does: ``src`` written to ``dst`` as ``fmt`` (weights only unless ``fmt`` keeps
    training state), in ``layout`` if given; returns what was written and the source's format. A
    checkpoint without a vocabulary table this tool knows is refused: it holds no model the tool handles."""
    from .atomic import refuse_existing, refuse_overlap

    refuse_overlap(src, dst)
    refuse_existing(dst, force=force)
    stage("reading")
    loaded, src_fmt = load_checkpoint(src)
    loaded.vocab_keys()
    loaded = weights_for(loaded, fmt)
    if layout is not None:
        from .layout import change_layout  # torch: layers are stacked or split

        loaded = change_layout(loaded, layout)
    save_checkpoint(loaded, dst, fmt, force=force, verify=verify, stage=stage)
    return loaded, src_fmt


def weights_for(ckpt: Checkpoint, fmt: Format) -> Checkpoint:
    """What a file of ``fmt`` keeps of ``ckpt``: optimizer state belongs to training checkpoints (.ckpt, a
    Megatron run) only."""
    if fmt in (Format.CKPT, Format.MEGATRON):
        return ckpt
    return select(ckpt, lambda key: not key.startswith("optimizer."))


def select(ckpt: Checkpoint, keep: Callable[[str], bool]) -> Checkpoint:
    """The same checkpoint with only the entries whose key passes ``keep`` (nothing is read)."""
    return dataclasses.replace(ckpt, tensors=Entries({k: held(ckpt.tensors, k) for k in ckpt.tensors if keep(k)}))
