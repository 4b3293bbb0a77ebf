"""``nemo-vocab-ext tokenizer ...``: train a target-language tokenizer, merge it into the base one with
ids preserved, and check a merged tokenizer against its base.

The main CLI attaches this group (``main.add_command(tokenizer)``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import click

from nemo_vocab_ext.atomic import atomic_output
from nemo_vocab_ext.cli_common import report_errors
from nemo_vocab_ext.errors import TokenizerError
from nemo_vocab_ext.options import DEFAULTS
from nemo_vocab_ext.tokenization.check import check_merged
from nemo_vocab_ext.tokenization.load import KIND_SENTENCEPIECE, KIND_TOKENIZER_JSON, TokenizerInfo, load_tokenizer
from nemo_vocab_ext.tokenization.merge import MergeResult, merge_bpe, merge_sentencepiece, merge_tokenizer_json
from nemo_vocab_ext.tokenization.train import iter_corpus_texts, train_bpe_files

_EXAMPLES = 3
_BATCH = 2048


def _padded_line(result: MergeResult, divisible_by: int) -> str:
    sizes = ", ".join(f"TP{tp} {size}" for tp, size in result.padded_sizes(divisible_by).items())
    return f"padded size (make_vocab_size_divisible_by={divisible_by}): {sizes}"


@click.group(name="tokenizer")
def tokenizer() -> None:
    """Train, merge and check tokenizers for a vocabulary extension."""


@tokenizer.command("train")
@click.argument("corpus", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--vocab-size", type=click.IntRange(min=258), required=True, help="Tokens in the trained tokenizer.")
@click.option("--json-key", default=None, help="Read JSONL and take the text from this key (as NeMo's preprocessing).")
@click.option("--min-frequency", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress and no summary.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@report_errors
def train_cmd(
    corpus: tuple[Path, ...],
    out: Path,
    vocab_size: int,
    json_key: str | None,
    min_frequency: int,
    quiet: bool,
    force: bool,
) -> None:
    """Train a GPT-2 byte-level BPE on CORPUS files (plain text or JSONL) into folder OUT."""
    progress = not quiet and sys.stderr.isatty()  # progress bars only for a person watching
    if progress:
        click.echo(f"training on {len(corpus)} file(s)...", err=True)
    with atomic_output(out, force=force) as tmp:
        train_bpe_files(corpus, tmp, vocab_size, json_key, min_frequency=min_frequency, show_progress=progress)
        trained = load_tokenizer(tmp)
    if quiet:
        return
    short = ""
    if trained.vocab_size < vocab_size:
        short = f" (asked for {vocab_size}: the corpus has no more pairs seen --min-frequency times)"
    click.echo(f"trained {out}: {trained.vocab_size} tokens{short}, {len(trained.merges)} merges")


@tokenizer.command("merge")
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("new", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--divisible-by",
    type=click.IntRange(min=1),
    default=DEFAULTS.divisible_by,
    show_default=True,
    help="The model's make_vocab_size_divisible_by, for the padded sizes printed.",
)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@report_errors
def merge_cmd(base: Path, new: Path, out: Path, divisible_by: int, force: bool) -> None:
    """Append NEW's tokens and merges that BASE lacks after all of BASE's, into OUT.

    GPT-2 BPE: OUT is a folder with vocab.json + merges.txt. tokenizer.json (byte-level or
    SentencePiece-style BPE): OUT is a folder with the merged tokenizer.json and BASE's
    tokenizer_config.json and special_tokens_map.json. SentencePiece: OUT is the merged .model
    (a folder name gets BASE's file name inside it).
    """
    base_tok = load_tokenizer(base)
    if base_tok.kind == KIND_TOKENIZER_JSON:
        written, result = out, merge_tokenizer_json(base, new, out, force=force)
    else:
        written, result = _merge_into(base_tok, base, new, out, force)
    merges = f" and {result.merges_added} merges" if result.kind != KIND_SENTENCEPIECE else ""
    skipped = f" (skipped {len(result.skipped)} special/control tokens)" if result.skipped else ""
    click.echo(f"merged tokenizer written to {written}")
    click.echo(f"added {result.tokens_added} tokens{merges} from {new}{skipped}")
    click.echo(f"vocab size (as NeMo counts it): {result.vocab_size} (base {result.base_vocab_size})")
    click.echo(_padded_line(result, divisible_by))
    click.echo(f"ids preserved: {result.check.summary()}" if result.check.ok else result.check.summary())


def _merge_into(base_tok: TokenizerInfo, base: Path, new: Path, out: Path, force: bool) -> tuple[Path, MergeResult]:
    """Merge GPT-2 BPE folders or SentencePiece models into OUT, published only complete."""
    with atomic_output(out, force=force) as tmp:
        if base_tok.kind == KIND_SENTENCEPIECE:
            written = out if out.suffix == ".model" else out / base_tok.path.name
            if written is not out:
                tmp.mkdir()
            result = merge_sentencepiece(base, new, tmp if written is out else tmp / written.name)
        else:
            written = out
            result = merge_bpe(base, new, tmp)
    result.check.merged_path = str(written)  # it was checked in the temp folder, before the rename
    return written, result


def _batches(texts: Iterator[str], size: int) -> Iterator[list[str]]:
    while batch := list(islice(texts, size)):
        yield batch


def _compare_text(base: TokenizerInfo, merged: TokenizerInfo, path: Path, json_key: str | None) -> dict[str, Any]:
    lines = differing = base_tokens = merged_tokens = chars = 0
    examples: list[dict[str, Any]] = []
    for batch in _batches(iter_corpus_texts([path], json_key), _BATCH):
        for text, b_ids, m_ids in zip(batch, base.encode_batch(batch), merged.encode_batch(batch), strict=True):
            lines += 1
            chars += len(text)
            base_tokens += len(b_ids)
            merged_tokens += len(m_ids)
            if b_ids != m_ids:
                differing += 1
                if len(examples) < _EXAMPLES:
                    examples.append({"text": text[:80], "base_ids": b_ids[:12], "merged_ids": m_ids[:12]})
    if not chars:
        raise TokenizerError(f"{path}: no text to compare; pass a file with one text a line")
    return {
        "file": str(path),
        "lines": lines,
        "differing_lines": differing,
        "differing_share": differing / lines,
        "examples": examples,
        "fertility_base": base_tokens / chars,
        "fertility_merged": merged_tokens / chars,
    }


@tokenizer.command("check")
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("merged", type=click.Path(path_type=Path))
@click.option(
    "--text",
    "texts",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Text file (one text a line) to encode with both; repeatable.",
)
@click.option("--json-key", default=None, help="The --text files are JSONL with the text under this key.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
@report_errors
def check_cmd(
    ctx: click.Context, base: Path, merged: Path, texts: Sequence[Path], json_key: str | None, as_json: bool
) -> None:
    """Check that MERGED keeps every BASE token id and merge rank; exit 1 when ids moved.

    Two tokenizer.json files: also every BASE added token, with its flags (special, ...).

    With --text, also report the share of lines encoded differently (0 expected on base-language
    text) and tokens per character before and after.
    """
    base_tok, merged_tok = load_tokenizer(base), load_tokenizer(merged)
    result = check_merged(base_tok, merged_tok)  # two tokenizer.json files: also the added tokens' flags
    reports = [_compare_text(base_tok, merged_tok, p, json_key) for p in texts]
    if as_json:
        click.echo(json.dumps({"ids": result.to_dict(), "texts": reports}, ensure_ascii=False, indent=2))
    else:
        click.echo(f"ids preserved: {result.summary()}" if result.ok else result.summary())
        for r in reports:
            click.echo(
                f"{r['file']}: {r['differing_lines']} of {r['lines']} lines ({100 * r['differing_share']:.1f}%) "
                f"encode differently; tokens per character {r['fertility_base']:.3f} -> {r['fertility_merged']:.3f}"
            )
            for ex in r["examples"]:
                click.echo(f"  e.g. {ex['text']!r}: {ex['base_ids']} -> {ex['merged_ids']}")
    if not result.ok:
        if not as_json:
            click.echo(
                "the model's trained rows would belong to other tokens: build the merged tokenizer by appending "
                "(nemo-vocab-ext tokenizer merge BASE NEW OUT)",
                err=True,
            )
        ctx.exit(1)
