"""Tokenizer files: training, loading, merging and sizes as NeMo defines them.

Pure files plus ``tokenizers``/``sentencepiece``: no NeMo import, so the CLI and the checks stay fast and
work without NeMo installed. Where NeMo's behaviour matters (the vocab size, what its GPT2BPETokenizer
does with ``merges.txt``) it is reproduced here and pinned by a test against NeMo itself.

Vocab size as NeMo counts it (NeMo 2.4.1):

* ``get_nmt_tokenizer(library='megatron', model_name='GPT2BPETokenizer', vocab_file, merges_file)`` builds
  NeMo's ``AutoTokenizer`` around transformers' *slow* ``GPT2Tokenizer`` and reports ``len(hf_tokenizer)``:
  the number of distinct token strings in ``vocab.json`` plus added tokens. ``<|endoftext|>`` is the slow
  tokenizer's unk/bos/eos, so when ``vocab.json`` lacks it, it is added with id ``len(vocab.json)`` and
  the size is one more than the file's entry count.
* ``tokenizer.json`` (HF fast tokenizer): ``len(tokenizer)`` = ``get_vocab_size(with_added_tokens=True)``.
* SentencePiece: ``get_piece_size()`` (special tokens are added on top only in NeMo's legacy mode).
"""

from __future__ import annotations

import itertools
import json
import operator
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from nemo_vocab_ext.errors import TokenizerError

EOS_TOKEN = "<|endoftext|>"

KIND_GPT2_BPE = "gpt2-bpe"  # folder with vocab.json + merges.txt, what NeMo's GPT2BPETokenizer reads
KIND_TOKENIZER_JSON = "tokenizer.json"  # HF fast tokenizer file
KIND_SENTENCEPIECE = "sentencepiece"  # SentencePiece .model

MERGES_HEADER = "#version: 0.2"
_MERGE_LINES = re.compile(r"(?:\S+ \S+\n)*")  # merges.txt after its header, when every line is well formed
_SP_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SP_SPACE = "\u2581"  # SentencePiece's visible space "▁"

_LOAD_HINT = "pass a folder with vocab.json + merges.txt, a tokenizer.json or a SentencePiece .model"


# --------------------------------------------------------------------------------------------- training


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


def read_vocab_json(path: str | Path) -> dict[str, int]:
    with open(path, encoding="utf-8") as f:
        vocab: dict[str, int] = json.load(f)
    return vocab


# ------------------------------------------------------------------------------------------- byte level


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: printable Latin-1 bytes stand for themselves, the 68 others are moved to
    U+0100.. so that every token is a printable string without spaces (space is ``Ġ``)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping: dict[int, str] = {}
    shifted = 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


@lru_cache(maxsize=1)
def _unicode_to_latin1() -> dict[int, int]:
    """str.translate's table from GPT-2's byte alphabet to the Latin-1 character of each byte; the
    Latin-1 characters outside the alphabet go to one that Latin-1 cannot encode."""
    table = {ord(c): b for b, c in bytes_to_unicode().items()}
    return {**dict.fromkeys(range(256), 0xFFFF), **table}


def _byte_level_bytes(token: str) -> bytes | None:
    """The bytes a byte-level token stands for; None when it holds a character outside the alphabet."""
    try:
        return token.translate(_unicode_to_latin1()).encode("latin-1")
    except UnicodeEncodeError:
        return None


def _to_byte_level(data: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in data)


def _split_utf8(data: bytes) -> list[str | int]:
    """Split bytes into decodable text runs and stray bytes (a token may hold part of a character)."""
    out: list[str | int] = []
    rest = data
    while rest:
        try:
            out.append(rest.decode("utf-8"))
            break
        except UnicodeDecodeError as e:
            if e.start:
                out.append(rest[: e.start].decode("utf-8"))
            out.append(rest[e.start])
            rest = rest[e.start + 1 :]
    return out


# ---------------------------------------------------------------------------------------------- loading


