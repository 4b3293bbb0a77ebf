"""Resize a checkpoint's vocabulary: the plan, its report, and applying it to every vocab-sized tensor.

Works on ``Checkpoint`` objects only, so the CLI and the NeMo plugin share one implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .checkpoint import HF_LAYOUT, Checkpoint, Value, tokenizer_config
from .core.dtypes import DType, dtype_of
from .core.keys import UnknownKeysError, VocabKeys, find_vocab_keys
from .core.rows import INIT_DESCRIPTIONS, Init, RowPlan, ShrinkRefusedError, plan_rows
from .core.sizes import padded_vocab_size, positive_count
from .entries import (
    Entries,
    Stored,
    array_as_torch,
    held,
    is_tensor,
    same_bytes_key,
    tensor_meta,
    torch_as_array,
)
from .errors import CheckpointFormatError, ConfigError, ResizeError, TokenizerError, VocabExtError
from .formats.byteio import mapped_array, read_array
from .init_costs import expected_cost
from .options import DEFAULTS
from .tokenization.check import check_ids_preserved
from .tokenization.load import TokenizerInfo, load_tokenizer

if TYPE_CHECKING:
    import numpy as np
    import torch

# Tables are read and computed as numpy arrays: a resize to a file never imports torch (about 3 s).
# torch is imported only where torch tensors are made (the plugin, optimizer state, rank files).

REPORT_TP_SIZES = (1, 2, 4, 8)
PER_TP_LINE = "padded rows per tensor-parallel size: "
# Optimizer entries of a distributed training checkpoint that follow a parameter's rows.
OPTIMIZER_MOMENTS = ("optimizer.state.exp_avg.", "optimizer.state.exp_avg_sq.")
OPTIMIZER_MASTER = "optimizer.state.fp32_param."


def model_config_int(config: dict[str, Any], key: str, default: int) -> int:
    """A positive whole number of the model config (``default`` when absent); anything else is a
    :class:`ConfigError` naming the key and the value."""
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, str) and "${" in value:
        value = _resolve_interpolation(config, key)
    try:
        return positive_count(value, key)
    except ValueError:
        raise ConfigError(
            f"model config: {key}={config[key]!r} is not a positive whole number; set it to one (as NeMo expects)"
        ) from None


def _resolve_interpolation(config: dict[str, Any], key: str) -> object:
    """``key``'s value with its ``${...}`` resolved against the model config, as OmegaConf would."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.create(config)[key]
    except OmegaConfBaseException as e:
        reason = str(e).splitlines()[0]
        raise ConfigError(
            f"model config: {key}={config[key]!r} is an interpolation that cannot be resolved ({reason})"
        ) from None


def check_model_config(config: dict[str, Any]) -> None:
    """Refuse a model config whose sizes or tokenizer section no NeMo run could use, before anything
    is written from it (a copy would carry them on into a checkpoint that cannot be trained)."""
    divisible_by_of(config)
    tensor_parallel_of(config)
    pipeline_parallel_of(config)
    if config.get("override_vocab_size") is not None:
        model_config_int(config, "override_vocab_size", 0)
    tokenizer_config(config)


def divisible_by_of(config: dict[str, Any]) -> int:
    return model_config_int(config, "make_vocab_size_divisible_by", DEFAULTS.divisible_by)


def tensor_parallel_of(config: dict[str, Any]) -> int:
    return model_config_int(config, "tensor_model_parallel_size", DEFAULTS.tensor_parallel)


def pipeline_parallel_of(config: dict[str, Any]) -> int:
    return model_config_int(config, "pipeline_model_parallel_size", 1)


def expected_rows(
    vocab_size: int, config: dict[str, Any], *, tp: int | None = None, divisible_by: int | None = None
) -> int:
    """Rows NeMo builds for ``vocab_size`` under ``config`` (``override_vocab_size`` wins, as in NeMo)."""
    if config.get("override_vocab_size") is not None:
        return model_config_int(config, "override_vocab_size", 0)
    return padded_vocab_size(vocab_size, divisible_by or divisible_by_of(config), tp or tensor_parallel_of(config))


