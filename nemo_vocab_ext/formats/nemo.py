"""The .nemo adapter: a tar of ``model_config.yaml``, tokenizer artifacts and weights in one of four layouts."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..checkpoint import (
    DISTRIBUTED,
    MP_RANK,
    NEMO_REF,
    SINGLE,
    TP_PP_RANK,
    Checkpoint,
    Value,
    artifact_name,
    artifact_named,
    tokenizer_config,
)
from ..entries import Entries, held
from ..errors import CheckpointFormatError, ConfigError, TokenizerError, UnsupportedError
from .archive import NemoArchive, extract_gzip, is_gzip
from .byteio import FileRegion
from .folder import DirOut, InFolder, OutFolder, tar_out
from .torch_dist import (
    COMMON_FILE,
    METADATA_FILE,
    METADATA_JSON,
    dist_entries,
    parse_metadata,
    tensor_infos,
    write_torch_dist,
)
from .torch_zip import load_all, read_torch_file, torch_file_bytes, write_torch_file
from .untrusted import MAX_CONFIG_BYTES, check_config, check_config_text, plain_member_name

CONFIG = "model_config.yaml"
WEIGHTS_FILE = "model_weights.ckpt"
WEIGHTS_DIR = "model_weights"
_MP_RANK = re.compile(r"^mp_rank_(\d{2})/model_weights\.ckpt$")
_TP_PP_RANK = re.compile(r"^tp_rank_(\d{2})_pp_rank_(\d{3})/model_weights\.ckpt$")
_ARTIFACT = re.compile(r"^[0-9a-f]{32}_[^/]+$")


def detect_layout(names: list[str] | set[str], source: Path) -> str:
    """Mirror NeMo's order: distributed metadata, then the single file, then rank folders."""
    present = set(names)
    if f"{WEIGHTS_DIR}/metadata.json" in present:
        return DISTRIBUTED
    if WEIGHTS_FILE in present:
        return SINGLE
    if any(_TP_PP_RANK.match(n) for n in present):
        return TP_PP_RANK
    if any(_MP_RANK.match(n) for n in present):
        return MP_RANK
    raise CheckpointFormatError(
        f"{source}: no weights found (expected {WEIGHTS_DIR}/metadata.json, {WEIGHTS_FILE}, "
        f"mp_rank_XX/ or tp_rank_XX_pp_rank_YYY/)"
    )


def parse_config(data: bytes, source: str) -> dict[str, Any]:
    import yaml  # here: a Megatron run's resize imports this module for its tokenizer helpers only (20 ms)

    text = check_config_text(data, f"{source}: {CONFIG}")
    try:
        # libyaml's parser where PyYAML was built with it (ten times faster; the same safe constructors).
        config = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506 - a safe loader
    except (yaml.YAMLError, RecursionError) as e:
        raise ConfigError(f"{source}: {CONFIG} is not valid YAML ({' '.join(str(e).split())})") from None
    return check_config(config, f"{source}: {CONFIG}")


def dump_config(config: dict[str, Any]) -> bytes:
    """The YAML NeMo writes for ``config`` (``OmegaConf.to_yaml``). A config of plain YAML values is
    dumped as OmegaConf dumps it, by libyaml where PyYAML has it, without importing omegaconf (0.1 s);
    one that holds OmegaConf's own containers (a .ckpt's pickled hyper-parameters) by OmegaConf."""
    import yaml

    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    try:
        text = yaml.dump(config, Dumper=dumper, default_flow_style=False, allow_unicode=True, sort_keys=False)
    except yaml.representer.RepresenterError:
        from omegaconf import OmegaConf

        text = OmegaConf.to_yaml(OmegaConf.create(config))
    return text.encode("utf-8")


Source = NemoArchive | InFolder


def _needed(name: str) -> bool:
    """The members a reader uses (the config, artifacts and weights); a tar.gz's other members are skipped."""
    return (
        name in (CONFIG, WEIGHTS_FILE)
        or name.startswith(f"{WEIGHTS_DIR}/")
        or any(p.match(name) for p in (_ARTIFACT, _MP_RANK, _TP_PP_RANK))
    )


@contextmanager
def open_nemo(path: str | Path) -> Iterator[Source]:
    """A .nemo archive or an extracted .nemo folder, read in place; a tar.gz archive (before NeMo 1.7) has no
    byte offsets into its compressed stream, so the members a reader uses are streamed into a temporary folder."""
    path = Path(path)
    if path.is_dir():
        yield InFolder(path)
    elif path.is_file() and is_gzip(path):
        with tempfile.TemporaryDirectory(prefix="nemo_vocab_ext.") as tmp:
            extract_gzip(path, Path(tmp), _needed)
            yield InFolder(Path(tmp), shown_as=path)
    else:
        with NemoArchive(path) as archive:
            yield archive