class TokenizerInfo:
    """A tokenizer as NeMo sees it: ids, size, merges, encoding, and the files to embed as artifacts.

    ``tokens[i]`` is the token string of id ``i`` as stored (byte-level strings for GPT-2 BPE, pieces for
    SentencePiece), including tokens NeMo adds on load (``nemo_added``). ``vocab_size == len(tokens)``.
    """

    def __init__(
        self,
        *,
        kind: str,
        path: Path,
        files: tuple[Path, ...],
        tokens: list[str],
        merges: list[tuple[str, str]],
        byte_level: bool,
        nemo_added: tuple[str, ...] = (),
        special_tokens: frozenset[str] = frozenset(),
        backend: Callable[[], Any],
    ) -> None:
        self.kind = kind
        self.path = path
        self.files = files
        self.tokens = tokens
        self.merges = merges
        self.byte_level = byte_level
        self.nemo_added = nemo_added
        self.special_tokens = special_tokens
        self._make_backend = backend
        self._backend: Any = None
        self._raw_sp: Any = None
        self._ids: dict[str, int] | None = None

    def __repr__(self) -> str:
        return f"TokenizerInfo(kind={self.kind!r}, path='{self.path}', vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        """The size NeMo reports (``tokenizer.vocab_size``), the ``V`` of the padded-size formula."""
        return len(self.tokens)

    def id_to_token(self, i: int) -> str:
        return self.tokens[i]

    def token_to_id(self, token: str) -> int | None:
        if self._ids is None:
            self._ids = {t: i for i, t in enumerate(self.tokens)}
        return self._ids.get(token)

    @property
    def backend(self) -> Any:
        if self._backend is None:
            self._backend = self._make_backend()
        return self._backend

    def encode(self, text: str) -> list[int]:
        """Ids for ``text`` without BOS/EOS, as NeMo's ``text_to_ids`` gives them."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self.kind == KIND_SENTENCEPIECE:
            ids: list[list[int]] = self.backend.encode(list(texts))
            return ids
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def token_bytes(self, i: int) -> bytes:
        """The raw bytes token ``i`` stands for (a byte-level token may hold part of a UTF-8 character)."""
        token = self.tokens[i]
        if self.kind == KIND_SENTENCEPIECE:
            sp = self.backend
            if sp.is_control(i) or sp.is_unknown(i):
                return b""
            if sp.is_byte(i):
                m = _SP_BYTE_PIECE.match(token)
                return bytes([int(m.group(1), 16)]) if m else b""
            return token.replace(_SP_SPACE, " ").encode("utf-8")
        if self.byte_level and token not in self.special_tokens:
            raw = _byte_level_bytes(token)
            if raw is not None:
                return raw
        m = _SP_BYTE_PIECE.match(token)
        if m:
            return bytes([int(m.group(1), 16)])
        return token.replace(_SP_SPACE, " ").encode("utf-8")

    def encode_bytes(self, data: bytes) -> list[int]:
        """This tokenizer's ids for a byte string: the text encoded normally, or, where the bytes are not
        whole UTF-8 characters, the BPE model run on them directly (byte level) or byte pieces (SP)."""
        if not data:
            return []
        parts = _split_utf8(data)
        if self.byte_level and any(isinstance(p, int) for p in parts):
            # Part of a character: no text to encode, but byte-level BPE works on bytes anyway.
            return [t.id for t in self.backend.model.tokenize(_to_byte_level(data))]
        ids: list[int] = []
        for part in parts:
            if isinstance(part, str):
                ids.extend(self._encode_fragment(part))
                continue
            byte_id = self.token_to_id(f"<0x{part:02X}>")
            if byte_id is not None:
                ids.append(byte_id)
            elif self.kind == KIND_SENTENCEPIECE:
                ids.append(self.backend.unk_id())
        return ids

    def encode_bytes_batch(self, items: Sequence[bytes]) -> list[list[int]]:
        """:meth:`encode_bytes` of each item; whole UTF-8 texts under a BPE go to the backend in one batch
        (7000 one-text calls cost a resize about 0.2 s)."""
        texts: dict[int, str] = {}
        if self.kind != KIND_SENTENCEPIECE:
            for i, data in enumerate(items):
                try:
                    texts[i] = data.decode("utf-8")
                except UnicodeDecodeError:
                    continue
        batched = dict(zip(texts, self.encode_batch(list(texts.values())) if texts else [], strict=True))
        return [batched[i] if i in batched and data else self.encode_bytes(data) for i, data in enumerate(items)]

    def _encode_fragment(self, text: str) -> list[int]:
        if self.kind != KIND_SENTENCEPIECE:
            return self.encode(text)
        # A piece is a fragment of a word: SentencePiece's usual dummy "▁" prefix and whitespace cleanup
        # would turn "ing" into "▁ing", so encode with a copy whose normalizer leaves the text alone.
        if self._raw_sp is None:
            self._raw_sp = _raw_sentencepiece(self.path)
        ids: list[int] = self._raw_sp.encode(text)
        return ids


