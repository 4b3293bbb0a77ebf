"""Unpickling checkpoint files without running code.

NeMo checkpoints are pickles. Loading one the usual way (``torch.load(weights_only=False)``,
``pickle.load``) calls whatever functions the file names, so a crafted file runs code. The
unpickler here resolves only an explicit allow-list of names (inert containers, config types and
the stand-ins of :mod:`.torch_pickle` and :mod:`.dcp_records`) and refuses anything else with
:class:`UnsafeCheckpointError` before it is called. Allowed names are not trusted either: no class
takes state from the file, objects take only the fields their type has (checked), calls get only
the arguments real files give, and nothing nests without end. It needs no torch.

No megatron import, ever: megatron may be missing, and importing it to unpickle would run its
import-time code for a file we have not trusted yet.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import codecs
import dataclasses
import functools
import io
import pathlib
import pickle
import re
import typing
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

from ..core.dtypes import DTYPES
from ..entries import Stored
from ..errors import CheckpointFormatError, UnsafeCheckpointError, UnsupportedError
from . import dcp_records
from .torch_pickle import TORCH_OBJECTS, UNSUPPORTED_TORCH_NAMES, BadRecord

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
_PureUnpickler: Any = pickle._Unpickler  # type: ignore[attr-defined]

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

MAX_DEPTH = 64  # containers nested deeper than this are refused; real checkpoints nest about ten deep


def _strings(*args: Any) -> bool:
    return all(isinstance(a, str) for a in args)


# The third-party callables of the allow-list that a pickle may call (REDUCE), each with the only
# arguments real files give it. The stand-ins of this package check their own arguments.
_CALL_ARGS: dict[Any, Callable[..., bool]] = {
    pathlib.Path: _strings,  # a Path pickles as a call with its parts
    pathlib.PosixPath: _strings,
    codecs.encode: lambda text, encoding: isinstance(text, str) and encoding in ("latin1", "latin-1"),
    OrderedDict: lambda *args: not args,  # items come by SETITEMS
    set: lambda *args: not args or (len(args) == 1 and isinstance(args[0], list)),
    frozenset: lambda *args: not args or (len(args) == 1 and isinstance(args[0], list)),
    bytearray: lambda *args: not args or (len(args) == 2 and isinstance(args[0], str) and args[1] == "latin-1"),
    defaultdict: lambda *args: not args or (len(args) == 1 and args[0] in (dict, list, None)),
}


def _third_party() -> set[int]:
    return {id(obj) for obj in (*_PLAIN_ALLOWED, *_PLAIN_GLOBALS.values(), *_omegaconf_if_loaded())}


def _omegaconf_if_loaded() -> tuple[Any, ...]:
    # Nothing of omegaconf can be in a pickle before a name of it was resolved (which imports it).
    return _omegaconf_allowed() if _omegaconf_allowed.cache_info().currsize else ()


def _build_bytesio(inst: io.BytesIO, state: Any) -> None:
    if not (isinstance(state, tuple) and len(state) == 3 and isinstance(state[0], bytes)):
        raise BadRecord("a BytesIO whose state is not its bytes")
    if not (type(state[1]) is int and 0 <= state[1] <= len(state[0]) and state[2] in (None, {})):
        raise BadRecord("a BytesIO whose state is not its bytes")
    inst.__setstate__((state[0], state[1], None))  # type: ignore[attr-defined]


def _build_ordered_dict(inst: OrderedDict[Any, Any], state: Any) -> None:
    """``Module.state_dict()`` is an OrderedDict with one attribute: each module's version."""
    if state is None:
        return
    versions = state.get("_metadata") if isinstance(state, dict) and state.keys() == {"_metadata"} else None
    ok = isinstance(versions, dict) and all(
        isinstance(k, str) and isinstance(v, dict) and all(isinstance(x, str | int | None) for x in v.values())
        for k, v in versions.items()
    )
    if not ok:
        raise BadRecord("a state dict with other attributes than module versions")
    inst._metadata = versions  # type: ignore[attr-defined]


def _build_namespace(inst: argparse.Namespace, state: Any) -> None:
    """Megatron-LM's saved ``args``: attribute names and the (already inert) values they hold."""
    if not (isinstance(state, dict) and all(isinstance(k, str) and k.isidentifier() for k in state)):
        raise BadRecord("an argparse.Namespace whose state is not a table of argument names")
    vars(inst).update(state)