def vocab_tables(ckpt: Checkpoint) -> dict[str, np.ndarray]:
    """Global vocab-sized tables keyed as stored (tensor-parallel rank files joined), as numpy arrays
    of their stored elements (:func:`~.formats.byteio.read_array`). A table stored as one region of a
    file is mapped, read-only, where it lies (:func:`~.formats.byteio.mapped_array`): a resize reads
    it without copying 200 MB into memory first. Tied copies (one storage under two names) share one
    array.
    """
    from .core.resize import join_vocab_shards

    out: dict[str, np.ndarray] = {}
    read: dict[Hashable, np.ndarray] = {}
    for key in vocab_table_shapes(ckpt):
        if (identity := same_table(ckpt, key)) in read:
            out[key] = read[identity]
            continue
        if ckpt.rank_tensors is None:
            stored = held(ckpt.tensors, key)
            mapped = mapped_array(stored) if isinstance(stored, Stored) else None
            table = read_array(stored) if mapped is None else mapped
        else:
            # Legacy rank files list TP ranks of one pipeline stage; a key lives on one stage.
            table = join_vocab_shards(
                [
                    read_array(state[key])  # type: ignore[arg-type]
                    for (_, _), state in sorted(ckpt.rank_tensors.items())
                    if key in state and is_tensor(state[key])
                ]
            )
        out[key] = read[identity] = table
    return out


def vocab_table_shapes(ckpt: Checkpoint) -> dict[str, tuple[tuple[int, ...], DType]]:
    """Global shape and dtype of each vocab table, as :func:`vocab_tables` would return it, from the
    stored metadata: nothing is read."""
    out: dict[str, tuple[tuple[int, ...], DType]] = {}
    states = [ckpt.tensors] if ckpt.rank_tensors is None else [s for _, s in sorted(ckpt.rank_tensors.items())]
    for key in ckpt.vocab_keys().all():
        metas = [meta for state in states if key in state and (meta := tensor_meta(state, key)) is not None]
        if not metas:
            raise CheckpointFormatError(f"'{key}' is not a stored tensor")
        (shape, dtype) = metas[0]
        out[key] = ((sum(m[0][0] for m in metas), *shape[1:]), dtype)  # row blocks of TP ranks, joined
    return out


@dataclass
class TensorResize:
    key: str
    old_shape: tuple[int, ...]
    new_shape: tuple[int, ...]
    fvt_fallbacks: int = 0


@dataclass
class ResizePlan:
    old_vocab: int | None
    new_vocab: int
    rows: RowPlan
    tensor_parallel: int
    divisible_by: int
    init: Init
    padding_init: Init
    tied: bool
    keys: VocabKeys

    def padded_per_tp(self) -> dict[int, tuple[int | None, int]]:
        old = self.old_vocab
        return {
            tp: (
                padded_vocab_size(old, self.divisible_by, tp) if old else None,
                padded_vocab_size(self.new_vocab, self.divisible_by, tp),
            )
            for tp in REPORT_TP_SIZES
        }

    def lines(self, done: Sequence[TensorResize] = ()) -> list[str]:
        """The human-readable plan; with ``done`` (what ``apply_resize`` did), the report."""
        old = (
            "unknown (no tokenizer in the checkpoint: every stored row treated as a token)"
            if self.old_vocab is None
            else f"{self.old_vocab:,}"
        )
        out = [
            f"tokenizer size: {old} -> {self.new_vocab:,}",
            f"rows: {self.rows.old_rows:,} -> {self.rows.new_rows:,} "
            f"(make_vocab_size_divisible_by={self.divisible_by}, tensor parallel={self.tensor_parallel})",
            PER_TP_LINE
            + ", ".join(f"TP{tp}: {o if o is not None else '?'} -> {n}" for tp, (o, n) in self.padded_per_tp().items()),
            "tables: "
            + (
                "embedding (tied with the output layer)"
                if self.tied
                else "embedding and untied output layer, each with its own statistics"
            ),
        ]
        for rc in self.rows.classes(self.init, self.padding_init):
            if rc.rows:
                out.append(f"  rows [{rc.start:,}, {rc.stop:,}) {rc.name}: {rc.action} ({rc.rows:,} rows)")
        out.append(f"init '{self.init}': {INIT_DESCRIPTIONS[self.init]}")
        out.append(f"expected cost of '{self.init}': {expected_cost(self.init)}")
        for t in done:
            extra = f", fvt fallbacks to mean: {t.fvt_fallbacks}" if self.init.needs_pieces else ""
            out.append(f"{t.key}: {list(t.old_shape)} -> {list(t.new_shape)}{extra}")
        return out