def _header(source: Source, path: Path) -> tuple[dict[str, Any], dict[str, bytes], str]:
    names = source.names()
    if CONFIG not in names:
        raise ConfigError(f"{path}: {CONFIG} is missing; this is not a NeMo model archive")
    config = parse_config(source.read(CONFIG, max_bytes=MAX_CONFIG_BYTES), str(path))
    artifacts = {n: source.read(n) for n in names if _ARTIFACT.match(n)}
    return config, artifacts, detect_layout(names, path)


def read_nemo_header(path: str | Path) -> tuple[dict[str, Any], dict[str, bytes], str]:
    """Config, artifacts and layout, without reading any weights."""
    with open_nemo(path) as source:
        return _header(source, Path(path))


def read_dist_tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Global shapes of a distributed .nemo's tensors, from its ``.metadata`` alone."""
    with open_nemo(path) as source:
        metadata = parse_metadata(source.read(f"{WEIGHTS_DIR}/{METADATA_FILE}"), f"{path}:{WEIGHTS_DIR}")
    return {k: info.shape for k, info in tensor_infos(metadata).items()}


def _state_dict(region: FileRegion, what: str) -> dict[str, Value]:
    state = read_torch_file(region, what=what)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{what}: expected a state dict, found {type(state).__name__}")
    return state


def _entries(source: Source, path: Path) -> Checkpoint:
    config, artifacts, layout = _header(source, path)
    if layout == DISTRIBUTED:
        metadata_json = source.read(f"{WEIGHTS_DIR}/{METADATA_JSON}")
        if b'"zarr"' in metadata_json:
            raise UnsupportedError(
                f"{path}: weights use the deprecated zarr backend; convert them to torch_dist first with "
                f"NeMo's scripts/checkpoint_converters/convert_zarr_to_torch_dist.py"
            )
        where = f"{path}:{WEIGHTS_DIR}"
        metadata = parse_metadata(source.read(f"{WEIGHTS_DIR}/{METADATA_FILE}"), where)
        entries = dist_entries(
            metadata, lambda name: source.region(f"{WEIGHTS_DIR}/{plain_member_name(name, where)}"), where
        )
        common_name = f"{WEIGHTS_DIR}/{COMMON_FILE}"
        common = source.read(common_name) if source.has(common_name) else b""
        state = {"dist_common": common, "dist_metadata": metadata_json}
        return Checkpoint(Entries(entries), config, layout, artifacts, training_state=state)
    if layout == SINGLE:
        tensors = _state_dict(source.region(WEIGHTS_FILE), f"{path}:{WEIGHTS_FILE}")
        return Checkpoint(Entries(tensors), config, layout, artifacts)
    pattern = _TP_PP_RANK if layout == TP_PP_RANK else _MP_RANK
    ranks: dict[tuple[int, int], dict[str, Value]] = {}
    for name in source.names():
        m = pattern.match(name)
        if m:
            rank = (int(m.group(1)), int(m.group(2)) if layout == TP_PP_RANK else 0)
            ranks[rank] = load_all(_state_dict(source.region(name), f"{path}:{name}"))
    return Checkpoint(ranks[min(ranks)], config, layout, artifacts, rank_tensors=ranks)


def read_nemo(path: str | Path) -> Checkpoint:
    """A .nemo archive or an extracted .nemo folder; weights are read when first used."""
    path = Path(path)
    with open_nemo(path) as source:
        ckpt = _entries(source, path)
        if isinstance(source, InFolder) and not path.is_dir():  # a tar.gz's temporary folder: read it all now
            ckpt.tensors = {k: ckpt.tensors[k] for k in ckpt.tensors}
        return ckpt


