"""Megatron-LM and Megatron-Bridge run folders (torch_dist): read, and written as a new run folder
whose unchanged data files are hard links of the source's (:func:`write_megatron_run`).

A run folder holds ``latest_checkpointed_iteration.txt`` (an iteration number, or ``release``) and
one folder per saved iteration, ``iter_<7 digits>/`` (``release/``), each a torch_dist checkpoint:
``.metadata``, ``__<rank>_<n>.distcp``, ``common.pt`` and ``metadata.json``. Megatron-LM pickles its
``args`` (an ``argparse.Namespace``) into ``common.pt``; Megatron-Bridge writes no args but a
``run_config.yaml`` beside it. Both may copy the tokenizer files into ``<iteration>/tokenizer/``.
Model keys carry no prefix (``embedding.word_embeddings.weight``), unlike a ``.nemo``'s.
See docs/megatron-run-folders.md for where each fact comes from.
"""

from __future__ import annotations

import argparse
import functools
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import DISTRIBUTED, NEMO_REF, Checkpoint, artifact_name, artifact_named
from ..core.keys import MEGATRON
from ..entries import Entries, tensor_meta
from ..errors import CheckpointFormatError, ConfigError, UnsafeCheckpointError, UnsupportedError
from .byteio import FileRegion
from .dcp_records import Opaque
from .folder import InFolder
from .torch_dist import COMMON_FILE, DATA_FILE, METADATA_FILE, METADATA_JSON, open_torch_dist, write_torch_dist
from .torch_pickle import register_name
from .torch_zip import read_torch_file, torch_file_bytes
from .untrusted import MAX_CONFIG_BYTES, check_config, check_config_text

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RELEASE = "release"
TOKENIZER_DIR = "tokenizer"
RUN_CONFIG = "run_config.yaml"  # Megatron-Bridge
EMBEDDING_KEY = "embedding.word_embeddings.weight"
OUTPUT_LAYER_KEY = "output_layer.weight"
_ITERATION_DIR = re.compile(r"iter_(\d{7,})")
_ITERATION = re.compile(r"[0-9]{1,18}")  # ASCII digits (str.isdigit takes '¹'), within int64
# Megatron-LM's default for --make-vocab-size-divisible-by.
DEFAULT_DIVISIBLE_BY = 128
# Tokenizer files as Megatron-LM and Megatron-Bridge copy them into <iteration>/tokenizer/, by the
# config key this project's tokenizer loader reads them under.
_TOKENIZER_FILES = {"vocab.json": "vocab_file", "merges.txt": "merge_file", "tokenizer.model": "model"}


def iteration_folder_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


@dataclass(frozen=True)
class RunIteration:
    """One saved iteration of a run: its folder, its number (None for ``release``), the tracker that named it."""

    folder: Path
    iteration: int | None
    tracker: Path | None = None


def _refuse_special(path: Path) -> None:
    """A run's file outside its iteration folder must be a regular file: a link's target can lie
    anywhere, and a FIFO never ends."""
    if path.is_symlink() or (path.exists() and not stat.S_ISREG(path.stat().st_mode)):
        raise UnsafeCheckpointError(f"{path}: a link or not a regular file; refusing the run folder")


def _read_tracker(tracker: Path) -> int | None:
    _refuse_special(tracker)
    try:
        text = tracker.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointFormatError(f"{tracker}: unreadable ({exc})") from None
    if text == RELEASE:
        return None
    if not _ITERATION.fullmatch(text):
        raise CheckpointFormatError(f"{tracker}: expected an iteration number or 'release', found {text[:40]!r}")
    return int(text)