def plan_resize(
    ckpt: Checkpoint,
    old_vocab: int | None,
    new_vocab: int,
    *,
    tensor_parallel: int | None = None,
    divisible_by: int | None = None,
    init: Init,
    padding_init: Init,
    allow_shrink: bool = False,
    shrink_hint: str = "pass --allow-shrink to drop them",
) -> ResizePlan:
    keys = ckpt.vocab_keys()
    shapes = vocab_table_shapes(ckpt)
    old_rows = shapes[keys.embedding][0][0]
    tp = tensor_parallel or tensor_parallel_of(ckpt.config)
    multiple = divisible_by or divisible_by_of(ckpt.config)
    new_rows = padded_vocab_size(new_vocab, multiple, tp)
    for key, (shape, _) in shapes.items():
        if shape[0] != old_rows:
            raise ResizeError(
                f"'{key}' has {shape[0]} rows but the embedding has {old_rows}; the checkpoint is inconsistent"
            )
    try:
        rows = plan_rows(old_vocab, old_rows, new_vocab, new_rows, allow_shrink=allow_shrink)
    except ShrinkRefusedError as e:
        raise ResizeError(f"{e}; {shrink_hint}") from e
    except ValueError as e:
        raise ResizeError(str(e)) from e
    return ResizePlan(old_vocab, new_vocab, rows, tp, multiple, init, padding_init, keys.tied, keys)


def _resize_rows_only(t: torch.Tensor, rows: RowPlan) -> torch.Tensor:
    """Optimizer moments: kept rows copied, every other row zero (a fresh start for new tokens)."""
    out = t.new_zeros((rows.new_rows, *t.shape[1:]))
    out[: rows.kept] = t[: rows.kept]
    return out


class ResizedTable(NamedTuple):
    """A resized vocab table: the old table's first ``kept`` rows, then ``tail`` (the computed rows)."""

    old: np.ndarray
    kept: int
    tail: np.ndarray

    def array(self) -> np.ndarray:
        import numpy as np

        return np.concatenate([self.old[: self.kept], self.tail])


def resized_tables(
    ckpt: Checkpoint,
    plan: ResizePlan,
    tables: Mapping[str, np.ndarray],
    *,
    pieces: Sequence[Sequence[int]] | None = None,
    seed: int = 0,
    means: Mapping[int, Callable[[], np.ndarray]] | None = None,
    workers: int = 1,
    tails: Mapping[str, np.ndarray] | None = None,
) -> Iterator[tuple[str, ResizedTable, int]]:
    """Each of ``tables`` (:func:`vocab_tables`) resized, in their order, tied copies once (under their
    first key), with its fvt fallbacks. Each is computed when asked for, so that a caller can write a
    table while the next one is computed; one generator draws the sampling inits' values for all.

    ``pieces``: fvt's, of each new token (:func:`~.pipeline.checked_pieces`); ``means``: the old rows'
    means already being taken (:func:`start_row_means`); ``workers``: fvt's threads; ``tails``: where
    each table's computed rows go, by key (a writer's buffer), else new arrays.
    """
    import numpy as np

    from .core.resize import rows_after_kept

    dtypes = {key: dtype for key, (_, dtype) in vocab_table_shapes(ckpt).items()}
    rng = np.random.default_rng(seed)
    computed: set[int] = set()  # ids of the arrays resized: a tied copy's is its table's
    for key, old in tables.items():
        if id(old) in computed:
            continue
        computed.add(id(old))
        tail, stats = rows_after_kept(
            old,
            plan.rows,
            plan.init,
            dtype=dtypes[key],
            padding_init=plan.padding_init,
            pieces=pieces,
            rng=rng,
            mean=(means or {}).get(id(old)),
            workers=workers,
            out=(tails or {}).get(key),
        )
        yield key, ResizedTable(old, plan.rows.kept, tail), stats.fvt_fallbacks


def start_row_means(
    ckpt: Checkpoint, plan: ResizePlan, tables: Mapping[str, np.ndarray]
) -> dict[int, Callable[[], np.ndarray]]:
    """The old real rows' mean of each of ``tables`` (by ``id``) whose resize takes it whatever the
    pieces, each started now on a thread: a resize reads the tokenizers first, mostly Python holding
    the GIL, while the mean is numpy's and does not need it. Each value waits for its mean."""
    from .beside import Beside
    from .core.resize import mean_is_used, row_mean

    if not plan.rows.old_vocab or not mean_is_used(plan.rows, plan.init, plan.padding_init):
        return {}
    dtypes = {key: dtype for key, (_, dtype) in vocab_table_shapes(ckpt).items()}
    means: dict[int, Callable[[], np.ndarray]] = {}
    for key, old in tables.items():
        if id(old) not in means:
            means[id(old)] = Beside.start(row_mean, old[: plan.rows.old_vocab], dtypes[key]).result
    return means


