"""Session fixtures: tiny tokenizers, and tiny ``.nemo`` models built once with real NeMo on the CPU.

NeMo runs in subprocesses (:mod:`harness.make_model` and ``.restore``) forked from
servers that import NeMo once: its imports take ~15 s, and its CPU patches must not leak into the
test process. Tests that use the ``.nemo`` fixtures or ``restore_nemo`` are marked
``@pytest.mark.nemo``.
"""

from __future__ import annotations

import hashlib
import itertools
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from harness.tiny import ForkServer, NemoRunError, cpu_env, offline_hf_home
from nemo_vocab_ext.cli import main
from nemo_vocab_ext.tokenization.train import train_bpe

BASE_VOCAB = 500  # padded to 512 rows (make_vocab_size_divisible_by=128)
LARGER_VOCAB = 700  # padded to 768 rows

# name -> make_model flags; every model is built from base_tokenizer, each with its own seed.
NEMO_MODELS: dict[str, list[str]] = {
    "tied_dist": [],
    "untied_dist": ["--untied"],
    "tied_single": ["--single-file"],
    "untied_single": ["--untied", "--single-file"],
}

RestoreJob = tuple[Path, Path | None]


def english_texts() -> list[str]:
    """Python's own documentation topics: a pip-free English corpus (about 460 kB)."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def saved_state_path(nemo: Path) -> Path:
    """Where a fixture model's ``make_model --dump`` (its tensors as saved) lies."""
    return nemo.with_name(nemo.stem + ".saved.pt")


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of a file, or of every file under a folder, by path relative to ``path``."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@contextmanager
def sources_unchanged(*paths: Path) -> Iterator[None]:
    """Fails when a byte of ``paths`` (files or folders) differs after the block, or one is gone or added."""
    before = {p: tree_digest(p) for p in paths}
    yield
    for path, digest in before.items():
        assert path.exists() and tree_digest(path) == digest, f"{path} was modified"


def dead_pid() -> int:
    """The id of a process that has ended: what a killed run's temporaries carry."""
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


CLI_WRITERS = ("convert", "resize")  # commands whose second argument is their output


def invoke_cli(*args: object, catch_exceptions: bool = True) -> Result:
    """The CLI in this process; every existing path it is given, other than its output, is checked
    unchanged afterwards (the source of a write is never modified)."""
    output = args[2] if args[0] in CLI_WRITERS else None
    sources = [a for a in args[1:] if isinstance(a, Path) and a.exists() and a != output]
    with sources_unchanged(*sources):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=catch_exceptions)


def _raise_first(errors: Sequence[NemoRunError | None]) -> None:
    for error in errors:
        if error is not None:
            raise error


@pytest.fixture(scope="session")
def base_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with ``vocab.json`` and ``merges.txt``: a 500-token GPT-2 byte-level BPE, ``<|endoftext|>`` = 0."""
    return train_bpe(english_texts(), tmp_path_factory.mktemp("tok_base"), BASE_VOCAB)


@pytest.fixture(scope="session")
def larger_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 700-token BPE of the same corpus: its first 500 tokens and merges are ``base_tokenizer``'s."""
    return train_bpe(english_texts(), tmp_path_factory.mktemp("tok_larger"), LARGER_VOCAB)