def find_iteration(path: str | Path) -> RunIteration:
    """The iteration a run folder's tracker names, or the iteration folder itself when given one.

    Refuses a tracker naming an iteration whose folder is missing, and a run folder without a tracker
    (Megatron then finds no checkpoint either); name the ``iter_*`` folder to read another one.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointFormatError(f"{path}: no such folder")
    tracker = path / TRACKER_FILE
    if tracker.is_file():
        iteration = _read_tracker(tracker)
        folder = path / (RELEASE if iteration is None else iteration_folder_name(iteration))
        if not folder.is_dir():
            raise CheckpointFormatError(
                f"{tracker}: names {folder.name}, but {folder} is missing; the run folder is incomplete "
                f"(pass one of its iter_* folders to read another iteration)"
            )
        return RunIteration(folder, iteration, tracker)
    if (path / METADATA_FILE).is_file() or (path / COMMON_FILE).is_file():
        match = _ITERATION_DIR.fullmatch(path.name)
        return RunIteration(path, int(match.group(1)) if match else None)
    saved = sorted(p.name for p in path.glob("iter_*") if p.is_dir())
    if saved:
        raise CheckpointFormatError(
            f"{path}: no {TRACKER_FILE} to say which iteration is the checkpoint; pass one of its folders "
            f"({', '.join(saved[-3:])})"
        )
    raise CheckpointFormatError(f"{path}: neither a Megatron run folder ({TRACKER_FILE}) nor an iteration folder")


def is_megatron_run(path: str | Path) -> bool:
    """A run folder (it has a tracker) or one of its iteration folders (named ``iter_*``/``release``,
    or holding Bridge's ``run_config.yaml``), as opposed to NeMo's torch_dist folders."""
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / TRACKER_FILE).is_file():
        return True
    named = _ITERATION_DIR.fullmatch(p.name) is not None or p.name == RELEASE
    return (p / METADATA_FILE).is_file() and (named or (p / RUN_CONFIG).is_file())


def looks_like_megatron_run(path: Path) -> bool:
    """:func:`is_megatron_run`, or a folder of ``iter_*`` folders without its tracker (read to say so)."""
    return is_megatron_run(path) or any(_ITERATION_DIR.fullmatch(p.name) and p.is_dir() for p in path.glob("iter_*"))


# --- common.pt -------------------------------------------------------------------------------


class MegatronEnum(Opaque):
    """A megatron enum member among the args (``AttnBackend.auto``): its value kept, and written back
    as the same member, so a ``common.pt`` read here can be saved again for megatron to load."""

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        return type(self), self.args


@functools.cache
def _enum_standin(module: str, name: str) -> type:
    standin = type(name, (MegatronEnum,), {"__module__": module})
    register_name(standin, module, name)  # written under megatron's name, without importing megatron
    return standin


def _common_global(module: str, name: str) -> Any:
    """What Megatron-LM's ``common.pt`` holds beyond a NeMo file: its ``args`` Namespace (inert: unpickling
    sets attributes, runs no code) and megatron's enums among the args (``AttnBackend``...), kept opaque."""
    if (module, name) == ("argparse", "Namespace"):
        return argparse.Namespace
    if module.startswith("megatron.") and module.rsplit(".", 1)[-1] == "enums":
        return _enum_standin(module, name)
    return None


def read_common(folder: Path) -> dict[str, Any]:
    """``common.pt`` of an iteration folder: every non-sharded entry of the saved dict (tensors stay in the file)."""
    path = folder / COMMON_FILE
    if not path.is_file():
        raise CheckpointFormatError(
            f"{folder}: {COMMON_FILE} is missing; not a complete Megatron torch_dist checkpoint (an interrupted save?)"
        )
    common = read_torch_file(FileRegion(path, 0, path.stat().st_size), what=str(path), also_allowed=_common_global)
    if not isinstance(common, dict):
        raise CheckpointFormatError(f"{path}: expected a dict, found {type(common).__name__}")
    return _args_checked(common, path)


def _args_checked(common: dict[str, Any], where: object) -> dict[str, Any]:
    """``common`` once its args, the run's config, are bounded as any model config is (the unpickler
    bounds the nesting of containers, not of a Namespace's values; writing them recurses)."""
    args = common.get("args")
    if isinstance(args, argparse.Namespace):
        check_config(vars(args), where)
    return common