def resize_report(
    plan: ResizePlan, tables: Mapping[str, np.ndarray], fallbacks: Mapping[str, int]
) -> list[TensorResize]:
    """What was done to each table resized (the keys of ``fallbacks``, with their fvt fallbacks)."""
    return [
        TensorResize(key, tuple(tables[key].shape), (plan.rows.new_rows, *tables[key].shape[1:]), count)
        for key, count in fallbacks.items()
    ]


def resize_tables(
    ckpt: Checkpoint,
    plan: ResizePlan,
    *,
    pieces: Sequence[Sequence[int]] | None = None,
    seed: int = 0,
) -> tuple[dict[str, ResizedTable], list[TensorResize]]:
    """The resized vocab tables (global, keyed as stored; tied copies resized once, into one object) and
    what was done. Each is its old table (read-only where it is mapped from its file) and the rows
    computed after its kept ones, numpy arrays of stored elements.

    ``pieces``: fvt's, of each new token (:func:`~.pipeline.checked_pieces`).
    """
    tables = vocab_tables(ckpt)
    resized: dict[int, ResizedTable] = {}
    fallbacks: dict[str, int] = {}
    for key, table, fallback_count in resized_tables(ckpt, plan, tables, pieces=pieces, seed=seed):
        resized[id(table.old)], fallbacks[key] = table, fallback_count
    return {key: resized[id(old)] for key, old in tables.items()}, resize_report(plan, tables, fallbacks)


def same_table(ckpt: Checkpoint, key: str) -> Hashable:
    """Equal for tied copies of one table. Rank layouts hold rank 0's view in ``tensors``; a table not
    on rank 0 (a later pipeline stage) is its own."""
    if key not in ckpt.tensors:
        return key
    return same_bytes_key(held(ckpt.tensors, key))


def with_tables(ckpt: Checkpoint, plan: ResizePlan, new_tables: dict[str, Any]) -> Checkpoint:
    """``ckpt`` with its vocab tables replaced (and their optimizer state following ``plan``); the tables
    may be tensors or :class:`~.entries.Deferred` entries. Nothing else is read."""
    # Untouched entries stay as held (on disk until written); only the resized ones are in memory.
    tensors: dict[str, object] = {k: held(ckpt.tensors, k) for k in ckpt.tensors}
    for key, new in new_tables.items():
        if ckpt.rank_tensors is None:
            tensors[key] = new
        for prefix in OPTIMIZER_MOMENTS:
            if prefix + key in ckpt.tensors:
                moment = ckpt.tensors[prefix + key]
                if is_tensor(moment):
                    tensors[prefix + key] = _resize_rows_only(moment, plan.rows)  # type: ignore[arg-type]
        if OPTIMIZER_MASTER + key in ckpt.tensors and is_tensor(ckpt.tensors[OPTIMIZER_MASTER + key]):
            tensors[OPTIMIZER_MASTER + key] = new.float()  # type: ignore[union-attr]
    rank_tensors = None
    if ckpt.rank_tensors is not None:
        rank_tensors = _split_into_ranks(ckpt.rank_tensors, new_tables)
        tensors = dict(rank_tensors[min(rank_tensors)])
    config = dict(ckpt.config)
    # Stale: it would win over the new tokenizer's size. Removed, not nulled: NeMo reads it with
    # cfg.get('override_vocab_size', padded) and a null would become the table size.
    config.pop("override_vocab_size", None)
    return replace(ckpt, tensors=Entries(tensors), config=config, rank_tensors=rank_tensors)


