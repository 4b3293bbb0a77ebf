"""Training a GPT-2 style byte-level BPE (``vocab.json`` + ``merges.txt``) on text or JSONL corpora."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from nemo_vocab_ext.errors import TokenizerError
from nemo_vocab_ext.tokenization.load import EOS_TOKEN


def train_bpe(texts: Iterable[str], out_dir: str | Path, vocab_size: int, min_frequency: int = 2) -> Path:
    """Train a GPT-2 style byte-level BPE and write ``vocab.json`` and ``merges.txt`` into ``out_dir``.

    ``<|endoftext|>`` is id 0, as NeMo's GPT2BPETokenizer expects it in the vocabulary.
    """
    return _train_bpe(texts, out_dir, vocab_size, min_frequency, show_progress=False)


def _train_bpe(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int, min_frequency: int, show_progress: bool
) -> Path:
    from tokenizers import ByteLevelBPETokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts,
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        show_progress=show_progress,
    )
    bpe.save_model(str(out))
    return out


def iter_corpus_texts(corpus_paths: Sequence[str | Path], json_key: str | None = None) -> Iterator[str]:
    """Yield the non-empty texts of plain-text files (one text a line) or JSONL files (``json_key``).

    Streams line by line so corpora larger than memory work. ``json_key`` mirrors NeMo's
    ``preprocess_data_for_megatron.py --json-keys``: every line is one JSON object holding the text.
    """
    paths = [Path(p) for p in corpus_paths]
    for p in paths:  # fail before training starts, not after an hour on the first file
        if not p.is_file():
            raise TokenizerError(f"{p}: corpus file not found; pass existing text or JSONL files")
    for p in paths:
        try:
            with open(p, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    line = line.rstrip("\r\n")
                    if not line.strip():
                        continue
                    if json_key is None:
                        yield line
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError:
                        raise TokenizerError(
                            f"{p}:{lineno}: not a JSON object; drop --json-key to read plain text"
                        ) from None
                    if not isinstance(obj, dict) or json_key not in obj:
                        raise TokenizerError(
                            f"{p}:{lineno}: no key {json_key!r} in the JSON object; pass the right --json-key"
                        )
                    text = obj[json_key]
                    if not isinstance(text, str):
                        raise TokenizerError(f"{p}:{lineno}: {json_key!r} is {type(text).__name__}, not a string")
                    if text.strip():
                        yield text
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None
        except OSError as e:
            raise TokenizerError(f"{p}: cannot read ({e.strerror or e})") from None


def train_bpe_files(
    corpus_paths: Sequence[str | Path],
    out_dir: str | Path,
    vocab_size: int,
    json_key: str | None = None,
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Path:
    """Train a GPT-2 byte-level BPE (``<|endoftext|>`` = 0) on text or JSONL files; write vocab.json + merges.txt."""
    # 256 byte symbols + <|endoftext|>: anything smaller cannot even hold the alphabet.
    if vocab_size <= 257:
        raise TokenizerError(
            f"vocab size {vocab_size} is too small: byte-level BPE needs 257 ids for bytes and <|endoftext|>"
        )
    texts = iter_corpus_texts(corpus_paths, json_key)
    return _train_bpe(texts, out_dir, vocab_size, min_frequency, show_progress)
