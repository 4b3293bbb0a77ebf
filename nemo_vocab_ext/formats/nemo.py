"""The .nemo adapter: a tar of ``model_config.yaml``, tokenizer artifacts and weights in one of four layouts."""

from __future__ import annotations

import io
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from ..checkpoint import DISTRIBUTED, MP_RANK, SINGLE, TP_PP_RANK, Checkpoint, Value, stored_entries
from ..errors import CheckpointFormatError, ConfigError, UnsupportedError
from .archive import NemoArchive, write_tar
from .safe_pickle import safe_torch_load
from .torch_dist import read_tensor_infos, read_torch_dist, write_torch_dist

CONFIG = "model_config.yaml"
WEIGHTS_FILE = "model_weights.ckpt"
WEIGHTS_DIR = "model_weights"
_MP_RANK = re.compile(r"^mp_rank_(\d{2})/model_weights\.ckpt$")
_TP_PP_RANK = re.compile(r"^tp_rank_(\d{2})_pp_rank_(\d{3})/model_weights\.ckpt$")
_ARTIFACT = re.compile(r"^[0-9a-f]{32}_[^/]+$")
DEFAULT_DIST_METADATA = (
    b'{"sharded_backend": "torch_dist", "sharded_backend_version": 1, '
    b'"common_backend": "torch", "common_backend_version": 1}'
)


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
    try:
        config = yaml.safe_load(data.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{source}: model_config.yaml is not valid YAML ({e})") from e
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: model_config.yaml does not hold a mapping")
    return config


def dump_config(config: dict[str, Any]) -> bytes:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(config)).encode("utf-8")


def _load_state_dict(data: bytes, what: str) -> dict[str, Value]:
    state = safe_torch_load(io.BytesIO(data), what=what)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{what}: expected a state dict, found {type(state).__name__}")
    return state


class ExtractedNemo:
    """An extracted .nemo folder (what NeMo's ``model_extracted_dir`` points at), read like an archive."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> ExtractedNemo:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def names(self) -> list[str]:
        return sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file())

    def read(self, name: str) -> bytes:
        member = self.path / name
        if not member.is_file():
            raise CheckpointFormatError(f"{self.path}: '{name}' is missing")
        return member.read_bytes()

    def extract_dir(self, prefix: str, out_dir: Path) -> Path:
        return self.path / prefix  # already on disk


def open_nemo(path: str | Path) -> NemoArchive | ExtractedNemo:
    path = Path(path)
    return ExtractedNemo(path) if path.is_dir() else NemoArchive(path)


def _header(source: NemoArchive | ExtractedNemo, path: Path) -> tuple[dict[str, Any], dict[str, bytes], str]:
    names = source.names()
    if CONFIG not in names:
        raise ConfigError(f"{path}: {CONFIG} is missing; this is not a NeMo model archive")
    config = parse_config(source.read(CONFIG), str(path))
    artifacts = {n: source.read(n) for n in names if _ARTIFACT.match(n)}
    return config, artifacts, detect_layout(names, path)


def read_nemo_header(path: str | Path) -> tuple[dict[str, Any], dict[str, bytes], str]:
    """Config, artifacts and layout, without reading any weights."""
    with open_nemo(path) as source:
        return _header(source, Path(path))


def read_dist_tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Global shapes of a distributed .nemo's tensors, from its ``.metadata`` alone."""
    with open_nemo(path) as source, tempfile.TemporaryDirectory() as tmp:
        if isinstance(source, NemoArchive):
            target = Path(tmp) / WEIGHTS_DIR
            target.mkdir()
            (target / ".metadata").write_bytes(source.read(f"{WEIGHTS_DIR}/.metadata"))
        else:
            target = source.path / WEIGHTS_DIR
        return {k: tuple(info.shape) for k, info in read_tensor_infos(target).items()}


def read_nemo(path: str | Path) -> Checkpoint:
    """A .nemo archive or an extracted .nemo folder."""
    path = Path(path)
    with open_nemo(path) as source:
        config, artifacts, layout = _header(source, path)
        names = source.names()
        if layout == DISTRIBUTED:
            metadata_json = source.read(f"{WEIGHTS_DIR}/metadata.json")
            if b'"zarr"' in metadata_json:
                raise UnsupportedError(
                    f"{path}: weights use the deprecated zarr backend; convert them to torch_dist first with "
                    f"NeMo's scripts/checkpoint_converters/convert_zarr_to_torch_dist.py"
                )
            with tempfile.TemporaryDirectory() as tmp:
                weights_dir = source.extract_dir(WEIGHTS_DIR, Path(tmp))
                tensors: dict[str, Value] = dict(read_torch_dist(weights_dir))
                common = (weights_dir / "common.pt").read_bytes() if (weights_dir / "common.pt").exists() else b""
            state = {"dist_common": common, "dist_metadata": metadata_json}
            return Checkpoint(tensors, config, layout, artifacts, training_state=state)
        if layout == SINGLE:
            tensors = _load_state_dict(source.read(WEIGHTS_FILE), f"{path}:{WEIGHTS_FILE}")
            return Checkpoint(tensors, config, layout, artifacts)
        pattern = _TP_PP_RANK if layout == TP_PP_RANK else _MP_RANK
        ranks: dict[tuple[int, int], dict[str, Value]] = {}
        for name in names:
            m = pattern.match(name)
            if m:
                rank = (int(m.group(1)), int(m.group(2)) if layout == TP_PP_RANK else 0)
                ranks[rank] = _load_state_dict(source.read(name), f"{path}:{name}")
        return Checkpoint(ranks[min(ranks)], config, layout, artifacts, rank_tensors=ranks)


def _state_dict_bytes(state: dict[str, Value]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def write_nemo_dir(ckpt: Checkpoint, out_dir: Path) -> None:
    """Lay out an extracted .nemo (what NeMo's ``model_extracted_dir`` reads) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG).write_bytes(dump_config(ckpt.config))
    for name, data in ckpt.artifacts.items():
        (out_dir / name).write_bytes(data)
    if ckpt.layout == DISTRIBUTED:
        write_torch_dist(
            out_dir / WEIGHTS_DIR,
            stored_entries(ckpt.tensors),
            common=ckpt.training_state.get("dist_common") or _state_dict_bytes({}),
            metadata_json=ckpt.training_state.get("dist_metadata") or DEFAULT_DIST_METADATA,
        )
    elif ckpt.layout == SINGLE:
        (out_dir / WEIGHTS_FILE).write_bytes(_state_dict_bytes(ckpt.tensors))
    elif ckpt.rank_tensors is not None:
        for (tp, pp), state in ckpt.rank_tensors.items():
            folder = f"tp_rank_{tp:02d}_pp_rank_{pp:03d}" if ckpt.layout == TP_PP_RANK else f"mp_rank_{tp:02d}"
            (out_dir / folder).mkdir()
            (out_dir / folder / WEIGHTS_FILE).write_bytes(_state_dict_bytes(state))
    else:
        raise CheckpointFormatError(f"layout {ckpt.layout} needs per-rank tensors")


def write_nemo(ckpt: Checkpoint, dst: Path) -> None:
    """Write a .nemo archive at ``dst`` (callers make it atomic)."""
    with tempfile.TemporaryDirectory(dir=dst.parent) as staging:
        write_nemo_dir(ckpt, Path(staging))
        write_tar(Path(staging), dst)
