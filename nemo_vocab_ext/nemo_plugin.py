"""The one module that touches NeMo: ``model.vocab_extension`` at restore time.

When the model config carries ``vocab_extension`` and the configured tokenizer needs a different
table than the checkpoint stores, the checkpoint is resized (by the same code as the CLI) into an
extracted .nemo folder before NeMo loads any weights, and NeMo restores from that folder. Every
rank does this independently and deterministically, as NeMo itself extracts the archive per rank;
megatron then hands each tensor-parallel rank exactly its rows of the new padded table.
Without ``vocab_extension`` nothing here runs: stock behaviour.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .atomic import SCRATCH_STEM, remove_stale, temp_dir
from .checkpoint import DISTRIBUTED, Checkpoint, artifact_named
from .core.keys import find_vocab_keys
from .core.rows import Init
from .errors import ConfigError, DataError, ResizeError, TokenizerError
from .formats.nemo import embed_tokenizer, read_dist_tensor_shapes, read_nemo, read_nemo_header, write_nemo_dir
from .options import DEFAULTS, PADDING_INITS, ResizeOptions
from .pipeline import Wording, checked_pieces, prepare_resize, with_padding_of
from .vocab import (
    apply_resize,
    checkpoint_tokenizer_files,
    expected_rows,
    refuse_training_checkpoint_of_another_size,
    vocab_table_shapes,
)

CONFIG_KEY = "vocab_extension"
WORDING = Wording(
    init_setting="vocab_extension.init=",
    new_tokenizer="a file-based new tokenizer",
    without_pieces="set +model.vocab_extension.init=mean (or zeros) without them",
    shrink_hint="set +model.vocab_extension.allow_shrink=true to drop them",
    tokenizer_name="model.tokenizer",
)


@dataclass(frozen=True)
class ExtensionSettings:
    """``model.vocab_extension``: every key, with its default (a resize's from :class:`ResizeOptions`)."""

    init: str = DEFAULTS.init.value  # fvt | zeros | mean | normal: new tokens' rows
    padding_init: str = DEFAULTS.padding_init.value  # zeros | mean | normal: rows past the tokenizer
    allow_shrink: bool = DEFAULTS.allow_shrink  # allow a table smaller than the trained one (drops rows)
    check_data: bool = False  # scan model.data.data_prefix for ids >= tokenizer size first
    report: bool = True  # log the resize report
    seed: int = DEFAULTS.seed  # seed of the 'normal' init
    work_dir: str | None = None  # where the resized copy is written (default: system temp)

    @classmethod
    def from_config(cls, node: Any) -> ExtensionSettings:
        if node is None or node is True:
            return cls()
        if isinstance(node, str):  # `+model.vocab_extension=fvt`
            node = {"init": node}
        values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        assert isinstance(values, dict)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(map(str, values)) - known)
        if unknown:
            raise ConfigError(f"model.vocab_extension: unknown key(s) {unknown}; valid keys: {sorted(known)}")
        settings = cls(**{str(k): v for k, v in values.items()})
        for name, allowed in (("init", list(Init)), ("padding_init", PADDING_INITS)):
            if getattr(settings, name) not in {i.value for i in allowed}:
                choices = [i.value for i in allowed]
                raise ConfigError(f"model.vocab_extension.{name}={getattr(settings, name)!r}; choose one of {choices}")
        return settings

    def options(self) -> ResizeOptions:
        """The resize these settings ask for (padded as the model config says: :func:`with_padding_of`)."""
        return ResizeOptions(Init(self.init), Init(self.padding_init), self.seed, self.allow_shrink)


def settings_of(model_cfg: Any) -> ExtensionSettings | None:
    """None when the config has no ``vocab_extension``: the plugin stays out of the way."""
    if model_cfg is None or isinstance(model_cfg, str):
        return None
    node = model_cfg.get(CONFIG_KEY) if hasattr(model_cfg, "get") else None
    if node is None or node is False:
        return None
    return ExtensionSettings.from_config(node)


def _log(msg: str) -> None:
    from nemo.utils import logging

    logging.info(f"[vocab_extension] {msg}")


def _resolve_file(ref: Any, artifacts: dict[str, bytes], workdir: Path, name: str) -> str | None:
    """A tokenizer file from the run's config: a local path, or a ``nemo:`` artifact of the checkpoint."""
    if not isinstance(ref, str) or not ref:
        return None
    if (member := artifact_named(ref)) is not None:
        data = artifacts.get(member)
        if data is None:
            raise ConfigError(f"tokenizer file {ref} is not in the checkpoint being restored")
        out = workdir / name
        out.write_bytes(data)
        return str(out)
    if not Path(ref).is_file():
        raise TokenizerError(f"{ref}: tokenizer file not found")
    return ref