@functools.cache
def _omegaconf_builders() -> dict[type, Callable[[Any, Any], None]]:
    """How each OmegaConf type takes its pickled state: checked field by field, then set through
    OmegaConf's own ``__setstate__``/``__init__``. Nodes form a tree (each child's parent is the
    container holding it), as every config OmegaConf pickles does."""
    from omegaconf import DictConfig, ListConfig, Node
    from omegaconf.base import ContainerMetadata, Metadata

    types = (None, typing.Any, dict, list, int, float, bool, str, bytes, pathlib.Path, pathlib.PosixPath)
    primitives = (type(None), str, int, float, bool, bytes, pathlib.PurePath)
    key_types = (str, int, float, bool, bytes)  # the keys a DictConfig takes (OmegaConf asserts on others)

    def is_type(value: Any) -> bool:
        return any(value is t for t in types)

    def fields(state: Any, allowed: set[str], required: set[str]) -> dict[str, Any]:
        if not isinstance(state, dict) or not required <= state.keys() <= allowed:
            raise BadRecord("an OmegaConf object with other attributes than OmegaConf gives it")
        return {k: v for k, v in state.items() if k != "_flags_cache"}  # a cache, rebuilt when needed

    def metadata(inst: Any, state: Any) -> None:
        names = {f.name for f in dataclasses.fields(type(inst))}
        state = fields(state, names, {"ref_type", "object_type", "optional", "key"})
        flags = state.get("flags") or {}
        ok = (
            all(is_type(state.get(k)) for k in ("ref_type", "object_type", "element_type"))
            and any(state.get("key_type") is t for t in (None, typing.Any, *key_types))
            and isinstance(state["optional"], bool)
            and isinstance(state.get("flags_root", False), bool)
            and isinstance(state["key"], primitives)
            and isinstance(flags, dict)
            and all(isinstance(k, str) and isinstance(v, bool | None) for k, v in flags.items())
            and isinstance(state.get("resolver_cache", {}), dict)
        )
        if not ok:
            raise BadRecord("OmegaConf metadata with values of other types than OmegaConf writes")
        # Set as pickle would (older OmegaConf files lack some fields: the class defaults stand);
        # resolved values are recomputed, never taken from the file.
        vars(inst).update(state, flags=flags, resolver_cache=defaultdict(dict))

    def parent_ok(state: dict[str, Any]) -> bool:
        return state["_parent"] is None or isinstance(state["_parent"], DictConfig | ListConfig)

    def leaf(inst: Any, state: Any) -> None:
        state = fields(state, {"_metadata", "_parent", "_val", "_flags_cache"}, {"_metadata", "_parent", "_val"})
        if (
            type(state["_metadata"]) is not Metadata
            or not parent_ok(state)
            or not isinstance(state["_val"], primitives)
        ):
            raise BadRecord("an OmegaConf value that is not a plain value")
        inst.__setstate__(state)

    def container(inst: Any, state: Any) -> None:
        names = {"_metadata", "_parent", "_content", "_flags_cache"}
        state = fields(state, names, names - {"_flags_cache"})
        content = state["_content"]
        nodes = content.values() if isinstance(content, dict) else content if isinstance(content, list) else []
        ok = (
            type(state["_metadata"]) is ContainerMetadata
            and parent_ok(state)
            and (content is None or isinstance(content, str | (dict if isinstance(inst, DictConfig) else list)))
            and (not isinstance(content, dict) or all(isinstance(k, key_types) for k in content))
            and all(isinstance(n, Node) and vars(n).get("_parent") is inst for n in nodes)
        )
        if not ok:
            raise BadRecord("an OmegaConf container whose content is not a tree of OmegaConf nodes")
        inst.__setstate__(state)

    builders: dict[type, Callable[[Any, Any], None]] = {Metadata: metadata, ContainerMetadata: metadata}
    builders.update(dict.fromkeys((t for t in _omegaconf_allowed() if issubclass(t, Node)), leaf))
    builders[DictConfig] = builders[ListConfig] = container  # nodes too, but holding others
    return builders