def _write_nemo_to(ckpt: Checkpoint, out: OutFolder, *, link_unchanged: bool = False) -> None:
    out.write_bytes(CONFIG, dump_config(ckpt.config))
    for name, data in ckpt.artifacts.items():
        out.write_bytes(name, data)
    if ckpt.layout == DISTRIBUTED:
        write_torch_dist(
            out.folder(WEIGHTS_DIR),
            ckpt.tensors,
            common=ckpt.training_state.get("dist_common") or torch_file_bytes({}),
            metadata_json=ckpt.training_state.get("dist_metadata") or None,  # None: the writer's default
            link_unchanged=link_unchanged,
        )
    elif ckpt.layout == SINGLE:
        with out.file(WEIGHTS_FILE) as f:
            write_torch_file({k: held(ckpt.tensors, k) for k in ckpt.tensors}, f)
    elif ckpt.rank_tensors is not None:
        for (tp, pp), state in ckpt.rank_tensors.items():
            folder = f"tp_rank_{tp:02d}_pp_rank_{pp:03d}" if ckpt.layout == TP_PP_RANK else f"mp_rank_{tp:02d}"
            with out.folder(folder).file(WEIGHTS_FILE) as f:
                write_torch_file(state, f)
    else:
        raise CheckpointFormatError(f"layout {ckpt.layout} needs per-rank tensors")


def write_nemo_dir(ckpt: Checkpoint, out_dir: Path, *, link_unchanged: bool = False) -> None:
    """Lay out an extracted .nemo (what NeMo's ``model_extracted_dir`` reads) in ``out_dir``.

    ``link_unchanged``: distributed weights that come unchanged from another checkpoint are linked,
    not copied (see :func:`.torch_dist.write_torch_dist`); that checkpoint must outlive the folder.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_nemo_to(ckpt, DirOut(out_dir), link_unchanged=link_unchanged)


def write_nemo(ckpt: Checkpoint, dst: Path) -> None:
    """Write a .nemo archive at ``dst``, streamed straight into the tar (callers make it atomic)."""
    with tar_out(dst) as out:
        _write_nemo_to(ckpt, out)


# The tokenizer artifacts: NeMo's convention (``nemo:<member>`` in the config's tokenizer section),
# which every format but a Hugging Face folder keeps.


def _artifact_bytes(ckpt: Checkpoint, cfg_key: str) -> bytes | None:
    ref = tokenizer_config(ckpt.config).get(cfg_key)
    if not isinstance(ref, str) or not ref:
        return None
    if (name := artifact_named(ref)) is not None:
        if name not in ckpt.artifacts:
            raise ConfigError(f"tokenizer.{cfg_key} refers to artifact '{name}', which the checkpoint does not contain")
        return ckpt.artifacts[name]
    local = Path(ref)  # a training checkpoint may point at files on disk
    return local.read_bytes() if local.is_file() else None


def nemo_tokenizer_files(ckpt: Checkpoint, out_dir: Path) -> Path | None:
    """Write the tokenizer a checkpoint's config names (``nemo:`` artifacts) under plain file names;
    None when it carries none."""
    vocab, merges = _artifact_bytes(ckpt, "vocab_file"), _artifact_bytes(ckpt, "merge_file")
    if vocab is not None and merges is not None:
        (out_dir / "vocab.json").write_bytes(vocab)
        (out_dir / "merges.txt").write_bytes(merges)
        return out_dir
    model = _artifact_bytes(ckpt, "model") or _artifact_bytes(ckpt, "tokenizer_model")
    if model is not None:
        (out_dir / "tokenizer.model").write_bytes(model)
        return out_dir / "tokenizer.model"
    return None


def embed_tokenizer(ckpt: Checkpoint, files: dict[str, Path]) -> Checkpoint:
    """Replace the tokenizer artifacts with ``files`` (config key -> file) and point the config at them."""
    config = dict(ckpt.config)
    tok = dict(tokenizer_config(config))
    artifacts = dict(ckpt.artifacts)
    for cfg_key, path in files.items():
        if (old := artifact_named(tok.get(cfg_key))) is not None:
            artifacts.pop(old, None)
        data = path.read_bytes()
        name = artifact_name(data, path.name)
        artifacts[name] = data
        tok[cfg_key] = f"{NEMO_REF}{name}"
    config["tokenizer"] = tok
    return replace(ckpt, config=config, artifacts=artifacts)


def tokenizer_config_files(tokenizer_path: Path) -> dict[str, Path]:
    """Config keys NeMo reads for the tokenizer at ``tokenizer_path``."""
    p = Path(tokenizer_path)
    if p.is_dir() and (p / "vocab.json").is_file():
        files = {"vocab_file": p / "vocab.json"}
        if (p / "merges.txt").is_file():
            files["merge_file"] = p / "merges.txt"
        return files
    if p.is_file() and p.suffix == ".model":
        return {"model": p}
    raise TokenizerError(
        f"{p}: cannot embed this tokenizer in a .nemo; give a vocab.json+merges.txt folder or a .model file"
    )