def common_with_vocab_rows(common: dict[str, Any], rows: int, vocab_size: int | None = None) -> bytes:
    """``common.pt`` for a checkpoint whose tables now have ``rows`` rows: Megatron-LM's ``args.padded_vocab_size``
    updated (with ``--use-checkpoint-args`` it wins over the size the tokenizer gives), and ``args.vocab_size``
    where the run set one (tokenizers without files), all else as read."""
    args = common.get("args")
    if not isinstance(args, argparse.Namespace):
        return torch_file_bytes(common)
    updated = argparse.Namespace(**vars(args))
    if getattr(args, "padded_vocab_size", None) is not None:  # kept unset, as the config read from it
        updated.padded_vocab_size = rows
    if getattr(args, "vocab_size", None) is not None and vocab_size is not None:
        updated.vocab_size = vocab_size
    return torch_file_bytes({**common, "args": updated})


# --- config --------------------------------------------------------------------------------


def _tokenizer_config(tokenizer_type: Any, model: Any, vocab_file: Any, merge_file: Any) -> dict[str, Any]:
    """Megatron's tokenizer settings as a NeMo ``tokenizer`` section (paths as recorded on the training machine)."""
    tok: dict[str, Any] = {"type": tokenizer_type}
    if tokenizer_type == "GPT2BPETokenizer":
        tok.update(library="megatron", type="GPT2BPETokenizer")
    elif tokenizer_type == "HuggingFaceTokenizer":
        tok.update(library="huggingface", type=model)
    elif tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        tok["library"] = "sentencepiece"
    tok.update(model=model, vocab_file=vocab_file, merge_file=merge_file)
    return {k: v for k, v in tok.items() if v is not None}


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Megatron-LM's args under the model-config keys the rest of the project reads."""

    def arg(name: str, default: Any = None) -> Any:
        value = getattr(args, name, None)
        return default if value is None else value

    return {
        "num_layers": arg("num_layers"),
        "hidden_size": arg("hidden_size"),
        "ffn_hidden_size": arg("ffn_hidden_size"),
        "num_attention_heads": arg("num_attention_heads"),
        "max_position_embeddings": arg("max_position_embeddings"),
        "encoder_seq_length": arg("seq_length"),
        # As stored: the loader's check_model_config refuses what is not a positive whole number.
        "make_vocab_size_divisible_by": arg("make_vocab_size_divisible_by", DEFAULT_DIVISIBLE_BY),
        "tensor_model_parallel_size": arg("tensor_model_parallel_size", 1),
        "pipeline_model_parallel_size": arg("pipeline_model_parallel_size", 1),
        "share_embeddings_and_output_weights": not arg("untie_embeddings_and_output_weights", False),
        # The rows Megatron built; not an override: a resize recomputes them for the new tokenizer.
        "padded_vocab_size": arg("padded_vocab_size"),
        "vocab_size": arg("vocab_size"),
        "tokenizer": _tokenizer_config(
            arg("tokenizer_type"), arg("tokenizer_model"), arg("vocab_file"), arg("merge_file")
        ),
    }


def config_from_run_config(run_config: dict[str, Any], where: str) -> dict[str, Any]:
    """Megatron-Bridge's ``run_config.yaml`` (its ConfigContainer) under the same keys.

    Bridge pads ``model.vocab_size`` only when ``model.should_pad_vocab`` (the size came from the
    tokenizer); a preset size is the row count as is.
    """
    model, tokenizer = run_config.get("model"), run_config.get("tokenizer") or {}
    if not isinstance(model, dict) or not isinstance(tokenizer, dict):
        raise ConfigError(f"{where}: no 'model' section")
    divisible_by = model.get("make_vocab_size_divisible_by") or DEFAULT_DIVISIBLE_BY  # checked as args' are
    return {
        "num_layers": model.get("num_layers"),
        "hidden_size": model.get("hidden_size"),
        "ffn_hidden_size": model.get("ffn_hidden_size"),
        "num_attention_heads": model.get("num_attention_heads"),
        "encoder_seq_length": model.get("seq_length"),
        "make_vocab_size_divisible_by": divisible_by if model.get("should_pad_vocab", True) else 1,
        "tensor_model_parallel_size": model.get("tensor_model_parallel_size") or 1,
        "pipeline_model_parallel_size": model.get("pipeline_model_parallel_size") or 1,
        "share_embeddings_and_output_weights": bool(model.get("share_embeddings_and_output_weights", True)),
        "vocab_size": model.get("vocab_size"),
        "tokenizer": _tokenizer_config(
            tokenizer.get("tokenizer_type"),
            tokenizer.get("tokenizer_model"),
            tokenizer.get("vocab_file"),
            tokenizer.get("merge_file"),
        ),
    }


