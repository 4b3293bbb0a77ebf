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
from ..errors import CheckpointFormatError, ConfigError
from .region import Entries, FileRegion, OutFile, held
from .torch_dist import open_torch_dist, write_torch_dist
from .torch_zip import read_torch_file, torch_file_bytes, write_torch_file

ARTIFACTS_KEY = "nemo_vocab_ext_artifacts"
MODEL_PREFIX = "model."
_LIGHTNING_VERSION = "2.4.0"


def _config_of(payload: dict[str, Any], source: Path) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    hparams = payload.get("hyper_parameters")
    if hparams is None:
        raise ConfigError(f"{source}: no hyper_parameters in this checkpoint; the model config is missing")
    cfg = hparams.get("cfg", hparams) if isinstance(hparams, (dict, DictConfig)) else None
    if cfg is None:
        raise ConfigError(f"{source}: hyper_parameters holds no model config ('cfg')")
    container = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else dict(cfg)
    assert isinstance(container, dict)
    return container  # type: ignore[return-value]


def is_dist_checkpoint_dir(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file() and (path / "common.pt").is_file()


def read_lightning(path: str | Path) -> Checkpoint:
    path = Path(path)
    if is_dist_checkpoint_dir(path):
        common_pt = path / "common.pt"
        common = read_torch_file(FileRegion(common_pt, 0, common_pt.stat().st_size), what=str(common_pt))
        if not isinstance(common, dict):
            raise CheckpointFormatError(f"{path}/common.pt: expected a dict, found {type(common).__name__}")
        artifacts = common.pop(ARTIFACTS_KEY, {}) or {}
        config = _config_of(common, path)
        return Checkpoint(Entries(open_torch_dist(path)), config, DISTRIBUTED, dict(artifacts), training_state=common)
    if not path.is_file():
        raise CheckpointFormatError(f"{path}: neither a Lightning .ckpt file nor a distributed checkpoint folder")
    # Tensors stay in the file until used, optimizer states included (written back as stored).
    payload = read_torch_file(FileRegion(path, 0, path.stat().st_size), what=str(path))
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise CheckpointFormatError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    state = Entries(payload.pop("state_dict"))
    artifacts = payload.pop(ARTIFACTS_KEY, {}) or {}
    config = _config_of(payload, path)
    return Checkpoint(state, config, SINGLE, dict(artifacts), training_state=payload)


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