def _nemo_tokenizer(tok_cfg: Any, artifacts: dict[str, bytes], workdir: Path) -> tuple[Any, dict[str, str]]:
    """Build the tokenizer exactly as MegatronBaseModel._build_tokenizer does; also its resolved files."""
    from nemo.collections.nlp.modules.common.tokenizer_utils import get_nmt_tokenizer

    files = {
        key: path
        for key, name in (("vocab_file", "vocab.json"), ("merge_file", "merges.txt"), ("model", "tokenizer.model"))
        if (path := _resolve_file(tok_cfg.get(key), artifacts, workdir, name)) is not None
    }
    legacy = tok_cfg.get("sentencepiece_legacy", tok_cfg.get("library") == "sentencepiece")
    tokenizer = get_nmt_tokenizer(
        library=tok_cfg.get("library"),
        model_name=tok_cfg.get("type", None),
        tokenizer_model=files.get("model"),
        vocab_file=files.get("vocab_file"),
        merges_file=files.get("merge_file"),
        use_fast=tok_cfg.get("use_fast", False),
        delimiter=tok_cfg.get("delimiter", None),
        special_tokens=tok_cfg.get("special_tokens", None),
        trust_remote_code=tok_cfg.get("trust_remote_code", False),
        legacy=legacy,
    )
    extra = tok_cfg.get("additional_special_tokens", None)
    if extra is not None:
        tokenizer.add_special_tokens(OmegaConf.to_object(extra) if isinstance(extra, DictConfig) else extra)
    return tokenizer, files


def _info_from_files(files: dict[str, str], workdir: Path):  # type: ignore[no-untyped-def]
    """Our tokenizer view (ids, pieces) of the same files NeMo read."""
    from .tokenization.load import load_tokenizer

    if "vocab_file" in files and "merge_file" in files:
        folder = workdir / "new_tokenizer"
        folder.mkdir(exist_ok=True)
        shutil.copyfile(files["vocab_file"], folder / "vocab.json")
        shutil.copyfile(files["merge_file"], folder / "merges.txt")
        return load_tokenizer(folder)
    if "model" in files:
        return load_tokenizer(Path(files["model"]))
    return None


def _stored_rows(restore_path: Path) -> int:
    """The embedding's row count of a distributed checkpoint, from its ``.metadata`` alone."""
    shapes = read_dist_tensor_shapes(restore_path)
    return shapes[find_vocab_keys(shapes).embedding][0]


def _data_prefixes(data_prefix: Any) -> Iterator[str]:
    """Dataset prefixes of ``model.data.data_prefix``: a list of [weight, prefix, ...] or a dict of such lists."""
    if data_prefix is None:
        return
    if isinstance(data_prefix, (dict, DictConfig)):
        for value in data_prefix.values():
            yield from _data_prefixes(value)
        return
    if isinstance(data_prefix, str):
        yield data_prefix
        return
    for item in data_prefix:
        if isinstance(item, str):
            yield item


def check_data(model_cfg: Any, vocab_size: int) -> None:
    from .data_check import scan_token_ids

    for prefix in _data_prefixes(model_cfg.get("data", {}).get("data_prefix")):
        scan = scan_token_ids(prefix, vocab_size)
        if not scan.ok:
            raise DataError(f"{scan.summary()}; re-tokenize this data with the configured tokenizer")
        _log(scan.summary())


