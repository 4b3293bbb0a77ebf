"""Compare two checkpoints (or two folders of outputs) entry by entry: layout, config, artifacts, and
every entry's shape, dtype and bytes. Exit 0 when they are the same, 1 otherwise (each difference on
one line).

Two folders are compared name by name: a checkpoint (.nemo, .ckpt, .safetensors, a distributed
folder) as above, any other file byte for byte. Useful to show that a change of the code leaves
its outputs bit-identical::

    python tools/compare_checkpoints.py /tmp/before /tmp/after
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CHECKPOINT_SUFFIXES = (".nemo", ".ckpt", ".safetensors")


def entry_bytes(value: object) -> tuple[object, bytes]:
    """An entry's (shape and dtype, bytes); bytes entries and empty ones as they are."""
    from nemo_vocab_ext.entries import is_tensor, tensor_bytes

    if value is None:
        return None, b""
    if isinstance(value, bytes):
        return "bytes", value
    assert is_tensor(value)
    return (tuple(value.shape), str(value.dtype)), bytes(tensor_bytes(value.detach().cpu()))  # type: ignore[attr-defined]


def compare_checkpoints(a: Path, b: Path) -> list[str]:
    """Every difference between the checkpoints at ``a`` and ``b``."""
    from nemo_vocab_ext.io import load_checkpoint

    (left, left_fmt), (right, right_fmt) = load_checkpoint(a), load_checkpoint(b)
    out = []
    if left_fmt != right_fmt or left.layout != right.layout:
        out.append(f"{b}: {right_fmt}/{right.layout}, not {left_fmt}/{left.layout}")
    if left.config != right.config:
        keys = sorted(k for k in {*left.config, *right.config} if left.config.get(k) != right.config.get(k))
        out.append(f"{b}: config differs at {keys}")
    if left.artifacts != right.artifacts:
        out.append(f"{b}: artifacts differ ({sorted(left.artifacts)} vs {sorted(right.artifacts)})")
    if list(left.tensors) != list(right.tensors):
        out.append(f"{b}: entries differ: {sorted(set(left.tensors) ^ set(right.tensors))} (or their order)")
    for key in left.tensors:
        if key in right.tensors and entry_bytes(left.tensors[key]) != entry_bytes(right.tensors[key]):
            out.append(f"{b}: entry {key} differs")
    if (left.rank_tensors is None) != (right.rank_tensors is None):
        out.append(f"{b}: rank files differ")
    if left.training_state.keys() != right.training_state.keys():
        out.append(f"{b}: training state differs")
    return out


def is_checkpoint(path: Path) -> bool:
    return path.suffix in CHECKPOINT_SUFFIXES or (path.is_dir() and (path / ".metadata").is_file())


def compare(a: Path, b: Path) -> list[str]:
    """Differences between ``a`` and ``b``: two checkpoints, two files, or two folders of either."""
    if not b.exists():
        return [f"{b}: missing"]
    if is_checkpoint(a):
        return compare_checkpoints(a, b)
    if a.is_dir():
        names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
        return [line for name in names for line in compare(a / name, b / name)]
    return [] if a.read_bytes() == b.read_bytes() else [f"{b}: differs from {a}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    args = parser.parse_args()
    differences = compare(args.a, args.b)
    print("\n".join(differences) or "same")
    sys.exit(1 if differences else 0)


if __name__ == "__main__":
    main()