def _builder(cls: Any) -> Callable[[Any, Any], None] | None:
    """How an object of ``cls`` takes its pickled state (BUILD); None: it may not."""
    if not isinstance(cls, type):
        return None
    if issubclass(cls, dcp_records.Record):
        return cls.__setstate__  # the stand-ins check their fields themselves
    if cls is io.BytesIO:
        return _build_bytesio
    if cls is OrderedDict:
        return _build_ordered_dict
    if cls is argparse.Namespace:  # resolved only for files known to hold one (a Megatron run's common.pt)
        return _build_namespace
    return _omegaconf_builders().get(cls) if _omegaconf_if_loaded() else None


class _Unpickler(_PureUnpickler):
    """The pure-Python unpickler with every opcode that calls an object or gives one state checked.

    The C unpickler calls whatever BUILD finds on the stack: ``__setstate__``, or ``setattr`` with
    the file's names and values, on classes too (changing an allowed class for the whole process).
    Here only objects made by NEWOBJ from a class with a builder take state, once; calls are
    limited to the stand-ins and the checked arguments of :data:`_CALL_ARGS`."""

    dispatch = dict(_PureUnpickler.dispatch)

    def __init__(self, data: bytes, resolve: Resolve, what: str, persistent_load: Callable[[Any], Any] | None):
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self.resolve = resolve
        self.what = what
        self._persistent_load = persistent_load
        self._unbuilt: dict[int, Any] = {}  # made by NEWOBJ, waiting for their BUILD
        self._third_party = _third_party()

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
        self._third_party = _third_party()  # omegaconf's types, once a name of it is resolved
        return found

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent_load is None:  # e.g. a .metadata file has none: this is something else
            raise pickle.UnpicklingError("unexpected persistent id")
        return self._persistent_load(pid)

    def _refuse(self, doing: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(
            f"{self.what}: refused to load: it {doing}, which no NeMo checkpoint does; loading this file the "
            "usual way (torch.load with weights_only=False, or pickle) could change what the program does"
        )

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        check = _CALL_ARGS.get(func) if isinstance(func, Hashable) else None
        if not isinstance(args, tuple) or (check is None and id(func) in self._third_party):
            raise self._refuse(f"calls {_name(func)}")
        if check is not None and not check(*args):
            raise self._refuse(f"calls {_name(func)} with unexpected arguments")
        made = func(*args)
        if type(made) is OrderedDict:  # the one called type that takes state (a state dict's versions)
            self._unbuilt[id(made)] = made
        self.stack[-1] = made

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args))

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        if kwargs:
            raise self._refuse(f"makes a {_name(cls)} with keyword arguments")
        self.append(self._new(cls, args))

    def _new(self, cls: Any, args: Any) -> Any:
        if args != () or _builder(cls) is None:
            raise self._refuse(f"makes a {_name(cls)} without calling it")
        obj = cls.__new__(cls)
        self._unbuilt[id(obj)] = obj
        return obj

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, type) or self._unbuilt.pop(id(inst), None) is not inst:
            raise self._refuse(f"sets the attributes of {_name(inst)}")
        builder = _builder(type(inst))
        assert builder is not None  # _new made it only for a class that has one
        builder(inst, state)

    def load_inst(self) -> None:  # protocol 0 and 1 ways of making an object: never in checkpoints
        raise self._refuse("makes an object by INST or OBJ")

    load_obj = load_inst

    def _container(self, kind: type, opcode: str) -> Any:
        target = self.stack[-1]
        if not isinstance(target, kind) or isinstance(target, type):
            raise BadRecord(f"{opcode} on a {type(target).__name__}")
        return target

    def load_append(self) -> None:
        value = self.stack.pop()
        self._container(list, "APPEND").append(value)

    def load_appends(self) -> None:
        items = self.pop_mark()
        self._container(list, "APPENDS").extend(items)

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._container(dict, "SETITEM")[_tensor_name(key, value)] = value

    def load_setitems(self) -> None:
        items = self.pop_mark()
        target = self._container(dict, "SETITEMS")
        for i in range(0, len(items), 2):
            target[_tensor_name(items[i], items[i + 1])] = items[i + 1]

    def load_additems(self) -> None:
        items = self.pop_mark()
        self._container(set, "ADDITEMS").update(items)

    for _opcode, _method in (
        (pickle.REDUCE, load_reduce),
        (pickle.NEWOBJ, load_newobj),
        (pickle.NEWOBJ_EX, load_newobj_ex),
        (pickle.BUILD, load_build),
        (pickle.INST, load_inst),
        (pickle.OBJ, load_obj),
        (pickle.APPEND, load_append),
        (pickle.APPENDS, load_appends),
        (pickle.SETITEM, load_setitem),
        (pickle.SETITEMS, load_setitems),
        (pickle.ADDITEMS, load_additems),
    ):
        dispatch[_opcode[0]] = _method

    def load_all(self) -> Any:
        value = self.load()
        for obj in self._unbuilt.values():  # an object pickled without state (a record with no fields)
            builder = _builder(type(obj))
            assert builder is not None
            builder(obj, None)
        return value