def _read_run_config(path: Path) -> dict[str, Any]:
    import yaml  # Megatron-Bridge only: 25 ms of a Megatron-LM run's start-up

    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes, over the {MAX_CONFIG_BYTES}-byte limit of a config")
    try:
        run_config = yaml.safe_load(check_config_text(path.read_bytes(), path))
    except (yaml.YAMLError, RecursionError) as exc:  # RecursionError: nested thousands deep
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(run_config, dict):
        raise ConfigError(f"{path}: does not hold a mapping")
    return check_config(run_config, path)  # bounded: aliases expanded, nesting


def _tokenizer_artifacts(folder: Path, config: dict[str, Any]) -> dict[str, bytes]:
    """The tokenizer files saved in ``<iteration>/tokenizer/``, as artifacts the config's tokenizer points at."""
    artifacts: dict[str, bytes] = {}
    tok = config["tokenizer"]
    for filename, key in _TOKENIZER_FILES.items():
        path = folder / TOKENIZER_DIR / filename
        if path.is_file():
            data = path.read_bytes()
            name = artifact_name(data, filename)
            artifacts[name] = data
            tok[key] = f"{NEMO_REF}{name}"
    return artifacts


def _check_backend(folder: Path) -> bytes:
    path = folder / METADATA_JSON
    if not path.is_file():
        if any(folder.glob("mp_rank_*")):
            raise UnsupportedError(
                f"{folder}: a legacy Megatron checkpoint (mp_rank_*/model_optim_rng.pt); convert it to torch_dist "
                f"first (Megatron-LM's tools/checkpoint/convert.py, --ckpt-convert-format torch_dist)"
            )
        raise CheckpointFormatError(f"{folder}: {METADATA_JSON} is missing; not a complete torch_dist checkpoint")
    data = path.read_bytes()
    if b'"torch_dist"' not in data:
        raise UnsupportedError(f"{path}: not a torch_dist checkpoint ({data[:120].decode(errors='replace')})")
    return data


def read_megatron_run(path: str | Path) -> Checkpoint:
    """A run folder (its tracker's iteration) or one iteration folder, as a Checkpoint; weights are read when used.

    ``training_state`` keeps ``common.pt`` and ``metadata.json`` byte for byte (``dist_common``,
    ``dist_metadata``, as for a distributed .nemo), the parsed ``common``, the ``iteration`` and the ``run``.
    """
    found = find_iteration(path)
    folder = found.folder
    if folder.is_symlink():
        raise UnsafeCheckpointError(f"{folder}: a link (to '{folder.readlink()}'); refusing the run folder")
    InFolder(folder)  # refuses links and special files anywhere in the iteration folder
    if found.tracker is not None:
        _refuse_special(found.tracker.parent / BRIDGE_LATEST_TRAIN_STATE)  # copied when the run is written
    metadata_json = _check_backend(folder)
    common = read_common(folder)
    entries = open_torch_dist(folder)  # refuses a metadata that names a missing .distcp file
    args = common.get("args")
    run_config_path = folder / RUN_CONFIG
    if isinstance(args, argparse.Namespace):
        config = config_from_args(args)
    elif run_config_path.is_file():
        config = config_from_run_config(_read_run_config(run_config_path), str(run_config_path))
    else:
        raise ConfigError(
            f"{folder}: no model config: {COMMON_FILE} holds no Megatron-LM 'args' and there is no {RUN_CONFIG}"
        )
    artifacts = _tokenizer_artifacts(folder, config)
    iteration = common.get("iteration", found.iteration)
    state = {
        "dist_common": (folder / COMMON_FILE).read_bytes(),
        "dist_metadata": metadata_json,
        "common": common,
        "iteration": iteration,
        "release": folder.name == RELEASE,
        "run": str(found.tracker.parent if found.tracker else folder),
        "folder": str(folder),
    }
    return Checkpoint(Entries(entries), config, DISTRIBUTED, artifacts, training_state=state)