def apply_resize(
    ckpt: Checkpoint,
    plan: ResizePlan,
    *,
    pieces: Sequence[Sequence[int]] | None = None,
    seed: int = 0,
) -> tuple[Checkpoint, list[TensorResize]]:
    """A new Checkpoint whose vocab tables (torch tensors, and their optimizer state) follow ``plan``,
    and what was done. ``pieces``: as for :func:`resize_tables`."""
    resized, done = resize_tables(ckpt, plan, pieces=pieces, seed=seed)
    shapes = vocab_table_shapes(ckpt)
    made: dict[int, torch.Tensor] = {}  # tied copies: one tensor under both names, written once
    for key, table in resized.items():
        if id(table) not in made:
            made[id(table)] = array_as_torch(table.array(), shapes[key][1])
    tensors = {key: made[id(table)] for key, table in resized.items()}
    return with_tables(ckpt, plan, tensors), done


def _split_into_ranks(
    ranks: dict[tuple[int, int], dict[str, Value]], new_tables: dict[str, torch.Tensor]
) -> dict[tuple[int, int], dict[str, Value]]:
    from .core.resize import split_vocab_rows

    out = {rank: dict(state) for rank, state in ranks.items()}
    for key, table in new_tables.items():
        holders = sorted(rank for rank, state in ranks.items() if key in state)
        stage_ranks = sorted({tp for tp, _ in holders})
        dtype = dtype_of(table.dtype)
        blocks = split_vocab_rows(torch_as_array(table), len(stage_ranks))
        for tp, pp in holders:
            out[(tp, pp)][key] = array_as_torch(blocks[stage_ranks.index(tp)], dtype)
    return out


def checkpoint_tokenizer_files(ckpt: Checkpoint, out_dir: Path) -> Path | None:
    """Write the checkpoint's embedded tokenizer under plain file names; None when it carries none."""
    if ckpt.layout == HF_LAYOUT:
        from .formats.hf_folder import hf_tokenizer_files

        return hf_tokenizer_files(ckpt, out_dir)
    from .formats.nemo import nemo_tokenizer_files

    return nemo_tokenizer_files(ckpt, out_dir)


def check_tokenizer_fits(own: TokenizerInfo, new: TokenizerInfo, what: str) -> None:
    """The smaller tokenizer's ids must all be kept by the larger one, or trained rows would be scrambled.

    Growing, that is every base id in the merged tokenizer; shrinking (allowed), every kept id in the base.
    """
    check = check_ids_preserved(own, new) if new.vocab_size >= own.vocab_size else check_ids_preserved(new, own)
    if not check.ok:
        raise TokenizerError(
            f"{what}: {check.summary()}; the pretrained rows would be scrambled. "
            "Build the new tokenizer with `nemo-vocab-ext tokenizer merge`"
        )


def training_checkpoint_rows(path: Path) -> int | None:
    """Embedding rows a training checkpoint stores: a distributed folder's (from its ``.metadata``) or a
    Lightning file's (from its state dict, no tensor read); None for anything else, or a file this
    package does not read (NeMo loads it as it would)."""
    from .formats.lightning import is_dist_checkpoint_dir
    from .io import Format, load_checkpoint

    if is_dist_checkpoint_dir(path):
        from .formats.torch_dist import read_tensor_infos

        shapes = {k: tuple(v.shape) for k, v in read_tensor_infos(path).items()}
        return shapes[find_vocab_keys(k for k in shapes if k.startswith("model.")).embedding][0]
    if not path.is_file():
        return None
    try:
        ckpt, _ = load_checkpoint(path, Format.CKPT)
        return vocab_table_shapes(ckpt)[ckpt.vocab_keys().embedding][0][0]
    except (VocabExtError, UnknownKeysError):
        return None


def refuse_training_checkpoint_of_another_size(path: Path, built_rows: int) -> None:
    """A training checkpoint loads only into a table of its own size: megatron would silently zero-fill or
    truncate a distributed one's table (and its optimizer moments), and fail on a single file's."""
    stored = training_checkpoint_rows(path)
    if stored is not None and stored != built_rows:
        raise ResizeError(
            f"{path}: training checkpoint has {stored} embedding rows but the model has {built_rows} for the "
            f"configured tokenizer; resume it with the tokenizer it was trained with, or export its weights "
            f"(`nemo-vocab-ext convert {path} weights.nemo`) and continue with model.restore_from_path=weights.nemo "
            f"+model.vocab_extension.init=..."
        )


def load_checkpoint_tokenizer(ckpt: Checkpoint, workdir: Path) -> TokenizerInfo | None:
    """The checkpoint's own tokenizer (from its ``nemo:`` artifacts), or None."""
    where = checkpoint_tokenizer_files(ckpt, workdir)
    return None if where is None else load_tokenizer(where)
