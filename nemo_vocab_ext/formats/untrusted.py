"""Checks on what a reader takes from inside a checkpoint, before it uses it.

Every name a checkpoint gives (archive members, a folder's files, artifact names, ``nemo:``
references, the data files a torch_dist ``.metadata`` names, safetensors shards) passes
:func:`plain_member_name`; every model config passes :func:`check_config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..checkpoint import artifact_named
from ..errors import CheckpointFormatError, ConfigError, UnsafeCheckpointError

MAX_CONFIG_BYTES = 16 << 20  # a model config's text; NeMo's are a few kB
MAX_CONFIG_VALUES = 1_000_000  # values in a config with every alias expanded; NeMo's have about a thousand
MAX_CONFIG_DEPTH = 64  # NeMo's configs nest a few levels; deep ones overflow the recursion of dumpers


def normalize_member(name: str) -> str:
    """``./model_config.yaml`` and ``model_config.yaml`` name the same member; ``./`` is the root."""
    while name.startswith("./"):
        name = name[2:]
    name = name.rstrip("/")
    return "" if name == "." else name


def plain_member_name(name: object, source: object) -> str:
    """``name`` (without ``./`` prefixes) if it is a plain relative name inside the checkpoint.

    Refused: anything but text, absolute paths, drive letters, ``..``, ``.`` or empty parts, NUL and
    backslashes (a path separator elsewhere): joined to a folder, such a name could reach outside it.
    """
    if not isinstance(name, str):
        raise UnsafeCheckpointError(f"{source}: a member name is a {type(name).__name__}, not text; refusing it")
    plain = normalize_member(name)
    if name.startswith("/") or plain[1:2] == ":":
        raise UnsafeCheckpointError(f"{source}: member {name!r} has an absolute path; refusing the checkpoint")
    parts = plain.split("/")
    if ".." in parts:
        raise UnsafeCheckpointError(
            f"{source}: member {name!r} points outside the archive or folder ('..'); refusing the checkpoint"
        )
    if not plain or "\0" in plain or "\\" in plain or any(p in ("", ".") for p in parts):
        raise UnsafeCheckpointError(f"{source}: member {name!r} is not a plain relative name; refusing the checkpoint")
    return plain


def check_artifacts(artifacts: object, source: object) -> dict[str, bytes]:
    """A checkpoint's artifact table: plain member names to bytes."""
    if not isinstance(artifacts, Mapping):
        raise CheckpointFormatError(f"{source}: the artifacts are a {type(artifacts).__name__}, not a table")
    for name, data in artifacts.items():
        plain_member_name(name, source)
        if not isinstance(data, bytes):
            raise CheckpointFormatError(f"{source}: artifact {name!r} is a {type(data).__name__}, not bytes")
    return dict(artifacts)


def _children(value: object) -> list[Any] | None:
    """The values inside a container; None for a scalar."""
    if type(value).__module__.startswith("omegaconf"):
        # Pickled hyper-parameters: their nodes, read without resolving anything (converting expands aliases).
        content = getattr(value, "_content", None)
        if isinstance(content, dict):
            return list(content.values())
        return list(content) if isinstance(content, list) else None
    if isinstance(value, Mapping):
        return list(value.values())
    if isinstance(value, list | tuple):
        return list(value)
    return None


def _check_size(config: object, source: object) -> None:
    """Refuse cycles, deep nesting and alias bombs (a few kB that expand to billions of values), in linear time:
    a container reached twice is counted with its expanded size, which is computed once."""
    sizes: dict[int, int] = {}
    open_ids: set[int] = set()  # containers whose contents are being counted: reaching one again is a cycle
    stack: list[tuple[Any, int, list[Any] | None]] = [(config, 0, None)]
    while stack:
        value, depth, done = stack.pop()
        key = id(value)
        if done is not None:
            open_ids.discard(key)
            sizes[key] = 1 + sum(sizes.get(id(c), 1) for c in done)
            if sizes[key] > MAX_CONFIG_VALUES:
                raise ConfigError(
                    f"{source}: the model config expands to more than {MAX_CONFIG_VALUES} values (aliases repeated "
                    "over and over); refusing it"
                )
            continue
        children = _children(value)
        if children is None or key in sizes:
            continue
        if key in open_ids:
            raise ConfigError(f"{source}: the model config contains itself (a recursive alias); refusing it")
        if depth >= MAX_CONFIG_DEPTH:
            raise ConfigError(f"{source}: the model config nests deeper than {MAX_CONFIG_DEPTH} levels; refusing it")
        open_ids.add(key)
        stack.append((value, depth, children))
        stack.extend((c, depth + 1, None) for c in children)


def _check_refs(config: object, source: object) -> None:
    stack = [config]
    seen: set[int] = set()
    while stack:
        value = stack.pop()
        if (member := artifact_named(value)) is not None:
            plain_member_name(member, source)
            continue
        children = _children(value)
        if children is not None and id(value) not in seen:
            seen.add(id(value))
            stack.extend(children)


def check_config(config: object, source: object) -> dict[str, Any]:
    """A model config as read from a checkpoint: a mapping of bounded size whose ``nemo:`` references are plain
    member names."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"{source}: the model config is a {type(config).__name__}, not a mapping")
    _check_size(config, source)
    _check_refs(config, source)
    return config if isinstance(config, dict) else dict(config)


def check_config_text(data: bytes, source: object) -> str:
    """A config file's bytes as text, if within :data:`MAX_CONFIG_BYTES` and UTF-8."""
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: the model config is {len(data)} bytes, over the {MAX_CONFIG_BYTES}-byte limit")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source}: the model config is not UTF-8 text ({e})") from None