# --- writing ---------------------------------------------------------------------------------

OPTIMIZER_PREFIX = "optimizer."
OPTIMIZER_COMMON = "optimizer"  # common.pt's optimizer part (param groups, sharding type)
BRIDGE_TRAIN_STATE = "train_state.pt"
BRIDGE_LATEST_TRAIN_STATE = "latest_train_state.pt"


def optimizer_keys(ckpt: Checkpoint) -> list[str]:
    return [k for k in ckpt.tensors if k.startswith(OPTIMIZER_PREFIX)]


def has_optimizer_state(ckpt: Checkpoint) -> bool:
    common = ckpt.training_state.get("common") or {}
    return bool(optimizer_keys(ckpt)) or OPTIMIZER_COMMON in common


def state_without_optimizer(state: dict[str, Any]) -> dict[str, Any]:
    """A run's training state with common.pt's optimizer part dropped (the scheduler and rng state stay;
    a trainer started with --no-load-optim --no-load-rng reads neither)."""
    common = {k: v for k, v in (state.get("common") or {}).items() if k != OPTIMIZER_COMMON}
    return {**state, "common": common, "dist_common": torch_file_bytes(common)}


def canonical_tokenizer_files(files: dict[str, Path], scratch: Path) -> dict[str, Path]:
    """``files`` (config key -> file) under the names a run's ``tokenizer/`` folder gives them (a merged
    ``th.model`` becomes ``tokenizer.model``), copied into ``scratch`` where the name differs."""
    names = {key: name for name, key in _TOKENIZER_FILES.items()}
    out: dict[str, Path] = {}
    for key, path in files.items():
        name = names.get(key, path.name)
        if path.name != name:
            (scratch / name).write_bytes(path.read_bytes())
            path = scratch / name
        out[key] = path
    return out


def _vocab_rows(ckpt: Checkpoint) -> int:
    meta = tensor_meta(ckpt.tensors, ckpt.vocab_keys().embedding)
    assert meta is not None
    return int(meta[0][0])


def _common_bytes(ckpt: Checkpoint, common: dict[str, Any], stored: bytes) -> bytes:
    """common.pt as ``stored`` when the tables kept their size, else with the args that describe them."""
    args = common.get("args")
    rows = _vocab_rows(ckpt)
    unchanged = not isinstance(args, argparse.Namespace) or (
        getattr(args, "padded_vocab_size", None) in (None, rows)
        and getattr(args, "vocab_size", None) in (None, ckpt.config.get("vocab_size"))
    )
    if unchanged:
        return stored
    return common_with_vocab_rows(common, rows, ckpt.config.get("vocab_size"))


def _parse_common(data: bytes) -> dict[str, Any] | None:
    """A common.pt carried as bytes (a .nemo converted from a run keeps it as its own), parsed as a run's."""
    with tempfile.NamedTemporaryFile(suffix=".pt") as f:
        f.write(data)
        f.flush()
        common = read_torch_file(FileRegion(Path(f.name), 0, len(data)), what=COMMON_FILE, also_allowed=_common_global)
        return _args_checked(common, COMMON_FILE) if isinstance(common, dict) else None


def _run_config_bytes(source: Path, ckpt: Checkpoint) -> bytes | None:
    """Bridge's ``run_config.yaml`` with ``model.vocab_size`` of the new tables: the tokenizer size where
    Bridge pads it (``should_pad_vocab``), else the rows themselves; as read when that is unchanged."""
    path = source / RUN_CONFIG
    if not path.is_file():
        return None
    run_config = _read_run_config(path)
    model = run_config["model"]
    vocab = ckpt.config.get("vocab_size") if model.get("should_pad_vocab", True) else _vocab_rows(ckpt)
    if model.get("vocab_size") == vocab or vocab is None:
        return path.read_bytes()
    model["vocab_size"] = vocab
    import yaml

    return yaml.safe_dump(run_config, sort_keys=False).encode()


