"""Unpickling checkpoint files without running code.

NeMo checkpoints are pickles. Loading one the usual way (``torch.load(weights_only=False)``,
``pickle.load``) calls whatever functions the file names, so a crafted file runs code. The
unpickler here resolves only an explicit allow-list of names (inert containers, config types and
the stand-ins of :mod:`.torch_pickle` and :mod:`.dcp_records`) and refuses anything else with
:class:`UnsafeCheckpointError` before it is called. It needs no torch.

No megatron import, ever: megatron may be missing, and importing it to unpickle would run its
import-time code for a file we have not trusted yet.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import functools
import io
import pathlib
import pickle
import re
import typing
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from ..core.dtypes import DTYPES
from ..errors import CheckpointFormatError, UnsafeCheckpointError, UnsupportedError
from . import dcp_records
from .torch_pickle import TORCH_OBJECTS, UNSUPPORTED_TORCH_NAMES

# Beyond tensors and torch's own objects (torch's weights-only set: dtypes, storages, torch.Size,
# OrderedDict, set, bytes via _codecs.encode), each entry was seen in a NeMo or Lightning file, or is
# the typed twin of one that was; all are inert containers or types: constructing them runs no user code.
_PLAIN_ALLOWED: tuple[Any, ...] = (
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


@functools.cache
def _omegaconf_allowed() -> tuple[Any, ...]:
    """hyper_parameters / hparams_type of Lightning .ckpt and torch_dist common.pt: an OmegaConf tree.
    Imported when a pickle names one (omegaconf takes about 0.08 s to import; weights name none)."""
    from omegaconf import AnyNode, DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import BooleanNode, BytesNode, FloatNode, IntegerNode, PathNode, StringNode

    return (
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
    )


def torch_load_allowed() -> list[Any]:
    """What :func:`safe_torch_load` lets torch's weights-only unpickler resolve beyond its own set."""
    return [*_omegaconf_allowed(), *_PLAIN_ALLOWED]


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
    """``torch.load`` onto the CPU that resolves only torch's weights-only set plus :func:`torch_load_allowed`
    (for in-memory values, such as an ``_extra_state`` blob being decoded; files are read lazily by
    :func:`.torch_zip.read_torch_file`).

    ``what`` names the file in errors (e.g. ``model.nemo:model_weights.ckpt``).
    """
    import torch

    # safe_globals is a context manager, so the allow-list is not left on for other callers.
    with torch.serialization.safe_globals(torch_load_allowed()):
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


# --- the restricted unpickler ----------------------------------------------------------------

Globals = Mapping[tuple[str, str], Any]

# What torch's weights-only set and torch_load_allowed() let through, by the names pickles use.
_PLAIN_GLOBALS: dict[tuple[str, str], Any] = {
    **{(t.__module__, t.__qualname__): t for t in _PLAIN_ALLOWED if t is not typing.Any},
    ("typing", "Any"): typing.Any,
    # Paths pickle under the module that defines them, which moved in Python 3.13.
    ("pathlib", "Path"): pathlib.Path,
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    ("collections", "OrderedDict"): OrderedDict,
    ("_codecs", "encode"): codecs.encode,  # bytes, as protocol 2 pickles them
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
}


@functools.cache
def _omegaconf_globals() -> dict[tuple[str, str], Any]:
    return {(t.__module__, t.__qualname__): t for t in _omegaconf_allowed()}


def config_global(module: str, name: str) -> Any:
    """The allowed object a config pickle names (``module``, ``name``); None to refuse it."""
    if module.partition(".")[0] == "omegaconf":
        return _omegaconf_globals().get((module, name))
    return _PLAIN_GLOBALS.get((module, name))


# torch_dist ``.metadata``: torch's records, as stand-ins. StorageMeta.checkpoint_id is the
# writer's path (a PosixPath when the writer was given a Path).
METADATA_GLOBALS: dict[tuple[str, str], Any] = {
    **dcp_records.STAND_INS,
    **TORCH_OBJECTS,
    ("pathlib", "Path"): pathlib.Path,
    ("pathlib", "PosixPath"): pathlib.PosixPath,
}

# megatron-core's subclasses, matched by name under its dist_checkpointing package: the module
# that defines them has moved between releases. MCoreMetadata adds ``mcore_data`` to Metadata.
_MEGATRON_PACKAGE = "megatron.core.dist_checkpointing"
_MEGATRON_STANDINS: dict[str, type] = {
    "MCoreSavePlan": dcp_records.STAND_INS[dcp_records.PLANNER_MODULE, "SavePlan"],  # a SavePlan subclass
    "MCoreMetadata": dcp_records.Metadata,
}


def _megatron_standin(module: str, name: str) -> Any:
    if module == _MEGATRON_PACKAGE or module.startswith(_MEGATRON_PACKAGE + "."):
        return _MEGATRON_STANDINS.get(name)
    return None


Resolve = Callable[[str, str], Any]  # (module, name) -> the object, or None to refuse


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, resolve: Resolve, what: str, persistent_load: Callable[[Any], Any] | None):
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self.resolve = resolve
        self.what = what
        self._persistent_load = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 2 (torch's) writes builtins under their Python 2 names: map them back, as pickle does.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = self.resolve(module, name)
        if found is None and (module, name) in UNSUPPORTED_TORCH_NAMES:
            raise UnsupportedError(
                f"{self.what}: holds {module}.{name} tensors; this tool handles "
                f"{', '.join(d.name for d in DTYPES)} tensors only (no NeMo GPT checkpoint holds others)"
            )
        if found is None:
            raise unsafe_error(self.what, f"{module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent_load is None:  # e.g. a .metadata file has none: this is something else
            raise pickle.UnpicklingError("unexpected persistent id")
        return self._persistent_load(pid)


def restricted_loads(
    data: bytes,
    allowed: Globals | Resolve,
    *,
    what: str,
    persistent_load: Callable[[Any], Any] | None = None,
) -> Any:
    """Unpickle ``data``, resolving only the names ``allowed`` maps (or resolves); anything else is refused."""
    resolve = allowed if callable(allowed) else lambda module, name: allowed.get((module, name))
    try:
        return _Unpickler(data, resolve, what, persistent_load).load()
    except (UnsafeCheckpointError, CheckpointFormatError, UnsupportedError):
        raise
    except Exception as exc:  # truncated or garbled: pickle raises many types here
        raise CheckpointFormatError(f"{what}: unreadable ({type(exc).__name__}: {exc})") from None


def _metadata_global(module: str, name: str) -> Any:
    return METADATA_GLOBALS.get((module, name)) or _megatron_standin(module, name)


def restricted_unpickle(data: bytes, *, what: str) -> Any:
    """Unpickle a torch_dist ``.metadata`` into :mod:`.dcp_records` stand-ins (torch's and megatron's
    metadata classes, by name); anything else is refused."""
    return restricted_loads(data, _metadata_global, what=what)