def load_tokenizer(path: str | Path) -> TokenizerInfo:
    """Read a tokenizer: a folder with ``vocab.json`` + ``merges.txt`` (GPT-2 BPE, preferred when a
    folder has several), a ``tokenizer.json`` (file or folder) or a SentencePiece ``.model`` (file, or the
    only ``.model`` in a folder)."""
    p = Path(path)
    if not p.exists():
        raise TokenizerError(f"{p}: no such file or folder; {_LOAD_HINT}")
    if p.is_dir():
        vocab, merges = p / "vocab.json", p / "merges.txt"
        if vocab.is_file() and merges.is_file():
            return _load_gpt2_bpe(vocab, merges)
        if (p / "tokenizer.json").is_file():
            return _load_tokenizer_json(p / "tokenizer.json")
        models = sorted(p.glob("*.model"))
        if len(models) == 1:
            return _load_sentencepiece(models[0])
        if vocab.is_file() or merges.is_file():
            missing = "merges.txt" if vocab.is_file() else "vocab.json"
            raise TokenizerError(f"{p}: has no {missing}; GPT-2 BPE needs both vocab.json and merges.txt")
        if len(models) > 1:
            raise TokenizerError(f"{p}: holds {len(models)} .model files; pass the SentencePiece model file itself")
        raise TokenizerError(f"{p}: no tokenizer files found; {_LOAD_HINT}")
    if p.suffix == ".model":
        return _load_sentencepiece(p)
    if p.name in ("vocab.json", "merges.txt"):
        return load_tokenizer(p.parent)
    if p.suffix == ".json":
        return _load_tokenizer_json(p)
    raise TokenizerError(f"{p}: not a tokenizer file this tool reads; {_LOAD_HINT}")


def _require_mapping(vocab: Any, path: Path) -> dict[str, Any]:
    if not isinstance(vocab, dict):
        raise TokenizerError(f"{path}: expected a JSON object mapping tokens to ids")
    return vocab


def _tokens_from_vocab(vocab: Any, path: Path) -> list[str]:
    n = len(_require_mapping(vocab, path))
    # Whole-dict checks first: integer ids that are exactly 0..n-1 (a resize reads two 50k-token
    # vocabularies); the loop below only runs to name the first bad entry.
    if set(map(type, vocab.values())) <= {int}:
        by_id = dict(zip(vocab.values(), vocab.keys(), strict=True))
        if len(by_id) == n and (n == 0 or (min(by_id) == 0 and max(by_id) == n - 1)):
            return [by_id[i] for i in range(n)]
    tokens: list[str | None] = [None] * n
    for tok, i in vocab.items():
        if not isinstance(i, int) or isinstance(i, bool):
            raise TokenizerError(f"{path}: token {tok!r} has id {i!r}, not an integer")
        # NeMo sizes the table by the token count, so an id >= count would index past the embedding.
        if not 0 <= i < n:
            raise TokenizerError(
                f"{path}: token {tok!r} has id {i} but there are {n} tokens; ids must be 0..{n - 1} without gaps"
            )
        if tokens[i] is not None:
            raise TokenizerError(f"{path}: tokens {tokens[i]!r} and {tok!r} share id {i}; every id needs one token")
        tokens[i] = tok
    return [t for t in tokens if t is not None]


