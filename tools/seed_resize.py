"""The seed's way of growing a .nemo's vocabulary, as a baseline for ``tools/bench.py``.

Extract the archive, ``torch.load`` the whole ``model_weights.ckpt``, ``torch.cat`` zero rows to
the embedding (and an untied output layer), ``torch.save`` it, and tar the folder again. Single-file
layout only (the distributed one has no ``model_weights.ckpt``); no tokenizer or config change,
so the baseline is the cheapest form of that approach.

    python tools/seed_resize.py SRC.nemo DST.nemo --rows 57344
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

TABLES = ("model.embedding.word_embeddings.weight", "model.output_layer.weight")


def seed_resize(src: Path, dst: Path, rows: int) -> None:
    work = Path(tempfile.mkdtemp(prefix=".seed_resize.", dir=dst.parent))
    try:
        subprocess.run(["tar", "xf", str(src), "-C", str(work)], check=True)
        weights = work / "model_weights.ckpt"
        state = torch.load(weights, map_location="cpu")
        for key in TABLES:
            if key in state:
                table = state[key]
                zeros = torch.zeros(rows - table.shape[0], table.shape[1], dtype=table.dtype)
                state[key] = torch.cat([table, zeros], dim=0)
        torch.save(state, weights)
        del state
        subprocess.run(["tar", "cf", str(dst), "-C", str(work), "."], check=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--rows", type=int, required=True, help="rows of the grown tables")
    args = p.parse_args(argv)
    seed_resize(args.src, args.dst, args.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