def prepare_restore(restore_path: str | Path, model_cfg: Any, settings: ExtensionSettings) -> Path | None:
    """Return an extracted, resized .nemo folder to restore from instead, or None when sizes already agree."""
    source = Path(restore_path)
    config, artifacts, layout = read_nemo_header(source)
    # Named with this process's id like every temporary of the package: a later run removes it if
    # this one is killed before its atexit cleanup.
    scratch = Path(settings.work_dir) if settings.work_dir else Path(tempfile.gettempdir())
    remove_stale(scratch, SCRATCH_STEM)
    work = temp_dir(scratch, SCRATCH_STEM)
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    tokenizer, files = _nemo_tokenizer(model_cfg.tokenizer, artifacts, work)
    new_vocab = int(tokenizer.vocab_size)
    container: dict[str, Any] = OmegaConf.to_container(model_cfg, resolve=True)  # type: ignore[assignment]
    new_rows = expected_rows(new_vocab, container)
    if settings.check_data:
        check_data(model_cfg, new_vocab)

    from .tokenization.load import load_tokenizer

    own_dir = work / "own_tokenizer"
    own_dir.mkdir()
    own_where = checkpoint_tokenizer_files(Checkpoint({}, config, layout, artifacts), own_dir)
    own = load_tokenizer(own_where) if own_where is not None else None
    old_vocab = own.vocab_size if own is not None else None
    # The distributed layout tells the stored rows from its metadata; the others need the tensors.
    ckpt = None if layout == DISTRIBUTED else read_nemo(source)
    stored = _stored_rows(source) if ckpt is None else vocab_table_shapes(ckpt)[ckpt.vocab_keys().embedding][0][0]
    if stored == new_rows and old_vocab in (None, new_vocab):
        _log(f"checkpoint rows ({stored}) already match the tokenizer ({new_vocab} tokens): nothing to do")
        return None
    ckpt = ckpt or read_nemo(source)
    new_info = _info_from_files(files, work)
    options = with_padding_of(settings.options(), container, tensor_parallel=None, divisible_by=None)
    plan = prepare_resize(
        ckpt, old_vocab, new_vocab, has_new_tokenizer=new_info is not None, options=options, wording=WORDING
    )
    if plan.rows.new_rows != new_rows:  # override_vocab_size: NeMo builds exactly that many rows
        raise ResizeError(
            f"override_vocab_size={new_rows} disagrees with the padded size {plan.rows.new_rows}; unset it"
        )
    pieces = checked_pieces(plan, own, new_info, WORDING)
    resized, done = apply_resize(ckpt, plan, pieces=pieces, seed=options.seed)
    resized = embed_tokenizer(resized, {k: Path(v) for k, v in files.items()})
    out = work / "resized"
    # Only the resized tables are written: every other tensor is read where it lies in the source
    # (no copy of the model per rank), which stays in place for the whole restore.
    write_nemo_dir(resized, out, link_unchanged=True)
    if settings.report:
        for line in ["resized the vocabulary before loading:", *plan.lines(done)]:
            _log(line)
    return out


def install() -> None:
    """Wrap NeMo's restore path once; inert for configs without ``vocab_extension``."""
    from nemo.collections.nlp.parts.nlp_overrides import NLPDDPStrategy, NLPSaveRestoreConnector

    if getattr(NLPSaveRestoreConnector.restore_from, "_vocab_extension", False):
        return
    original_restore = NLPSaveRestoreConnector.restore_from

    signature = inspect.signature(original_restore)

    @functools.wraps(original_restore)
    def restore_from(self: Any, *args: Any, **kwargs: Any) -> Any:
        call = signature.bind(self, *args, **kwargs)
        cfg = call.arguments.get("override_config_path")
        if call.arguments.get("return_config") or not isinstance(cfg, DictConfig):
            return original_restore(*call.args, **call.kwargs)
        settings = settings_of(cfg)
        if settings is None:
            return original_restore(*call.args, **call.kwargs)
        extracted = self.model_extracted_dir
        source = extracted if extracted and Path(extracted).is_dir() else call.arguments["restore_path"]
        resized = prepare_restore(source, cfg, settings)
        if resized is not None:
            self.model_extracted_dir = str(resized)
            call.arguments["restore_path"] = str(resized)
        return original_restore(*call.args, **call.kwargs)

    restore_from._vocab_extension = True  # type: ignore[attr-defined]
    NLPSaveRestoreConnector.restore_from = restore_from  # type: ignore[method-assign]

    original_load = NLPDDPStrategy.load_checkpoint

    @functools.wraps(original_load)
    def load_checkpoint(self: Any, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        module = getattr(self, "lightning_module", None)
        cfg = getattr(module, "cfg", None)
        if settings_of(cfg) is not None:
            refuse_mismatched_training_checkpoint(Path(checkpoint_path), module)
        return original_load(self, checkpoint_path, *args, **kwargs)

    NLPDDPStrategy.load_checkpoint = load_checkpoint  # type: ignore[method-assign]
    _log(f"plugin loaded from {Path(__file__).parent}: model.vocab_extension is applied at restore")


def refuse_mismatched_training_checkpoint(path: Path, module: Any) -> None:
    """Megatron would silently zero-fill or truncate the table (and its optimizer moments): refuse."""
    refuse_training_checkpoint_of_another_size(path, int(module.padded_vocab_size))