def _read_merges_txt(path: Path) -> list[tuple[str, str]]:
    """Parse merges.txt the way NeMo's GPT2BPETokenizer (transformers' slow GPT2Tokenizer) does, and
    refuse the files it would silently misread: it always drops the first and the last line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read ({e})") from None
    if not text:
        return []
    header, _, body = text.partition("\n")
    if not header.startswith("#version"):
        raise TokenizerError(
            f"{path}: line 1 is {header!r}, not a '#version' header; NeMo's GPT2BPETokenizer skips line 1 "
            f"and would lose that merge; add '{MERGES_HEADER}' as the first line"
        )
    last = text[text.rfind("\n") + 1 :]
    if "\n" in text and last.strip():
        raise TokenizerError(
            f"{path}: does not end with a newline; NeMo's GPT2BPETokenizer would drop the last merge "
            f"{last!r}; add a final newline"
        )
    # Whole-file checks first (a resize reads two 50k-line files beside its copy): when every line
    # is two tokens and a space, the words pair up. The line-by-line pass below only runs to name
    # the first bad line.
    if _MERGE_LINES.fullmatch(body):
        words = body.split()
        merges = list(zip(words[0::2], words[1::2], strict=True))
        if len(set(merges)) == len(merges):
            return merges
    merges = []
    seen: dict[tuple[str, str], int] = {}
    for lineno, line in enumerate(body.split("\n"), 2):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerError(f"{path}:{lineno}: expected two tokens separated by a space, got {line!r}")
        pair = (parts[0], parts[1])
        if pair in seen:
            raise TokenizerError(f"{path}:{lineno}: merge {line!r} repeats line {seen[pair]}; remove the duplicate")
        seen[pair] = lineno
        merges.append(pair)
    return merges


def _check_merges_in_vocab(merges: list[tuple[str, str]], tokens: Iterable[str], where: Path) -> None:
    vocab = set(tokens)
    if vocab.issuperset(itertools.chain.from_iterable(merges)) and vocab.issuperset(
        itertools.starmap(operator.concat, merges)
    ):
        return
    for rank, (a, b) in enumerate(merges):
        for needed in (a, b, a + b):
            if needed not in vocab:
                raise TokenizerError(
                    f"{where}: merge {rank} {a!r} {b!r} needs token {needed!r}, which is not in the vocabulary"
                )


def _read_gpt2_vocab(vocab_path: Path) -> dict[str, int]:
    """vocab.json's mapping, shared by every reader of the same unchanged file: callers must not modify
    it. A resize counts both vocabularies before it plans, then reads them whole in a forked process
    beside the copy; the child inherits them parsed (50k entries: about 40 ms each)."""
    try:
        st = vocab_path.stat()
        return _parsed_vocab(vocab_path.resolve(), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{vocab_path}: cannot read ({e}); expected GPT-2 vocab.json") from None


@lru_cache(maxsize=4)
def _parsed_vocab(vocab_path: Path, _version: tuple[int, ...]) -> dict[str, int]:
    return _require_mapping(read_vocab_json(vocab_path), vocab_path)


def tokenizer_size(path: str | Path) -> int:
    """The size :func:`load_tokenizer` reports, from the vocabulary alone where it can (a GPT-2 BPE
    folder's vocab.json; merges.txt is read and checked only by the full load)."""
    p = Path(path)
    folder = p.parent if p.name in ("vocab.json", "merges.txt") else p
    if folder.is_dir() and (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        # The count alone: the full load checks the ids (and raises) before anything is published.
        vocab = _read_gpt2_vocab(folder / "vocab.json")
        return len(vocab) + (EOS_TOKEN not in vocab)  # NeMo adds the end-of-text token when missing
    return load_tokenizer(p).vocab_size


def _load_gpt2_bpe(vocab_path: Path, merges_path: Path) -> TokenizerInfo:
    vocab = _read_gpt2_vocab(vocab_path)
    tokens = _tokens_from_vocab(vocab, vocab_path)
    merges = _read_merges_txt(merges_path)
    _check_merges_in_vocab(merges, tokens, merges_path)
    nemo_added: tuple[str, ...] = ()
    if EOS_TOKEN not in vocab:
        # GPT2Tokenizer's unk/bos/eos: NeMo's AutoTokenizer adds it with id len(vocab.json).
        tokens.append(EOS_TOKEN)
        nemo_added = (EOS_TOKEN,)

    def backend() -> Any:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        tk = Tokenizer(models.BPE(vocab, merges))  # the file's own tokens (without nemo_added)
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        # NeMo's slow GPT2Tokenizer matches <|endoftext|> in text as one special token; do the same.
        tk.add_special_tokens([AddedToken(EOS_TOKEN, special=True)])
        return tk

    return TokenizerInfo(
        kind=KIND_GPT2_BPE,
        path=vocab_path.parent,
        files=(vocab_path, merges_path),
        tokens=tokens,
        merges=merges,
        byte_level=True,
        nemo_added=nemo_added,
        special_tokens=frozenset({EOS_TOKEN}),
        backend=backend,
    )


def _has_type(node: Any, name: str) -> bool:
    if isinstance(node, dict):
        return node.get("type") == name or any(_has_type(v, name) for v in node.values())
    if isinstance(node, list):
        return any(_has_type(v, name) for v in node)
    return False


def _load_tokenizer_json(path: Path) -> TokenizerInfo:
    from tokenizers import Tokenizer

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        tk = Tokenizer.from_file(str(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read ({e}); expected a HF tokenizer.json") from None
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise TokenizerError(f"{path}: not a valid tokenizer.json ({e})") from None
    vocab = tk.get_vocab(with_added_tokens=True)
    tokens = _tokens_from_vocab(vocab, path)
    if len(tokens) != tk.get_vocab_size(with_added_tokens=True):
        size = tk.get_vocab_size(with_added_tokens=True)
        raise TokenizerError(f"{path}: {len(tokens)} distinct tokens but size {size}; cannot map ids to tokens")
    model = data.get("model") or {}
    merges: list[tuple[str, str]] = []
    for m in model.get("merges") or []:
        pair = tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
        if len(pair) != 2:
            raise TokenizerError(f"{path}: malformed merge {m!r}")
        merges.append((str(pair[0]), str(pair[1])))
    special = frozenset(t["content"] for t in data.get("added_tokens") or [] if t.get("special"))
    byte_level = _has_type(data.get("pre_tokenizer"), "ByteLevel") or _has_type(data.get("decoder"), "ByteLevel")
    return TokenizerInfo(
        kind=KIND_TOKENIZER_JSON,
        path=path,
        files=(path,),
        tokens=tokens,
        merges=merges,
        byte_level=byte_level,
        special_tokens=special,
        backend=lambda: tk,
    )


def _load_sentencepiece(path: Path) -> TokenizerInfo:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise TokenizerError(f"{path}: not a SentencePiece model ({e})") from None
    tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    # Pieces are unique in a valid model, but check: every later lookup assumes one id per piece.
    if len(set(tokens)) != len(tokens):
        raise TokenizerError(f"{path}: a piece appears twice; the model is corrupt")
    return TokenizerInfo(
        kind=KIND_SENTENCEPIECE,
        path=path,
        files=(path,),
        tokens=tokens,
        merges=[],
        byte_level=False,
        backend=lambda: sp,
    )


def _load_sp_proto(path: Path) -> Any:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # protobuf's DecodeError
        raise TokenizerError(f"{path}: not a SentencePiece model ({e})") from None
    return proto


def _raw_sentencepiece(path: Path) -> Any:
    import sentencepiece as spm

    proto = _load_sp_proto(path)
    spec = proto.normalizer_spec
    spec.name = "identity"
    spec.precompiled_charsmap = b""
    spec.add_dummy_prefix = False
    spec.remove_extra_whitespaces = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


# ---------------------------------------------------------------------------------------- the id check


@dataclass(frozen=True)
class MovedId:
    token: str
    base_id: int
    merged_id: int | None  # None: the token is missing from the merged tokenizer

    def __str__(self) -> str:
        where = "missing" if self.merged_id is None else str(self.merged_id)
        return f"{self.token!r}: {self.base_id} \u2192 {where}"


@dataclass(frozen=True)
class MovedMerge:
    merge: tuple[str, str]
    base_rank: int
    merged_rank: int | None

    def __str__(self) -> str:
        where = "missing" if self.merged_rank is None else str(self.merged_rank)
        return f"'{self.merge[0]} {self.merge[1]}': rank {self.base_rank} \u2192 {where}"


@dataclass
class IdCheck:
    """Whether every base token keeps its id (and every base merge its rank) in the merged tokenizer."""

    base_path: str
    merged_path: str
    base_tokens: int
    merged_tokens: int
    base_merges: int
    moved: list[MovedId] = field(default_factory=list)
    merges_changed: list[MovedMerge] = field(default_factory=list)
    # SentencePiece: base pieces whose score or type changed (the scores play the merge ranks' part).
    pieces_changed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.moved and not self.merges_changed and not self.pieces_changed

    def summary(self, examples: int = 3) -> str:
        """One line: what was checked and, on failure, how much moved with a few examples."""
        if self.ok:
            merges = f" and all {self.base_merges} base merges their ranks" if self.base_merges else ""
            return (
                f"all {self.base_tokens} base tokens keep their ids{merges} "
                f"({self.merged_tokens} tokens in {self.merged_path})"
            )
        parts = []
        if self.moved:
            eg = ", ".join(str(m) for m in self.moved[:examples])
            parts.append(f"{len(self.moved)} of {self.base_tokens} base token ids moved (e.g. {eg})")
        if self.merges_changed:
            eg = ", ".join(str(m) for m in self.merges_changed[:examples])
            parts.append(f"{len(self.merges_changed)} of {self.base_merges} base merge ranks changed (e.g. {eg})")
        if self.pieces_changed:
            eg = ", ".join(repr(p) for p in self.pieces_changed[:examples])
            parts.append(f"{len(self.pieces_changed)} base pieces changed score or type (e.g. {eg})")
        # Facts only: callers append what it means for them (scrambled rows, how to rebuild).
        return f"ids NOT preserved in {self.merged_path}: " + "; ".join(parts)

    def to_dict(self, examples: int = 20) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "base": self.base_path,
            "merged": self.merged_path,
            "base_tokens": self.base_tokens,
            "merged_tokens": self.merged_tokens,
            "base_merges": self.base_merges,
            "moved_ids": len(self.moved),
            "moved_examples": [
                {"token": m.token, "base_id": m.base_id, "merged_id": m.merged_id} for m in self.moved[:examples]
            ],
            "changed_merges": len(self.merges_changed),
            "changed_merge_examples": [
                {"merge": " ".join(m.merge), "base_rank": m.base_rank, "merged_rank": m.merged_rank}
                for m in self.merges_changed[:examples]
            ],
            "changed_pieces": len(self.pieces_changed),
            "changed_piece_examples": self.pieces_changed[:examples],
            "summary": self.summary(),
        }


def check_ids_preserved(base: TokenizerInfo, merged: TokenizerInfo) -> IdCheck:
    """THE check that a merged tokenizer is an extension of ``base``: token ``t`` with base id ``i`` has
    id ``i`` in ``merged``, and base merge ``r`` is still merge ``r`` (a merge ranked earlier or later
    changes how base-language text is split, even when every id stays put)."""
    check = IdCheck(
        base_path=str(base.path),
        merged_path=str(merged.path),
        base_tokens=base.vocab_size,
        merged_tokens=merged.vocab_size,
        base_merges=len(base.merges),
    )
    # Whole-list comparisons first (a resize checks two 50k-token tokenizers beside its copy); the
    # loops only run to name what moved.
    if merged.tokens[: len(base.tokens)] != base.tokens:
        for i, tok in enumerate(base.tokens):
            if i < merged.vocab_size and merged.tokens[i] == tok:
                continue
            check.moved.append(MovedId(tok, i, merged.token_to_id(tok)))
    if merged.merges[: len(base.merges)] != base.merges:
        merged_rank = {m: r for r, m in enumerate(merged.merges)}
        for r, m in enumerate(base.merges):
            if r < len(merged.merges) and merged.merges[r] == m:
                continue
            check.merges_changed.append(MovedMerge(m, r, merged_rank.get(m)))
    if base.kind == merged.kind == KIND_SENTENCEPIECE:
        b, m = base.backend, merged.backend
        for i, tok in enumerate(base.tokens):
            if i >= merged.vocab_size or merged.tokens[i] != tok:
                continue  # already reported as moved
            if _sp_piece_state(b, i) != _sp_piece_state(m, i):
                check.pieces_changed.append(tok)
    return check


def _sp_piece_state(sp: Any, i: int) -> tuple[float, bool, bool, bool, bool]:
    return (sp.get_score(i), sp.is_control(i), sp.is_unknown(i), sp.is_unused(i), sp.is_byte(i))


# -------------------------------------------------------------------------------------------------- FVT


def pieces_under(old: TokenizerInfo, new: TokenizerInfo, new_ids: range) -> list[list[int]]:
    """For each id in ``new_ids`` of ``new``, the ids ``old`` splits that token's text into.

    Used by the sub-token mean (FVT) init: the new row is the mean of these old rows. The token is
    turned back into its bytes and encoded with ``old``; an empty list means no usable sub-tokens
    (a control piece, an empty token) and the caller should fall back to another init.
    """
    if new_ids.start < 0 or new_ids.stop > new.vocab_size:
        raise TokenizerError(f"{new.path}: ids {new_ids.start}..{new_ids.stop - 1} outside 0..{new.vocab_size - 1}")
    return old.encode_bytes_batch([new.token_bytes(i) for i in new_ids])


def fertility(tok: TokenizerInfo, texts: Iterable[str]) -> float:
    """Tokens per character over ``texts`` (lower = the tokenizer knows the language better)."""
    batch = [t for t in texts if t]
    chars = sum(len(t) for t in batch)
    if not chars:
        raise TokenizerError("fertility needs at least one non-empty text")
    return sum(len(ids) for ids in tok.encode_batch(batch)) / chars


# ------------------------------------------------------------------------------------------------ merge


@dataclass
class MergeResult:
    """What a merge wrote and how it relates to the base."""

    out: Path
    files: tuple[Path, ...]
    kind: str
    base_vocab_size: int
    vocab_size: int
    tokens_added: int
    merges_added: int
    check: IdCheck
    skipped: list[str] = field(default_factory=list)  # new tokens not carried over (special/control)

    def padded_sizes(self, divisible_by: int = 128, tensor_parallel: Sequence[int] = (1, 2, 4, 8)) -> dict[int, int]:
        from nemo_vocab_ext.core.sizes import padded_vocab_size

        return {tp: padded_vocab_size(self.vocab_size, divisible_by, tp) for tp in tensor_parallel}


def _atomic_write(path: Path, data: bytes) -> None:
    # Write beside the target and rename, so a crash never leaves a half-written tokenizer file.
    # (open(..., "xb") rather than mkstemp: the file gets the umask's permissions, not 0600.)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_gpt2_bpe(out_dir: str | Path, tokens: Sequence[str], merges: Sequence[tuple[str, str]]) -> tuple[Path, Path]:
    """Write ``vocab.json`` + ``merges.txt`` in the layout NeMo's GPT2BPETokenizer reads (header line,
    final newline: it drops the first and last line of merges.txt)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = out / "vocab.json", out / "merges.txt"
    vocab = {t: i for i, t in enumerate(tokens)}
    _atomic_write(vocab_path, json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    body = "".join(f"{a} {b}\n" for a, b in merges)
    _atomic_write(merges_path, f"{MERGES_HEADER}\n{body}".encode())
    return vocab_path, merges_path


def _require_byte_level_bpe(tok: TokenizerInfo, role: str) -> None:
    if tok.kind == KIND_GPT2_BPE:
        return
    if tok.kind == KIND_TOKENIZER_JSON and tok.byte_level and tok.merges:
        return
    hint = "; use merge_sentencepiece for SentencePiece models" if tok.kind == KIND_SENTENCEPIECE else ""
    raise TokenizerError(
        f"{tok.path}: the {role} tokenizer is {tok.kind} ({'byte-level' if tok.byte_level else 'not byte-level'}); "
        f"merging needs GPT-2 byte-level BPE (vocab.json + merges.txt or a byte-level BPE tokenizer.json){hint}"
    )


def merge_bpe(base_dir: str | Path, new_dir: str | Path, out_dir: str | Path) -> MergeResult:
    """Merge a new-language byte-level BPE into the base one, base ids and merge ranks untouched.

    The output (``vocab.json`` + ``merges.txt`` in ``out_dir``) holds every base token at its id and
    every base merge at its rank, then the new tokenizer's tokens the base lacks (in the new tokenizer's
    id order) and its merges the base lacks (in the new tokenizer's rank order). Appended merges rank
    after all base merges, so they act only where no base merge applies any more.
    """
    base = load_tokenizer(base_dir)
    new = load_tokenizer(new_dir)
    out = Path(out_dir)
    for given in (base, new):
        if out.resolve() in {f.parent.resolve() for f in given.files}:
            raise TokenizerError(f"{out}: holds an input tokenizer; write the merged one to another folder")
    _require_byte_level_bpe(base, "base")
    _require_byte_level_bpe(new, "new")
    extra_special = sorted(base.special_tokens - {EOS_TOKEN})
    if extra_special:
        raise TokenizerError(
            f"{base.path}: special tokens {extra_special[:5]} cannot be kept special in vocab.json + merges.txt; "
            "merging such a tokenizer.json is not supported yet"
        )

    # Base tokens as NeMo numbers them, including a <|endoftext|> NeMo would add: writing it into
    # vocab.json at that same id keeps it there once new tokens follow.
    tokens = list(base.tokens)
    index = {t: i for i, t in enumerate(tokens)}
    skipped: list[str] = []
    for tok in new.tokens:
        if tok in index:
            continue
        if tok in new.special_tokens or tok in new.nemo_added:
            skipped.append(tok)  # special tokens would become plain vocab entries here, not special
            continue
        if _byte_level_bytes(tok) is None:
            raise TokenizerError(f"{new.path}: token {tok!r} is not a byte-level string; is this a GPT-2 style BPE?")
        index[tok] = len(tokens)
        tokens.append(tok)

    merges = list(base.merges)
    known = set(merges)
    added_merges = 0
    for m in new.merges:
        if m in known:
            continue
        for needed in (m[0], m[1], m[0] + m[1]):
            if needed not in index:  # a merge without its parts or result would break NeMo's tokenizer
                raise TokenizerError(
                    f"{new.path}: merge '{m[0]} {m[1]}' needs token {needed!r}, which is in neither vocabulary"
                )
        known.add(m)
        merges.append(m)
        added_merges += 1

    files = write_gpt2_bpe(out, tokens, merges)
    merged = load_tokenizer(out)
    check = check_ids_preserved(base, merged)
    if not check.ok or merged.vocab_size != len(tokens):  # cannot happen by construction; never ship it if it does
        raise TokenizerError(f"{out}: internal error, merged tokenizer failed its own check: {check.summary()}")
    return MergeResult(
        out=out,
        files=files,
        kind=KIND_GPT2_BPE,
        base_vocab_size=base.vocab_size,
        vocab_size=merged.vocab_size,
        tokens_added=merged.vocab_size - base.vocab_size,
        merges_added=added_merges,
        check=check,
        skipped=skipped,
    )


def merge_sentencepiece(base_model: str | Path, new_model: str | Path, out_model: str | Path) -> MergeResult:
    """Append the new SentencePiece model's normal and user-defined pieces the base lacks.

    Both models must be of the same type. Unigram pieces keep the new model's log-probability scores;
    BPE pieces get scores below every base piece (SentencePiece BPE merges by score), keeping the new
    model's order, so base merges still win. The base normalizer and special pieces are kept.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    base_path, new_path, out = Path(base_model), Path(new_model), Path(out_model)
    base, new = load_tokenizer(base_path), load_tokenizer(new_path)
    for tok, role in ((base, "base"), (new, "new")):
        if tok.kind != KIND_SENTENCEPIECE:
            raise TokenizerError(
                f"{tok.path}: the {role} tokenizer is {tok.kind}, not SentencePiece; use merge_bpe for BPE"
            )
    base_proto, new_proto = _load_sp_proto(base.path), _load_sp_proto(new_path)
    base_type, new_type = base_proto.trainer_spec.model_type, new_proto.trainer_spec.model_type
    type_name = pb.TrainerSpec.ModelType.Name
    if base_type != new_type:
        raise TokenizerError(
            f"{new_path}: a {type_name(new_type)} model cannot be merged into the {type_name(base_type)} base "
            f"{base_path}; train the new model with --model_type={type_name(base_type).lower()}"
        )
    if base_type not in (pb.TrainerSpec.UNIGRAM, pb.TrainerSpec.BPE):
        raise TokenizerError(f"{base_path}: merging {type_name(base_type)} SentencePiece models is not supported yet")

    piece_type = pb.ModelProto.SentencePiece
    existing = {p.piece for p in base_proto.pieces}
    lowest = min((p.score for p in base_proto.pieces if p.type == piece_type.NORMAL), default=0.0)
    added, skipped = 0, []
    for p in new_proto.pieces:
        if p.piece in existing:
            continue
        if p.type not in (piece_type.NORMAL, piece_type.USER_DEFINED):
            skipped.append(p.piece)  # control, unknown, byte and unused pieces belong to the base's setup
            continue
        added += 1
        piece = base_proto.pieces.add()
        piece.piece, piece.type = p.piece, p.type
        piece.score = lowest - added if base_type == pb.TrainerSpec.BPE else p.score
        existing.add(p.piece)
    base_proto.trainer_spec.vocab_size = len(base_proto.pieces)

    if out.is_dir():
        out = out / base_path.name
    if out.resolve() in (base_path.resolve(), new_path.resolve()):
        raise TokenizerError(f"{out}: is an input model; write the merged model to another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(out, base_proto.SerializeToString())
    merged = load_tokenizer(out)
    check = check_ids_preserved(base, merged)
    if not check.ok:
        raise TokenizerError(f"{out}: internal error, merged model failed its own check: {check.summary()}")
    return MergeResult(
        out=out,
        files=(out,),
        kind=KIND_SENTENCEPIECE,
        base_vocab_size=base.vocab_size,
        vocab_size=merged.vocab_size,
        tokens_added=added,
        merges_added=0,
        check=check,
        skipped=skipped,
    )


def merge_tokenizers(base: str | Path, new: str | Path, out: str | Path) -> MergeResult:
    """Merge by the base's kind: SentencePiece models with :func:`merge_sentencepiece`, else :func:`merge_bpe`."""
    if load_tokenizer(base).kind == KIND_SENTENCEPIECE:
        return merge_sentencepiece(base, new, out)
    return merge_bpe(base, new, out)
