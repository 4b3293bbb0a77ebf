"""The .ckpt adapter: PyTorch Lightning files and NeMo's distributed training-checkpoint folders.

The model config comes from ``hyper_parameters.cfg``. Training state (step, loops, optimizer
param groups...) is kept as loaded. Tokenizer artifacts have no place in a Lightning checkpoint,
so they travel under an extra top-level key that Lightning ignores, making .nemo → .ckpt → .nemo
lossless.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..checkpoint import DISTRIBUTED, SINGLE, Checkpoint
from ..entries import Entries, held
from ..errors import CheckpointFormatError, ConfigError
from .byteio import FileRegion, OutFile
from .folder import InFolder
from .torch_dist import COMMON_FILE, METADATA_FILE, dist_entries, parse_metadata, write_torch_dist
from .torch_zip import read_torch_file, torch_file_bytes, write_torch_file
from .untrusted import check_artifacts, check_config

ARTIFACTS_KEY = "nemo_vocab_ext_artifacts"
MODEL_PREFIX = "model."
_LIGHTNING_VERSION = "2.4.0"


def _config_of(payload: dict[str, Any], source: Path) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    hparams = payload.get("hyper_parameters")
    if hparams is None:
        raise ConfigError(f"{source}: no hyper_parameters in this checkpoint; the model config is missing")
    if not isinstance(hparams, dict | DictConfig):
        raise ConfigError(f"{source}: hyper_parameters is a {type(hparams).__name__}, not a mapping")
    if "cfg" not in hparams:
        raise ConfigError(f"{source}: hyper_parameters holds no model config ('cfg')")
    cfg = hparams._get_node("cfg") if isinstance(hparams, DictConfig) else hparams["cfg"]
    where = f"{source}: hyper_parameters.cfg"
    if not isinstance(cfg, DictConfig):
        return check_config(cfg, where)
    check_config(cfg, where)  # bounded before OmegaConf expands it
    try:
        container = OmegaConf.to_container(cfg, resolve=False)
    except (ValueError, RecursionError) as e:  # omegaconf's errors are ValueErrors
        raise ConfigError(f"{where}: not a model config OmegaConf reads ({e})") from None
    return check_config(container, where)


def _artifacts_of(payload: dict[str, Any], source: Path) -> dict[str, bytes]:
    return check_artifacts(payload.pop(ARTIFACTS_KEY, None) or {}, f"{source}: {ARTIFACTS_KEY}")


def is_dist_checkpoint_dir(path: Path) -> bool:
    return path.is_dir() and (path / METADATA_FILE).is_file() and (path / COMMON_FILE).is_file()


def read_lightning(path: str | Path) -> Checkpoint:
    path = Path(path)
    if is_dist_checkpoint_dir(path):
        folder = InFolder(path)
        common = read_torch_file(folder.region(COMMON_FILE), what=str(path / COMMON_FILE))
        if not isinstance(common, dict):
            raise CheckpointFormatError(f"{path}/{COMMON_FILE}: expected a dict, found {type(common).__name__}")
        artifacts = _artifacts_of(common, path)
        config = _config_of(common, path)
        metadata = parse_metadata(folder.read(METADATA_FILE), str(path / METADATA_FILE))
        entries = dist_entries(metadata, folder.region, str(path))
        return Checkpoint(Entries(entries), config, DISTRIBUTED, artifacts, training_state=common)
    if not path.is_file():
        raise CheckpointFormatError(f"{path}: neither a Lightning .ckpt file nor a distributed checkpoint folder")
    # Tensors stay in the file until used, optimizer states included (written back as stored).
    payload = read_torch_file(FileRegion(path, 0, path.stat().st_size), what=str(path))
    if not isinstance(payload, dict) or not isinstance(payload.get("state_dict"), dict):
        raise CheckpointFormatError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    state = Entries(payload.pop("state_dict"))
    artifacts = _artifacts_of(payload, path)
    config = _config_of(payload, path)
    return Checkpoint(state, config, SINGLE, artifacts, training_state=payload)


def _lightning_payload(ckpt: Checkpoint) -> dict[str, Any]:
    from omegaconf import OmegaConf

    payload = {k: v for k, v in ckpt.training_state.items() if not k.startswith("dist_")}
    payload.setdefault("epoch", 0)
    payload.setdefault("global_step", 0)
    payload.setdefault("pytorch-lightning_version", _LIGHTNING_VERSION)
    payload["hyper_parameters"] = OmegaConf.create({"cfg": ckpt.config})
    payload["hparams_name"] = "cfg"
    payload[ARTIFACTS_KEY] = dict(ckpt.artifacts)
    return payload


def write_lightning(ckpt: Checkpoint, dst: Path) -> None:
    """A folder like NeMo's own for distributed (mcore) weights, else one Lightning file."""
    payload = _lightning_payload(ckpt)
    if ckpt.layout == DISTRIBUTED:
        write_torch_dist(
            dst,
            ckpt.tensors,
            common=torch_file_bytes(payload),
            metadata_json=ckpt.training_state.get("dist_metadata"),
        )
        return
    if ckpt.layout != SINGLE:
        raise CheckpointFormatError(
            f"{ckpt.layout} checkpoints hold one file per rank; merge the partitions first "
            "(NeMo's megatron_change_num_partitions.py) or write a .nemo"
        )
    payload["state_dict"] = {k: held(ckpt.tensors, k) for k in ckpt.tensors}
    with open(dst, "wb") as f:
        write_torch_file(payload, OutFile(f))