def _tensor_name(key: Any, value: Any) -> Any:
    """A dict's key, checked: tensors are named by strings (a state dict's keys are parameter names;
    optimizer states number their parameters, but hold dicts there, not tensors)."""
    if isinstance(value, Stored) and not isinstance(key, str):
        raise BadRecord(f"a tensor is named {key!r}, not by a string")
    return key


def _name(obj: Any) -> str:
    """A class or function by its name, anything else by its type's."""
    named = getattr(obj, "__qualname__", None) if isinstance(obj, type) or callable(obj) else None
    return named if isinstance(named, str) else type(obj).__qualname__


def _check_nesting(value: Any, what: str) -> None:
    """Refuse containers that contain themselves or nest deeper than :data:`MAX_DEPTH` (whatever walks
    the object afterwards recurses). Shared ones are walked once."""
    done: set[int] = set()
    path: set[int] = set()

    def visit(obj: Any, depth: int) -> None:
        children = _children(obj)
        if children is None or id(obj) in done:
            return
        if id(obj) in path:
            raise CheckpointFormatError(f"{what}: holds a container that contains itself; not a checkpoint")
        if depth > MAX_DEPTH:
            raise CheckpointFormatError(f"{what}: nested more than {MAX_DEPTH} levels deep; not a checkpoint")
        path.add(id(obj))
        for child in children:
            visit(child, depth + 1)
        path.discard(id(obj))
        done.add(id(obj))

    visit(value, 0)


_LEAVES = frozenset({int, float, str, bytes, bool, type(None)})  # exactly these types: most of a .metadata


def _children(obj: Any) -> Iterable[Any] | None:
    if type(obj) in _LEAVES:
        return None
    if isinstance(obj, dict):
        return [*obj.keys(), *obj.values()]
    if isinstance(obj, list | tuple | set | frozenset):
        return obj
    if isinstance(obj, dcp_records.Record):
        return list(vars(obj).values())
    content = vars(obj).get("_content") if _omegaconf_if_loaded() and hasattr(obj, "__dict__") else None
    return content.values() if isinstance(content, dict) else content if isinstance(content, list) else None


def restricted_loads(
    data: bytes,
    allowed: Globals | Resolve,
    *,
    what: str,
    persistent_load: Callable[[Any], Any] | None = None,
) -> Any:
    """Unpickle ``data``, resolving only the names ``allowed`` maps (or resolves); anything else is refused.
    No object takes state or is called but as real checkpoints need, and nothing nests without end."""
    resolve = allowed if callable(allowed) else lambda module, name: allowed.get((module, name))
    try:
        value = _Unpickler(data, resolve, what, persistent_load).load_all()
    except (UnsafeCheckpointError, CheckpointFormatError, UnsupportedError):
        raise
    except BadRecord as exc:
        raise CheckpointFormatError(f"{what}: {exc}; not a checkpoint this tool reads") from None
    except Exception as exc:  # truncated or garbled: pickle raises many types here
        raise CheckpointFormatError(f"{what}: unreadable ({type(exc).__name__}: {exc})") from None
    _check_nesting(value, what)
    return value


def _metadata_global(module: str, name: str) -> Any:
    return METADATA_GLOBALS.get((module, name)) or _megatron_standin(module, name)


def restricted_unpickle(data: bytes, *, what: str) -> Any:
    """Unpickle a torch_dist ``.metadata`` into :mod:`.dcp_records` stand-ins (torch's and megatron's
    metadata classes, by name); anything else is refused."""
    return restricted_loads(data, _metadata_global, what=what)