@pytest.fixture(scope="session")
def nemo_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for NeMo subprocesses: CPU only, Hugging Face hub offline."""
    return cpu_env(offline_hf_home(tmp_path_factory.mktemp("hf_home")))


@pytest.fixture(scope="session")
def nemo_models(
    restore_nemo: NemoRestorer, tmp_path_factory: pytest.TempPathFactory, base_tokenizer: Path, nemo_env: dict[str, str]
) -> dict[str, Path]:
    """Every model of ``NEMO_MODELS``, built on first use: name -> ``.nemo`` path.

    Tiny mcore GPTs (2 layers, hidden 64, 500 tokens in 512 rows) with megatron's random init.
    Requests ``restore_nemo`` first only to start its server: it imports NeMo on the second core
    while the models build, since nearly every user of these models restores them.
    """
    root = tmp_path_factory.mktemp("nemo_models")
    outs: dict[str, Path] = {}
    jobs = []
    for seed, (name, flags) in enumerate(NEMO_MODELS.items(), start=1):
        out = outs[name] = root / name / f"{name}.nemo"  # save_to uses the output's folder as scratch: one each
        args = ["--vocab-dir", str(base_tokenizer), "--out", str(out), "--dump", str(saved_state_path(out))]
        jobs.append(([*args, *flags, "--seed", str(seed)], out.parent))
    server = ForkServer.for_module("harness.make_model", nemo_env, root)
    try:
        _raise_first(server.run(jobs))
    finally:
        server.close()
    return outs


@pytest.fixture(scope="session")
def nemo_tied_dist(nemo_models: dict[str, Path]) -> Path:
    """Tied embeddings, distributed layout (``model_weights/``)."""
    return nemo_models["tied_dist"]


@pytest.fixture(scope="session")
def nemo_untied_dist(nemo_models: dict[str, Path]) -> Path:
    """Own ``model.output_layer.weight``, distributed layout."""
    return nemo_models["untied_dist"]


@pytest.fixture(scope="session")
def nemo_tied_single(nemo_models: dict[str, Path]) -> Path:
    """Tied embeddings, single-file layout (``model_weights.ckpt``) of an mcore model."""
    return nemo_models["tied_single"]


@pytest.fixture(scope="session")
def nemo_untied_single(nemo_models: dict[str, Path]) -> Path:
    """Own ``model.output_layer.weight``, single-file layout."""
    return nemo_models["untied_single"]


@pytest.fixture(scope="session")
def saved_state() -> Callable[[Path], dict]:
    """``saved_state(fixture_nemo) -> dict``: the fixture model's tensors and sizes as it saved them.

    Same format as a ``restore_nemo`` result: ``{"state_dict", "vocab_size", "padded_vocab_size"}``.
    """
    return lambda nemo: torch.load(saved_state_path(nemo))


class NemoRestorer:
    """Restores ``.nemo`` files with real NeMo (``harness.restore``), each in a process of its own.

    ``restorer(path, vocab_dir=None)`` returns the dump ``{"state_dict": {name: tensor},
    "vocab_size", "padded_vocab_size"}`` and raises :class:`NemoRunError` (``.log`` holds NeMo's
    output) when the restore fails; ``restorer.many(jobs)`` returns each dump or error. The
    processes are forked from one server that imports NeMo once, so a restore takes about a second.
    TP=1 only: restore at TP=2 with ``torchrun`` (see ``harness.tiny.run_concurrently``).
    """

    def __init__(self, root: Path, env: dict[str, str]):
        self.root = root
        self.server = ForkServer.for_module("harness.restore", env, root)
        self._ids = itertools.count()

    def __call__(self, path: Path, vocab_dir: Path | None = None) -> dict:
        (result,) = self.many([(path, vocab_dir)])
        if isinstance(result, NemoRunError):
            raise result
        return result

    def many(self, jobs: Sequence[RestoreJob]) -> list[dict | NemoRunError]:
        runs = []
        for path, vocab_dir in jobs:
            folder = self.root / f"restore_{next(self._ids)}"
            args = ["--nemo", str(path), "--dump", str(folder / "dump.pt")]
            if vocab_dir is not None:
                args += ["--vocab-dir", str(vocab_dir)]
            runs.append((args, folder))
        errors = self.server.run(runs)
        return [error or torch.load(folder / "dump.pt") for (_, folder), error in zip(runs, errors, strict=True)]


@pytest.fixture(scope="session")
def restore_nemo(tmp_path_factory: pytest.TempPathFactory, nemo_env: dict[str, str]) -> Iterator[NemoRestorer]:
    """``restore_nemo(path, vocab_dir=None) -> dict``; ``restore_nemo.many([(path, vocab_dir), ...])``.

    Its server starts importing NeMo as soon as the fixture is set up.
    """
    restorer = NemoRestorer(tmp_path_factory.mktemp("restores"), nemo_env)
    yield restorer
    restorer.server.close()
