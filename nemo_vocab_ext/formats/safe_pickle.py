"""Unpickling checkpoint files without running code.

NeMo checkpoints are pickles. Loading one the usual way (``torch.load(weights_only=False)``,
``pickle.load``) calls whatever functions the file names, so a crafted file runs code. Both loaders
here resolve only an explicit allow-list of classes and refuse anything else with
:class:`UnsafeCheckpointError` before it is called.

No megatron import, ever: megatron may be missing, and importing it to unpickle would run its
import-time code for a file we have not trusted yet.
"""

from __future__ import annotations

import io
import pathlib
import pickle
import re
import typing
from collections import defaultdict
from pathlib import Path
from typing import IO, Any

import torch
from omegaconf import AnyNode, DictConfig, ListConfig
from omegaconf.base import ContainerMetadata, Metadata
from omegaconf.nodes import BooleanNode, BytesNode, FloatNode, IntegerNode, PathNode, StringNode

from ..errors import CheckpointFormatError, UnsafeCheckpointError
from . import dcp_records

# Added to torch's own weights_only set (tensors, storages, dtypes, torch.Size, OrderedDict, set,
# bytes via _codecs.encode). Each entry was seen in a NeMo or Lightning file, or is the typed twin
# of one that was; all are inert containers or types: constructing them runs no user code.
TORCH_LOAD_ALLOWED: tuple[Any, ...] = (
    # hyper_parameters / hparams_type of Lightning .ckpt and torch_dist common.pt: an OmegaConf tree.
    DictConfig,
    ListConfig,
    ContainerMetadata,
    Metadata,
    AnyNode,  # every leaf of a config built from YAML
    StringNode,  # typed leaves, from configs merged with NeMo's dataclass (structured) configs
    IntegerNode,
    FloatNode,
    BooleanNode,
    BytesNode,
    PathNode,
    typing.Any,  # ContainerMetadata.key_type / element_type / ref_type
    defaultdict,  # ContainerMetadata.resolver_cache = defaultdict(dict)
    dict,  # object_type of a DictConfig; defaultdict's factory
    list,  # object_type of a ListConfig
    int,  # key_type of a ListConfig
    float,  # ref_type of typed nodes
    bool,
    str,
    bytes,
    pathlib.Path,  # a Path value in a config (ref_type of PathNode, or held by an AnyNode)
    pathlib.PosixPath,
    io.BytesIO,  # Transformer Engine's ``_extra_state`` in older single-file checkpoints; kept opaque
)

_REFUSED = re.compile(
    r"GLOBAL (\S+) (?:was not an allowed global|whose module)"
    r"|unrecognized function (\S+)"
    r"|but got (<[^>]+>|\S+)"
)


def refused_global(message: str) -> str | None:
    """The name torch's weights-only unpickler refused, from its error message; None if none was."""
    match = _REFUSED.search(message)
    return next(g for g in match.groups() if g) if match else None


def unsafe_error(what: str, name: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{what}: refused to load: it references {name}, which is not a type NeMo checkpoints contain; "
        "loading this file the usual way (torch.load with weights_only=False, or pickle) would run code"
    )


def safe_torch_load(source: str | Path | IO[bytes], *, what: str) -> Any:
    """``torch.load`` onto the CPU that resolves only torch's weights-only set plus TORCH_LOAD_ALLOWED.

    ``what`` names the file in errors (e.g. ``model.nemo:model_weights.ckpt``).
    """
    # safe_globals is a context manager, so the allow-list is not left on for other callers.
    with torch.serialization.safe_globals(list(TORCH_LOAD_ALLOWED)):
        try:
            return torch.load(source, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            name = refused_global(str(exc))
            if name is not None:
                raise unsafe_error(what, name) from None
            raise CheckpointFormatError(f"{what}: not a readable torch file: {_last_line(exc)}") from None
        except (RuntimeError, EOFError, ValueError, OSError) as exc:
            raise CheckpointFormatError(f"{what}: not a readable torch file: {_last_line(exc)}") from None


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


# --- torch_dist ``.metadata`` -------------------------------------------------------------------


_DCP_CLASSES: dict[tuple[str, str], Any] = dict(dcp_records.STAND_INS)
_DCP_CLASSES[("torch", "Size")] = torch.Size
# torch.layout pickles as a call to this lookup-by-name function (copyreg in torch.serialization).
_DCP_CLASSES[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
# StorageMeta.checkpoint_id is the writer's path: a PosixPath when the writer was given a Path.
_DCP_CLASSES[("pathlib", "PosixPath")] = pathlib.PosixPath
_DCP_CLASSES[("pathlib", "Path")] = pathlib.Path

# megatron-core's subclasses, matched by name under its dist_checkpointing package: the module
# that defines them has moved between releases. MCoreMetadata adds ``mcore_data`` to Metadata.
_MEGATRON_PACKAGE = "megatron.core.dist_checkpointing"
_MEGATRON_STANDINS: dict[str, type] = {
    "MCoreSavePlan": dcp_records.STAND_INS[dcp_records.PLANNER_MODULE, "SavePlan"],  # a SavePlan subclass
    "MCoreMetadata": dcp_records.Metadata,
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, what: str) -> None:
        super().__init__(io.BytesIO(data))
        self.what = what

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_CLASSES:
            return _DCP_CLASSES[module, name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module == _MEGATRON_PACKAGE or module.startswith(_MEGATRON_PACKAGE + ".")) and (name in _MEGATRON_STANDINS):
            return _MEGATRON_STANDINS[name]
        raise unsafe_error(self.what, f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        # .metadata has no persistent ids; one here means this is not a .metadata file.
        raise pickle.UnpicklingError("unexpected persistent id")


def restricted_unpickle(data: bytes, *, what: str) -> Any:
    """Unpickle a torch_dist ``.metadata`` into :mod:`.dcp_records` stand-ins (torch's and megatron's
    metadata classes, by name); anything else is refused."""
    try:
        return _MetadataUnpickler(data, what).load()
    except UnsafeCheckpointError:
        raise
    except Exception as exc:  # truncated or garbled: pickle raises many types here
        raise CheckpointFormatError(f"{what}: unreadable ({type(exc).__name__}: {exc})") from None