def write_megatron_run(ckpt: Checkpoint, dst: Path) -> None:
    """A run folder at ``dst`` (new): the tracker and the iteration folder of ``ckpt``'s iteration.

    Entries read from the source run are not copied: each source ``.distcp`` file that holds one is hard
    linked under its own name (copied where the file system cannot link), and the ``.metadata`` points
    at their bytes where they lie; the changed entries (resized tables) go to a file of their own.
    ``common.pt`` and Bridge's ``run_config.yaml`` describe the tables' new size; the tokenizer
    artifacts go to ``tokenizer/``. Only a checkpoint read from a run folder can be written as one:
    its ``common.pt`` holds the run's state.
    """
    state = ckpt.training_state
    stored = bytes(state.get("dist_common") or b"")
    common = state.get("common")
    if not isinstance(common, dict) and stored:
        common = _parse_common(stored)
    source = Path(state["folder"]) if "folder" in state else None  # None: a .nemo converted from a run
    megatron_state = isinstance(common, dict) and (
        source is not None or isinstance(common.get("args"), argparse.Namespace)
    )
    if not megatron_state or ckpt.vocab_keys().family != MEGATRON:
        raise UnsupportedError(
            f"{dst}: only a Megatron run's checkpoint can be written as a run folder: one read from a run folder, or "
            f"a .nemo converted from one (its {COMMON_FILE} holds the run's args); safetensors keep no {COMMON_FILE}"
        )
    assert isinstance(common, dict)
    release = bool(state.get("release"))
    iteration = state.get("iteration", common.get("iteration"))
    if not release and not isinstance(iteration, int):
        raise UnsupportedError(f"{dst}: the checkpoint records no iteration to name its folder by")
    out = dst / (RELEASE if release else iteration_folder_name(int(iteration)))  # type: ignore[arg-type]
    out.mkdir(parents=True)
    # Linked under their own names: the new file needs another.
    taken = {p.name for p in source.glob("*.distcp")} if source is not None else set()
    data_file = (
        next(n for i in range(len(taken) + 1) if (n := f"vocab_tables_{i}.distcp") not in taken) if taken else DATA_FILE
    )
    write_torch_dist(
        out,
        ckpt.tensors,
        common=_common_bytes(ckpt, common, stored),
        metadata_json=state.get("dist_metadata"),
        hard_link_unchanged=True,
        data_file=data_file,
    )
    _write_tokenizer(ckpt, out / TOKENIZER_DIR)
    if source is not None:
        _write_bridge_files(ckpt, source, out, read_from_run=state.get("run") != str(source))
    (dst / TRACKER_FILE).write_text(RELEASE if release else str(iteration))


def _write_bridge_files(ckpt: Checkpoint, source: Path, out: Path, *, read_from_run: bool) -> None:
    """Bridge's run_config.yaml (its vocab_size updated) and train state (a few scalars), beside the
    iteration, and the run's copy of the train state when the source was read through its run folder."""
    run_config = _run_config_bytes(source, ckpt)
    if run_config is not None:
        (out / RUN_CONFIG).write_bytes(run_config)
    copies = [(source / BRIDGE_TRAIN_STATE, out / BRIDGE_TRAIN_STATE)]
    if read_from_run:
        copies.append((source.parent / BRIDGE_LATEST_TRAIN_STATE, out.parent / BRIDGE_LATEST_TRAIN_STATE))
    for here, there in copies:
        if here.is_file():
            there.write_bytes(here.read_bytes())


def _write_tokenizer(ckpt: Checkpoint, folder: Path) -> None:
    tok = ckpt.config.get("tokenizer") or {}
    for filename, key in _TOKENIZER_FILES.items():
        name = artifact_named(tok.get(key))
        if name is not None and name in ckpt.artifacts:
            folder.mkdir(exist_ok=True)
            (folder / filename).write_bytes(ckpt.artifacts[name])
